"""The real acceptance length of a DFlash draft while training (``tandem train --method dflash --eval-every N``).

The DFlash counterpart of ``live_eval.LiveEvaluator``: every N steps the current draft decodes the held-out
prompts by real DFlash speculative decoding (``dflash_decode``, the decoder ``tandem eval`` runs) against the run's
own target, in-process or through a server's ``/verify``, at the trained block size; the target's greedy decodes
of the prompts, which the frozen target alone decides, are computed once. Training is not disturbed: the draft is
decoded in eval mode under no gradients and handed back in training mode, and the caller forks the RNG.
"""

from __future__ import annotations

import time

import torch

from tandem.speculative.decoding.decode import DecodeResult, greedy_decode
from tandem.speculative.decoding.dflash_decode import dflash_decode, dflash_for_decoding
from tandem.speculative.decoding.evaluation import summarize


class DFlashLiveEvaluator:
    """Measures a DFlash draft by real speculative decoding of ``prompts`` (``[1, S]`` long each) against ``target``
    (an ``Eagle3TargetModel`` capturing the draft's layers, or a remote client), ``max_new_tokens`` a prompt, at
    decode-time block ``block_size`` (None: the draft's trained one)."""

    def __init__(self, target, prompts: list[torch.Tensor], max_new_tokens: int = 64, block_size: int | None = None,
                 stop_ids: set[int] = frozenset()):
        if not prompts:
            raise ValueError("live evaluation needs at least one prompt")
        self.target, self.prompts, self.max_new_tokens = target, prompts, max_new_tokens
        self.block_size, self.stop_ids = block_size, set(stop_ids)
        self._greedy: list[DecodeResult] | None = None
        self.reference_s = 0.0
        """Seconds the one-off greedy decodes took."""

    def _references(self) -> list[DecodeResult]:
        if self._greedy is None:
            started = time.perf_counter()
            self._greedy = [greedy_decode(self.target, p, self.max_new_tokens, self.stop_ids) for p in self.prompts]
            self.reference_s = time.perf_counter() - started
        return self._greedy

    @torch.no_grad()
    def measure(self, draft) -> dict:
        """Decode every prompt with ``draft``; the ``metrics.jsonl`` figures (prefixed ``eval_``): acceptance length,
        whether every output equals greedy decoding up to near-ties, prompts, new tokens, block size and seconds."""
        started = time.perf_counter()
        greedy = self._references()
        was_training = draft.training
        try:
            decoding = dflash_for_decoding(draft, self.target.dtype)
            block = self.block_size or decoding.config.block_size
            results = [dflash_decode(self.target, decoding, p, self.max_new_tokens, block, self.stop_ids)
                       for p in self.prompts]
        finally:
            draft.train(was_training)
        summary = summarize(greedy, results)
        return {"eval_acceptance_length": summary.acceptance_length, "eval_outputs_match": summary.exact_up_to_ties,
                "eval_prompts": summary.prompts, "eval_new_tokens": summary.new_tokens, "eval_block_size": block,
                "eval_s": time.perf_counter() - started}
