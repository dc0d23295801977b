"""Measuring a draft: real speculative decoding against plain greedy decoding over a prompt set.

What users judge a draft by is the measured acceptance length (tokens per verifying target forward) and the
wall-clock speed-up, with every output checked against the target's own greedy output; teacher-forced
first-proposal accuracy tells a draft that learned the target from one that memorised its data.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from tandem.speculative.decoding.decode import DecodeResult, for_decoding, greedy_decode, speculative_decode
from tandem.speculative.decoding.tree import TreeShape
from tandem.speculative.drafts.eagle3 import DraftKVCache, Eagle3DraftModel
from tandem.speculative.target.model import Eagle3TargetModel

logger = logging.getLogger(__name__)


@dataclass
class EvalSummary:
    """Measured over a prompt set: acceptance length (tokens per verifying target forward, prefill
    excluded on both sides), wall-clock speed-up over plain greedy decoding, and whether every output
    equalled the target's greedy output."""

    prompts: int
    new_tokens: int
    acceptance_length: float
    speedup: float
    outputs_match: bool
    greedy_tokens_per_s: float
    speculative_tokens_per_s: float
    diverged: int = 0
    """Prompts whose speculative output differs from the plain greedy one."""
    diverged_at_ties: int = 0
    """Of those, the ones that first differ at a token whose top two logits were a near-tie in the target
    dtype (``verification.near_tie_mask``): rounding, not a decoding error. ``exact_up_to_ties`` says all were."""

    @property
    def exact_up_to_ties(self) -> bool:
        return self.diverged == self.diverged_at_ties

    def to_dict(self) -> dict:
        return {**self.__dict__, "exact_up_to_ties": self.exact_up_to_ties}


def summarize(greedy_results: list[DecodeResult], spec_results: list[DecodeResult]) -> EvalSummary:
    """Acceptance length and speed-up of one draft's decodes against plain decodes of the same prompts."""
    # Both sides generate the first token in the prefill; acceptance counts the forwards after it.
    new_tokens = sum(len(r.tokens) - 1 for r in spec_results)
    verify_forwards = sum(r.target_forwards - 1 for r in spec_results)
    greedy_time = sum(r.wall_s for r in greedy_results)
    spec_time = sum(r.wall_s for r in spec_results)
    total_tokens = sum(len(r.tokens) for r in spec_results)
    diverged = [(g, s) for g, s in zip(greedy_results, spec_results) if g.tokens != s.tokens]
    return EvalSummary(
        prompts=len(spec_results),
        new_tokens=total_tokens,
        acceptance_length=new_tokens / max(verify_forwards, 1),
        speedup=greedy_time / max(spec_time, 1e-9),
        outputs_match=all(g.tokens == s.tokens for g, s in zip(greedy_results, spec_results)),
        greedy_tokens_per_s=sum(len(r.tokens) for r in greedy_results) / max(greedy_time, 1e-9),
        speculative_tokens_per_s=total_tokens / max(spec_time, 1e-9),
        diverged=len(diverged),
        diverged_at_ties=sum(_first_divergence_is_a_tie(g, s) for g, s in diverged),
    )


def _first_divergence_is_a_tie(greedy: DecodeResult, spec: DecodeResult) -> bool:
    """Whether the first token where the decodes part was a near-tie in either forward that chose it: the plain
    1-token forward and the verification compute that position with different kernels, and either may be the
    one whose top two logits fell within the dtype's rounding."""
    index = next((i for i, (a, b) in enumerate(zip(greedy.tokens, spec.tokens)) if a != b), None)
    if index is None:  # one is a prefix of the other: not a tie's doing
        return False
    return any(r.near_ties is not None and r.near_ties[index] for r in (greedy, spec))


def evaluate_drafts(target: Eagle3TargetModel, drafts: dict[str, Eagle3DraftModel], prompts: list[torch.Tensor],
                    max_new_tokens: int = 64, num_draft_tokens: int = 4, stop_ids: set[int] = frozenset(),
                    progress: bool = True, min_confidence: float = 0.0,
                    greedy_results: list[DecodeResult] | None = None,
                    tree: TreeShape | None = None, deadline: float | None = None,
                    min_prompts: int = 1) -> dict[str, EvalSummary]:
    """Decode every prompt (``[1, S]`` long each) plainly and with each draft, and compare.

    The decodes of one prompt run back to back (plain, then each draft), so a shared, noisy machine
    slows every side of a comparison alike: the speed-ups are ratios taken at the same moment.
    ``greedy_results``: a list to receive the plain decodes (for a caller that needs the target's greedy
    continuations too, without decoding them again). ``tree``: draft trees of that shape instead of chains.
    ``deadline``: a ``time.perf_counter()`` after which no further prompt is started once ``min_prompts`` are
    done (a time-boxed evaluation; the summaries count the prompts decoded).
    """
    from tqdm.auto import tqdm

    drafts = {name: for_decoding(draft, target.dtype) for name, draft in drafts.items()}
    greedy: list[DecodeResult] = [] if greedy_results is None else greedy_results
    speculative: dict[str, list[DecodeResult]] = {name: [] for name in drafts}
    for done, prompt in enumerate(tqdm(prompts, desc="decode", unit="prompt", disable=not progress, leave=False)):
        if deadline is not None and done >= min_prompts and time.perf_counter() > deadline:
            logger.warning("evaluation time is up: %d of %d prompts decoded", done, len(prompts))
            break
        greedy.append(greedy_decode(target, prompt, max_new_tokens, stop_ids))
        for name, draft in drafts.items():
            speculative[name].append(speculative_decode(target, draft, prompt, max_new_tokens, num_draft_tokens,
                                                        stop_ids,
                                                        min_confidence, tree))
    return {name: summarize(greedy, results) for name, results in speculative.items()}


