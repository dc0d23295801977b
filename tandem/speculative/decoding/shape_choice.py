"""Choosing the decoding shape that pays on this machine: a chain, a tree, or plain decoding.

Whether speculation pays depends on two things the draft alone does not decide: what the machine charges
for verifying ``n`` tokens against one (flat on a GPU, nearly linear on a CPU computing in float32) and how
many tokens the draft gets accepted a round with each shape. This module takes both as measured figures
(``round_costs.py`` measures the costs, ``acceptance_profile.py`` the acceptance of every candidate shape on
prompts the evaluation does not score) and picks the shape with the most expected tokens per second, in the
spirit of Sequoia's hardware-aware trees and SpecDec++'s adaptive draft length. A shape is chosen only if it
beats plain decoding by ``ChoiceConfig.margin``: tandem never makes decoding slower by its own choice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tandem.speculative.decoding.tree import TreeShape


@dataclass(frozen=True)
class DecodingShape:
    """How a round drafts: ``plain`` (no draft), a ``chain`` of ``draft_tokens``, or a ``tree``."""

    kind: str
    draft_tokens: int = 0
    tree: TreeShape | None = None

    def __post_init__(self):
        if self.kind not in ("plain", "chain", "tree"):
            raise ValueError(f"a decoding shape is plain, chain or tree, got {self.kind!r}")
        if (self.kind == "chain") != (self.draft_tokens >= 1) or (self.kind == "tree") != (self.tree is not None):
            raise ValueError(f"a chain needs draft_tokens >= 1 and a tree a TreeShape, got {self}")

    @classmethod
    def chain(cls, draft_tokens: int) -> "DecodingShape":
        return cls("chain", draft_tokens=draft_tokens)

    @classmethod
    def of_tree(cls, tree: TreeShape) -> "DecodingShape":
        return cls("tree", tree=tree)

    @classmethod
    def parse(cls, text: str) -> "DecodingShape":
        """``plain``, ``chain K`` or ``tree DEPTH,TOP_K,SIZE``, as ``str()`` writes it."""
        kind, _, rest = text.partition(" ")
        if kind == "plain" and not rest:
            return PLAIN
        if kind == "chain" and rest.isdigit():
            return cls.chain(int(rest))
        if kind == "tree":
            return cls.of_tree(TreeShape.parse(rest))
        raise ValueError(f"a decoding shape is 'plain', 'chain K' or 'tree DEPTH,TOP_K,SIZE', got {text!r}")

    @property
    def verified(self) -> int:
        """Positions one verification forward carries (the committed token and the drafted ones)."""
        return {"plain": 1, "chain": self.draft_tokens + 1}.get(self.kind) or self.tree.size + 1

    @property
    def draft_key(self) -> str:
        """What the drafting cost depends on: the chain length, or a tree's depth and width (not its size)."""
        return f"chain {self.draft_tokens}" if self.kind == "chain" else f"tree {self.tree.depth},{self.tree.top_k}"

    def __str__(self) -> str:
        return {"plain": "plain", "chain": f"chain {self.draft_tokens}"}.get(self.kind) or f"tree {self.tree}"


PLAIN = DecodingShape("plain")


