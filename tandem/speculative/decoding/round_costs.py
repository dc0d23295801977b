"""What a speculative round costs on this machine, in this dtype: the curve ``auto`` chooses shapes from.

Each figure is timed through the same calls decoding makes, on a real prompt and the target's own greedy
continuation of it (verifying what the target would say keeps its logits as peaked as in real decoding): a
verification is ``session.extend`` of ``n`` tokens (a causal chain, or a tree under its mask) followed by
the bookkeeping its round does (``crop``, or ``keep_branch`` for a tree); a drafting round is
``decode._draft_chain`` or ``tree.draft_tree`` from two committed tokens, as after a round that accepted
one. Cases run interleaved, one run of each in turn, and each figure is a median, so another job on a
shared machine slows all of them alike. Through a remote target the verification includes the HTTP round
trip, as it does in the decode.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from tandem.speculative.decoding.decode import _draft_chain
from tandem.speculative.decoding.shape_choice import DecodingShape, RoundCosts
from tandem.speculative.decoding.tree import TreeShape, draft_tree
from tandem.speculative.drafts.eagle3 import DraftKVCache, Eagle3DraftModel


def interleaved_medians(cases: dict[str, Callable[[], None]], runs: int, warmup: int = 1) -> dict[str, float]:
    """``{name: median seconds}`` of ``runs`` calls of each case, one of each in turn, after ``warmup`` rounds."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for index in range(warmup + runs):
        for name, case in cases.items():
            started = time.perf_counter()
            case()
            if index >= warmup:
                times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def _verify_case(session, base: int, tokens: torch.Tensor, tree: bool) -> Callable[[], None]:
    """A verification of ``tokens [1, n]`` after ``base`` cached positions, and its round's bookkeeping."""
    n = tokens.shape[1]
    parents = [-1] + [(i - 1) // 2 for i in range(1, n)] if tree else None  # any tree of n nodes costs alike

    def run() -> None:
        session.extend(tokens, parents)
        if tree:
            session.keep_branch(base, [0, 1] if n > 1 else [0])
        session.crop(base)
    return run


def _draft_case(draft: Eagle3DraftModel, cache: DraftKVCache, pending: tuple,
                shape: DecodingShape) -> Callable[[], None]:
    """One drafting round of ``shape`` from the committed ``pending`` tokens, the draft cache restored after."""
    start = pending[2]

    def run() -> None:
        if shape.kind == "chain":
            _draft_chain(draft, *pending, cache, shape.draft_tokens)
        else:
            draft_tree(draft, *pending, cache, int(pending[0][0, -1]), TreeShape(shape.tree.depth, shape.tree.top_k, 1))
        cache.crop(start)
    return run


def _non_decreasing(curve: dict[int, float]) -> dict[int, float]:
    """``curve`` with each cost raised to the highest below it: verifying more tokens never costs less, and a dip
    is timing noise (another job on the machine) that would otherwise pick a shape for its luck."""
    out, highest = {}, 0.0
    for n in sorted(curve):
        highest = max(highest, curve[n])
        out[n] = highest
    return out


@torch.no_grad()
def measure_round_costs(target, draft: Eagle3DraftModel, prompt: torch.Tensor, continuation: list[int],
                        shapes: list[DecodingShape], runs: int = 5) -> RoundCosts:
    """Time, on ``target`` (anything with ``decode_session()``) and ``draft`` (in the target's dtype), what the
    rounds of ``shapes`` cost after ``prompt [1, S]`` long and the first tokens of ``continuation`` (the target's
    greedy continuation of it; repeated when shorter than the largest verification)."""
    device = target.device
    largest = max(s.verified for s in shapes)
    context = min(16, max(len(continuation) - 2, 0))
    needed = context + 2 + largest
    answer = (continuation * (needed // max(len(continuation), 1) + 1))[:needed]
    ids = torch.cat([prompt.to(device), torch.tensor([answer[:context]], device=device)], dim=1)
    verified = torch.tensor([answer[context:]], device=device)
    session = target.decode_session()
    try:
        started = time.perf_counter()
        step = session.extend(ids)
        prefill_ms = (time.perf_counter() - started) * 1e3
        base = session.length
        # The draft as decoding leaves it after the prefill, then two committed tokens pending.
        cache = DraftKVCache()
        positions = torch.arange(base - 1, device=device).unsqueeze(0)
        draft.step(ids[:, 1:], draft.project_aux(step.aux_hidden_states[:, :-1].to(device)), positions, kv_cache=cache)
        pending = (verified[:, :2], step.aux_hidden_states[:, -2:].to(device), cache.length)
        cases = {}
        chains = sorted({s.verified for s in shapes if s.kind == "chain"} | {1})
        trees = sorted({s.verified for s in shapes if s.kind == "tree"})
        cases.update({f"verify {n}": _verify_case(session, base, verified[:, :n], False) for n in chains})
        cases.update({f"tree verify {n}": _verify_case(session, base, verified[:, :n], True) for n in trees})
        keys = {s.draft_key: s for s in shapes if s.kind != "plain"}
        cases.update({f"draft {key}": _draft_case(draft, cache, pending, s) for key, s in keys.items()})
        medians = interleaved_medians(cases, runs)
    finally:
        session.close()
    return RoundCosts(verify_ms=_non_decreasing({n: medians[f"verify {n}"] * 1e3 for n in chains}),
                      tree_verify_ms=_non_decreasing({n: medians[f"tree verify {n}"] * 1e3 for n in trees}),
                      draft_ms={key: medians[f"draft {key}"] * 1e3 for key in keys}, prefill_ms=prefill_ms)
