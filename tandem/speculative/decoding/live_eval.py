"""The real acceptance length while training: speculative decoding of held-out prompts every N steps.

The training metrics give a proxy (per-step accuracy and a simulated acceptance length); what users judge a
draft by is the acceptance length of real speculative decoding on prompts it never saw. :class:`LiveEvaluator`
measures that against the run's own target (in-process, or a server through ``/verify``) with the same decoder
as ``tandem eval``. What depends on the frozen target alone (greedy references, their aux states) is computed
once. Training is not disturbed: a run with ``--eval-every`` ends with the same weights, bit for bit (tested).

    tandem train --data chat.jsonl --eval-every 100 --eval-limit 8 --eval-tree 3,8,24
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from tandem.speculative.decoding.decode import DecodeResult, for_decoding, greedy_decode, speculative_decode
from tandem.speculative.decoding.evaluation import continuation_hits, summarize, target_aux_states
from tandem.speculative.decoding.recurrent_state import check_tree_support

logger = logging.getLogger(__name__)


@dataclass
class _Reference:
    """One prompt's fixed part: the prompt ``[1, S]``, the target's greedy decode, prompt + continuation ids
    ``[1, S + T]`` and their aux states ``[1, S + T, 3H]``."""

    prompt: torch.Tensor
    greedy: DecodeResult
    ids: torch.Tensor
    aux: torch.Tensor


class LiveEvaluator:
    """Measures a draft by real speculative decoding of ``prompts`` against ``target`` (see the module docstring).

    Arguments:
        target: an ``Eagle3TargetModel`` or ``RemoteEagle3TargetModel`` (anything with ``decode_session()``).
        prompts: ``[1, S]`` long each, rendered up to the first assistant turn (``data.prompt_ids``).
        max_new_tokens: tokens decoded a prompt.
        num_draft_tokens: the longest draft chain a round; min_confidence: dynamic draft length (``decode.py``).
        stop_ids: token ids that end a decode (the tokenizer's end of turn).
        tree: draft trees of this shape instead of chains (``draft_tree.TreeShape``), or ``"auto"``: each
            evaluation chooses the shape (``auto_shape.py``) from the round costs (measured once: the target's do
            not change) and the current draft's acceptance on these prompts' references, and decodes with the best
            speculative one, so that the measured acceptance keeps its meaning when plain decoding would pay more.
    """

    def __init__(self, target, prompts: list[torch.Tensor], max_new_tokens: int = 64, num_draft_tokens: int = 4,
                 min_confidence: float = 0.0, stop_ids: set[int] = frozenset(), tree=None):
        if not prompts:
            raise ValueError("live evaluation needs at least one prompt")
        check_tree_support(target, tree)  # before training starts, not at its first evaluation
        self.target = target
        self.prompts = prompts
        self.max_new_tokens = max_new_tokens
        self.num_draft_tokens = num_draft_tokens
        self.min_confidence = min_confidence
        self.tree = tree
        self.stop_ids = set(stop_ids)
        self._references: list[_Reference] | None = None
        self._costs = None  # the round costs, measured at the first evaluation with tree "auto"
        self.reference_s = 0.0
        """Seconds the one-off part took (greedy decodes and aux states of every prompt)."""

    def _reference_set(self) -> list[_Reference]:
        if self._references is None:
            started = time.perf_counter()
            references = []
            for prompt in self.prompts:
                greedy = greedy_decode(self.target, prompt, self.max_new_tokens, self.stop_ids)
                ids = torch.cat([prompt.to(self.target.device),
                                 torch.tensor([greedy.tokens], device=self.target.device)], 1)
                references.append(_Reference(prompt, greedy, ids, target_aux_states(self.target, ids)))
            self._references = references
            self.reference_s = time.perf_counter() - started
        return self._references

    @torch.no_grad()
    def measure(self, draft) -> dict:
        """Decode every prompt with ``draft``; the figures for ``metrics.jsonl`` (all prefixed ``eval_``):
        ``acceptance_length`` (new tokens per verifying target forward, prefill excluded), ``step0_accuracy``
        (teacher-forced, on the target's own continuations), ``outputs_match`` (every output equal to greedy
        decoding up to near-ties of the target dtype), ``prompts``, ``new_tokens`` and ``s`` (seconds, the
        one-off reference included the first time)."""
        started = time.perf_counter()
        references = self._reference_set()
        was_training = draft.training
        decoding = for_decoding(draft, self.target.dtype)
        try:
            chain, tree, chosen = self.num_draft_tokens, self.tree, {}
            if self.tree == "auto":
                chain, tree, chosen = self._choose(decoding, references)
            results = [speculative_decode(self.target, decoding, r.prompt, self.max_new_tokens, chain,
                                          self.stop_ids, self.min_confidence, tree) for r in references]
            counts = [continuation_hits(self.target, decoding, r.prompt.shape[1], r.ids, r.aux) for r in references]
            hits, total = sum(c[0] for c in counts), sum(c[1] for c in counts)
        finally:
            draft.train(was_training)
        summary = summarize([r.greedy for r in references], results)
        return {
            "eval_acceptance_length": summary.acceptance_length,
            "eval_step0_accuracy": hits / max(total, 1),
            "eval_outputs_match": summary.exact_up_to_ties,
            "eval_prompts": summary.prompts,
            "eval_new_tokens": summary.new_tokens,
            "eval_s": time.perf_counter() - started,
            **chosen,
        }

    def _choose(self, decoding, references: list[_Reference]) -> tuple[int, object, dict]:
        """``(chain length, tree or None, metrics)`` of the best speculative shape for ``decoding`` now."""
        from tandem.speculative.decoding.acceptance_profile import Continuation
        from tandem.speculative.decoding.auto_shape import choose_for
        from tandem.speculative.decoding.shape_choice import ChoiceConfig, candidate_shapes

        sequences = [Continuation(r.ids, r.aux, r.prompt.shape[1]) for r in references]
        choice = choose_for(self.target, decoding, sequences, candidate_shapes(),
                            ChoiceConfig(new_tokens=self.max_new_tokens), costs=self._costs)
        self._costs = choice.costs
        best = choice.best_speculative
        metrics = {"eval_shape": str(choice.chosen), "eval_decoded_shape": str(best.shape),
                   "eval_predicted_speedup": best.predicted_speedup}
        if best.shape.kind == "tree":
            return self.num_draft_tokens, best.shape.tree, metrics
        return best.shape.draft_tokens, None, metrics
