"""``--tree auto`` / ``--draft-tokens auto``: measure this machine and this draft, then choose the decoding shape.

Three steps, each in its own module: the draft's acceptance length for every candidate shape on a few
calibration prompts (``acceptance_profile.py``: one plain decode and one target forward a prompt, then draft
forwards only), the cost of each shape's round here, in the target's dtype (``round_costs.py``), and the
choice that maximises expected tokens per second, or plain decoding when nothing clears the margin
(``shape_choice.py``). The calibration prompts should not be the ones the evaluation then scores: the
prediction is checked against the measured speed-up, and choosing on the scored prompts would flatter it.
"""

from __future__ import annotations

import logging
import time

import torch

from tandem.speculative.decoding.acceptance_profile import Continuation, acceptance_lengths
from tandem.speculative.decoding.decode import for_decoding, greedy_decode
from tandem.speculative.decoding.evaluation import target_aux_states
from tandem.speculative.decoding.round_costs import measure_round_costs
from tandem.speculative.decoding.shape_choice import (
    ChoiceConfig,
    DecodingShape,
    ShapeChoice,
    candidate_shapes,
    choose_shape,
)

logger = logging.getLogger(__name__)

AUTO = "auto"


def continuations(target, prompts: list[torch.Tensor], max_new_tokens: int, stop_ids: set[int]) -> list[Continuation]:
    """Each prompt ``[1, S]`` long with the target's greedy continuation and the aux states of both."""
    sequences = []
    for prompt in prompts:
        tokens = greedy_decode(target, prompt, max_new_tokens, stop_ids).tokens
        ids = torch.cat([prompt.to(target.device), torch.tensor([tokens], device=target.device)], dim=1)
        sequences.append(Continuation(ids, target_aux_states(target, ids), prompt.shape[1]))
    return sequences


def choose_for(target, draft, sequences: list[Continuation], shapes: list[DecodingShape],
               config: ChoiceConfig = ChoiceConfig(), runs: int = 5, costs=None) -> ShapeChoice:
    """Estimate every shape's acceptance on ``sequences``, measure the round costs (unless ``costs`` were measured
    already: the target's do not change while a draft trains) and choose."""
    decoding = for_decoding(draft, target.dtype)
    acceptance = acceptance_lengths(decoding, sequences, shapes)
    if costs is None:
        first = sequences[0]
        costs = measure_round_costs(target, decoding, first.ids[:, :first.prompt_length],
                                    first.ids[0, first.prompt_length:].tolist(), shapes, runs)
    return choose_shape(acceptance, costs, config)


def auto_shape(target, draft, prompts: list[torch.Tensor], max_new_tokens: int, stop_ids: set[int],
               shapes: list[DecodingShape] | None = None, config: ChoiceConfig | None = None) -> ShapeChoice:
    """Choose the decoding shape for ``draft`` on ``target`` from the calibration ``prompts`` (``[1, S]`` long
    each), for decodes of ``max_new_tokens``; ``shapes`` default to ``candidate_shapes()``."""
    started = time.perf_counter()
    shapes = shapes if shapes is not None else candidate_shapes()
    config = config or ChoiceConfig(new_tokens=max_new_tokens)
    choice = choose_for(target, draft, continuations(target, prompts, max_new_tokens, stop_ids), shapes, config)
    choice.calibration = {"prompts": len(prompts), "max_new_tokens": max_new_tokens, "shapes": len(shapes),
                          "seconds": round(time.perf_counter() - started, 1)}
    logger.info("decoding shape: %s (calibrated on %d prompts in %.1f s)", choice.reason(), len(prompts),
                time.perf_counter() - started)
    return choice


def format_cost_curve(choice: ShapeChoice) -> str:
    """The measured costs as lines: verifying n tokens against one, the drafting rounds, the best candidates."""
    costs = choice.costs
    one = costs.verify_ms[1]
    chain = ", ".join(f"{n}: {ms / one:.2f}" for n, ms in sorted(costs.verify_ms.items()))
    tree = ", ".join(f"{n}: {ms / one:.2f}" for n, ms in sorted(costs.tree_verify_ms.items()))
    drafts = ", ".join(f"{key} {ms / one:.2f}" for key, ms in costs.draft_ms.items())
    best = "; ".join(f"{e.shape} {e.acceptance_length:.2f} tok/round -> {e.predicted_speedup:.2f}x"
                     for e in choice.estimates[:5])
    return (f"cost of verifying n tokens / one token ({one:.1f} ms): chain {chain}" + (f"; tree {tree}" if tree else "")
            + f"\ndrafting a round / one target token: {drafts}\nbest candidates: {best}\nchosen: {choice.reason()}")
