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
from tandem.speculative.decoding.decode import for_decoding, greedy_decode, speculative_decode
from tandem.speculative.decoding.evaluation import target_aux_states
from tandem.speculative.decoding.round_costs import measure_round_costs
from tandem.speculative.decoding.shape_choice import (
    PLAIN,
    ChoiceConfig,
    DecodingShape,
    ShapeChoice,
    candidate_shapes,
    choose_shape,
    predicted_speedup,
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


def _ms_per_step(results, prefill_ms: float) -> float:
    """Milliseconds a verifying forward (a round, or a plain token) of decodes, their prefills taken out."""
    steps = sum(r.target_forwards - 1 for r in results)
    return max(sum(r.wall_s for r in results) * 1e3 - len(results) * prefill_ms, 1e-6) / max(steps, 1)


def confirm_by_decoding(target, draft, choice: ShapeChoice, prompts: list[torch.Tensor], max_new_tokens: int,
                        stop_ids: set[int], config: ChoiceConfig, top: int = 3) -> ShapeChoice:
    """Decode ``prompts`` plainly and with the ``top`` best shapes for real, interleaved: their measured time a
    round (Python, the commit step and the bookkeeping included, which the sum of parts misses) and a plain
    token's replace the estimates, and the choice is made again among the confirmed shapes."""
    decoding = for_decoding(draft, target.dtype)
    candidates = choice.estimates[:top]
    plain, rounds = [], {e.shape: [] for e in candidates}
    for prompt in prompts:
        plain.append(greedy_decode(target, prompt, max_new_tokens, stop_ids))
        for e in candidates:
            kwargs = {"tree": e.shape.tree} if e.shape.kind == "tree" else {"num_draft_tokens": e.shape.draft_tokens}
            rounds[e.shape].append(speculative_decode(target, decoding, prompt, max_new_tokens, stop_ids=stop_ids,
                                                      **kwargs))
    costs = choice.costs
    costs.plain_ms = _ms_per_step(plain, costs.prefill_ms)
    for e in candidates:
        e.round_ms, e.confirmed = _ms_per_step(rounds[e.shape], costs.prefill_ms), True
        e.predicted_speedup = predicted_speedup(e.acceptance_length, e.round_ms, costs, config.new_tokens)
    confirmed = sorted(candidates, key=lambda e: -e.predicted_speedup)
    estimates = confirmed + [e for e in choice.estimates if not e.confirmed]
    if confirmed and confirmed[0].predicted_speedup >= config.margin:
        return ShapeChoice(confirmed[0].shape, confirmed[0].predicted_speedup, estimates, costs, config.margin)
    return ShapeChoice(PLAIN, 1.0, estimates, costs, config.margin)


def auto_shape(target, draft, prompts: list[torch.Tensor], max_new_tokens: int, stop_ids: set[int],
               shapes: list[DecodingShape] | None = None, config: ChoiceConfig | None = None,
               confirm: int = 2) -> ShapeChoice:
    """Choose the decoding shape for ``draft`` on ``target`` from the calibration ``prompts`` (``[1, S]`` long
    each), for decodes of ``max_new_tokens``; ``shapes`` default to ``candidate_shapes()``; the best three are
    then decoded for real on the first ``confirm`` prompts (``confirm_by_decoding``; 0: not)."""
    started = time.perf_counter()
    shapes = shapes if shapes is not None else candidate_shapes()
    config = config or ChoiceConfig(new_tokens=max_new_tokens)
    choice = choose_for(target, draft, continuations(target, prompts, max_new_tokens, stop_ids), shapes, config)
    if confirm:
        choice = confirm_by_decoding(target, draft, choice, prompts[:confirm], max_new_tokens, stop_ids, config)
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