def evaluate_speculative(target: Eagle3TargetModel, draft: Eagle3DraftModel, prompts: list[torch.Tensor],
                         max_new_tokens: int = 64, num_draft_tokens: int = 4, stop_ids: set[int] = frozenset(),
                         progress: bool = True, min_confidence: float = 0.0,
                         tree: TreeShape | None = None) -> EvalSummary:
    """``evaluate_drafts`` for a single draft."""
    return evaluate_drafts(target, {"draft": draft}, prompts, max_new_tokens, num_draft_tokens, stop_ids,
                           progress, min_confidence, tree=tree)["draft"]


@torch.no_grad()
def teacher_forced_proposals(target, draft: Eagle3DraftModel, ids: torch.Tensor,
                             aux_hidden_states: torch.Tensor | None = None) -> torch.Tensor:
    """
    The draft's first proposal after every prefix of ``ids``, all in one target and one draft forward.

    Arguments:
        ids: ``[1, S]`` long, a token sequence (S >= 2).
        aux_hidden_states: ``[1, S, 3H]`` the target's aux states of ``ids`` when the caller has them (the
            target is frozen: they never change); None runs the target.

    Returns:
        proposals: ``[S - 1]`` long target token ids; entry ``i`` is what ``speculative_decode`` would propose
        first with ``ids[:, : i + 2]`` committed (the draft reads token ``i + 1`` and the target's aux
        hidden states up to position ``i``), i.e. its guess for token ``i + 2``. The last entry guesses
        past the end of ``ids``.
    """
    ids = ids.to(target.device)
    aux = target_aux_states(target, ids) if aux_hidden_states is None else aux_hidden_states.to(target.device)
    positions = torch.arange(ids.shape[1] - 1, device=ids.device).unsqueeze(0)
    hidden = draft.step(ids[:, 1:], draft.project_aux(aux[:, :-1]), positions, kv_cache=DraftKVCache())
    return draft.draft_to_target(draft.logits(hidden)[0].argmax(-1))


@torch.no_grad()
def target_aux_states(target, ids: torch.Tensor) -> torch.Tensor:
    """``[1, S, 3H]`` the target's aux hidden states of ``ids [1, S]`` long (one forward, through a decode session)."""
    session = target.decode_session()
    try:
        return session.extend(ids).aux_hidden_states
    finally:
        session.close()


def teacher_forced_accuracy(target: Eagle3TargetModel, draft: Eagle3DraftModel, prompts: list[torch.Tensor],
                            max_new_tokens: int = 64, stop_ids: set[int] = frozenset(),
                            continuations: list[list[int]] | None = None) -> float:
    """
    How often the draft's first proposal is the target's greedy next token, over the target's own greedy
    continuations of ``prompts`` (each ``[1, S]`` long): the training metric "step-0 accuracy", measured
    on any prompts. On held-out prompts it tells generalisation from memorisation: a draft that has
    learned its training conversations by heart scores far higher on them than on new ones.
    ``continuations``: the prompts' greedy continuations when already decoded (else decoded here).
    """
    draft = for_decoding(draft, target.dtype)
    hits = total = 0
    for index, prompt in enumerate(prompts):
        if continuations is not None:
            continuation = continuations[index]
        else:
            continuation = greedy_decode(target, prompt, max_new_tokens, stop_ids).tokens
        ids = torch.cat([prompt.to(target.device), torch.tensor([continuation], device=target.device)], dim=1)
        got, of = continuation_hits(target, draft, prompt.shape[1], ids)
        hits, total = hits + got, total + of
    return hits / max(total, 1)


def continuation_hits(target, draft: Eagle3DraftModel, prompt_length: int, ids: torch.Tensor,
                      aux_hidden_states: torch.Tensor | None = None) -> tuple[int, int]:
    """``(right, guessed)``: of the draft's first proposals for the tokens of a greedy continuation after its
    first (which the prefill produces, not a draft), how many are the continuation's token.

    ``ids``: ``[1, S + T]`` long, a prompt of ``prompt_length`` tokens and the target's greedy continuation;
    ``aux_hidden_states``: their ``[1, S + T, 3H]`` aux states if known (see ``teacher_forced_proposals``)."""
    proposals = teacher_forced_proposals(target, draft, ids, aux_hidden_states)
    guessed = torch.arange(prompt_length - 1, ids.shape[1] - 2, device=ids.device)
    return int((proposals[guessed] == ids[0, guessed + 2]).sum()), guessed.numel()