def candidate_shapes(max_chain: int = 6, top_ks=(2, 4, 8), depths=(2, 3, 4),
                     sizes=(4, 6, 8, 12, 16, 24, 32)) -> list[DecodingShape]:
    """The shapes ``auto`` chooses among: chains of 1 .. ``max_chain`` and every tree of the given depths,
    widths and sizes that can hold that many nodes (a size above the nodes a tree grows adds nothing)."""
    shapes = [DecodingShape.chain(k) for k in range(1, max_chain + 1)]
    for top_k in top_ks:
        for depth in depths:
            grown = top_k + (depth - 1) * top_k * top_k  # nodes the growth offers (draft_tree.py)
            shapes += [DecodingShape.of_tree(TreeShape(depth, top_k, size)) for size in sizes
                       if depth <= size <= grown and size > top_k // 2]
    return shapes


@dataclass
class RoundCosts:
    """What a machine charges, in milliseconds, measured in the target's dtype (``round_costs.py``).

    verify_ms: ``{n: ms}`` a target forward of ``n`` new positions after a cached prompt, a causal chain (n = 1
        is what plain decoding pays per token), with the cache crop a round does after it.
    tree_verify_ms: ``{n: ms}`` the same for ``n`` positions under a tree mask, with ``keep_branch``.
    draft_ms: ``{DecodingShape.draft_key: ms}`` drafting one round of that chain or tree.
    prefill_ms: the target's prefill of a typical prompt (paid alike by plain and speculative decoding).
    plain_ms: a token of real plain decoding, when measured (``auto_shape.confirm_by_decoding``); else ``verify_ms[1]``.
    """

    verify_ms: dict[int, float]
    tree_verify_ms: dict[int, float] = field(default_factory=dict)
    draft_ms: dict[str, float] = field(default_factory=dict)
    prefill_ms: float = 0.0
    plain_ms: float | None = None

    def round_ms(self, shape: DecodingShape) -> float:
        """One round of ``shape``: drafting and verifying (plain: one forward of one token)."""
        if shape.kind == "plain":
            return self.verify_ms[1]
        return self.verify_curve(shape)[shape.verified] + self.draft_ms[shape.draft_key]

    def verify_curve(self, shape: DecodingShape) -> dict[int, float]:
        """The verification costs that apply to ``shape``: the tree-masked ones for a tree."""
        return self.tree_verify_ms if shape.kind == "tree" else self.verify_ms

    def measured(self, shape: DecodingShape) -> bool:
        """Whether every cost ``round_ms(shape)`` needs was measured."""
        drafted = shape.kind == "plain" or shape.draft_key in self.draft_ms
        return shape.verified in self.verify_curve(shape) and drafted

    def to_dict(self) -> dict:
        one = self.verify_ms[1]

        def per_one(curve: dict[int, float]) -> dict[str, float]:
            return {str(n): round(ms / one, 3) for n, ms in sorted(curve.items())}

        return {"verify_ms": {str(n): round(ms, 3) for n, ms in sorted(self.verify_ms.items())},
                "verify_cost_vs_one": per_one(self.verify_ms), "tree_verify_cost_vs_one": per_one(self.tree_verify_ms),
                "draft_ms": {k: round(ms, 3) for k, ms in self.draft_ms.items()},
                "prefill_ms": round(self.prefill_ms, 3),
                "plain_ms": None if self.plain_ms is None else round(self.plain_ms, 3)}


@dataclass
class ShapeEstimate:
    """One candidate: its acceptance length (tokens a round, the bonus token included), the time of a round and
    the speed-up over plain decoding this predicts for a decode of ``new_tokens``."""

    shape: DecodingShape
    acceptance_length: float
    round_ms: float
    predicted_speedup: float
    confirmed: bool = False
    """Whether ``round_ms`` was measured by real decoding rather than summed from its parts."""

    def to_dict(self) -> dict:
        return {"shape": str(self.shape), "acceptance_length": round(self.acceptance_length, 3),
                "round_ms": round(self.round_ms, 3), "predicted_speedup": round(self.predicted_speedup, 3),
                "round_ms_measured_by_decoding": self.confirmed}


@dataclass(frozen=True)
class ChoiceConfig:
    """How ``choose_shape`` decides."""

    margin: float = 1.05
    """A shape is chosen only if its predicted speed-up is at least this: below it, the prediction's own error
    (timing noise, a draft that accepts less on other prompts) could make speculation the slower choice."""
    new_tokens: int = 64
    """The decode length the prediction is for: the prefill, paid by both sides, weighs more on short decodes."""


def predicted_speedup(acceptance_length: float, round_ms: float, costs: RoundCosts, new_tokens: int) -> float:
    """Plain decoding's time over speculative decoding's for ``new_tokens`` after a prefill: the first token comes
    from the prefill on both sides; the rest take ``new_tokens - 1`` plain steps, or that many over the
    acceptance length rounds."""
    rest = max(new_tokens - 1, 1)
    plain = costs.prefill_ms + rest * (costs.plain_ms or costs.verify_ms[1])
    return plain / (costs.prefill_ms + rest / max(acceptance_length, 1e-9) * round_ms)


@dataclass
class ShapeChoice:
    """What ``choose_shape`` decided and why: every candidate's estimate, best first, and the chosen one
    (``PLAIN`` when no shape clears the margin)."""

    chosen: DecodingShape
    predicted_speedup: float
    estimates: list[ShapeEstimate]
    costs: RoundCosts
    margin: float
    calibration: dict = field(default_factory=dict)
    """How the acceptance was estimated (prompts, tokens, seconds), when ``auto_shape`` made the choice."""

    @property
    def best_speculative(self) -> ShapeEstimate | None:
        return self.estimates[0] if self.estimates else None

    def reason(self) -> str:
        best = self.best_speculative
        if self.chosen.kind == "plain":
            if best is None:
                return "plain decoding: no candidate shape"
            return (f"plain decoding: no shape pays on this machine (best: {best.shape}, predicted "
                    f"{best.predicted_speedup:.2f}x, acceptance {best.acceptance_length:.2f}; a shape needs "
                    f"{self.margin:.2f}x)")
        return (f"{self.chosen}: predicted {self.predicted_speedup:.2f}x at acceptance "
                f"{best.acceptance_length:.2f} (verifying {self.chosen.verified} tokens costs "
                f"{self.costs.verify_curve(self.chosen)[self.chosen.verified] / self.costs.verify_ms[1]:.2f}x one)")

    def to_dict(self, top: int = 8) -> dict:
        return {"chosen": str(self.chosen), "predicted_speedup": round(self.predicted_speedup, 3),
                "margin": self.margin, "reason": self.reason(), "costs": self.costs.to_dict(),
                "candidates": [e.to_dict() for e in self.estimates[:top]], "calibration": self.calibration}


def choose_shape(acceptance: dict[DecodingShape, float], costs: RoundCosts,
                 config: ChoiceConfig = ChoiceConfig()) -> ShapeChoice:
    """The shape of ``acceptance`` (``{shape: acceptance length}``, tokens a round) with the highest predicted
    speed-up under ``costs``; ``PLAIN`` unless that speed-up reaches ``config.margin``. Shapes whose costs were
    not measured are skipped."""
    estimates = []
    for shape, length in acceptance.items():
        if shape.kind == "plain" or not costs.measured(shape):
            continue
        round_ms = costs.round_ms(shape)
        estimates.append(ShapeEstimate(shape, length, round_ms,
                                       predicted_speedup(length, round_ms, costs, config.new_tokens)))
    estimates.sort(key=lambda e: -e.predicted_speedup)
    if estimates and estimates[0].predicted_speedup >= config.margin:
        return ShapeChoice(estimates[0].shape, estimates[0].predicted_speedup, estimates, costs, config.margin)
    return ShapeChoice(PLAIN, 1.0, estimates, costs, config.margin)
