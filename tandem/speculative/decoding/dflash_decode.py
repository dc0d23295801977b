"""Speculative decoding with a DFlash draft: one draft forward proposes a block, one target forward verifies it.

A round: the draft reads the target states of the positions committed since its last round (the new context,
whose keys and values it caches layer by layer) and the block ``[last token, MASK x (b-1)]``, and proposes
``b - 1`` tokens at once (greedy); the target verifies ``[last token, proposals]`` in one forward through its
decode session (in-process, or a server's ``/verify``); the longest prefix of the proposals equal to the
target's greedy tokens is kept, plus the target's next token. The output is the target's greedy output,
token for token. The decode-time block ``b`` may be smaller than the trained one (a shorter block costs the
target less per round and loses only the proposals least likely to be accepted).
"""

from __future__ import annotations

import copy
import logging
import time

import torch

from tandem.speculative.decoding.decode import DecodeResult, greedy_decode, truncate_at_stop
from tandem.speculative.decoding.evaluation import EvalSummary, summarize
from tandem.speculative.drafts.dflash import DFlashContextCache, DFlashDraftModel

logger = logging.getLogger(__name__)


def _propose(draft: DFlashDraftModel, cache: DFlashContextCache, states: torch.Tensor, start: int, anchor: int,
             block_size: int) -> list[int]:
    """Extend the draft's context by ``states [1, n, K*H]`` (positions ``start ..``) and propose ``block_size - 1``
    tokens after ``anchor`` (at position ``start + n``)."""
    device = states.device
    context = draft.project_context(states)
    context_positions = torch.arange(start, start + states.shape[1], device=device).unsqueeze(0)
    anchor_position = start + states.shape[1]
    block_ids = draft.block_inputs(torch.tensor([[anchor]], device=device), block_size)
    block_positions = torch.arange(anchor_position, anchor_position + block_size, device=device).unsqueeze(0)
    hidden = draft(block_ids, block_positions, context, context_positions, cache=cache)
    return draft.logits(hidden[0, 1:]).argmax(-1).tolist()


@torch.no_grad()
def dflash_decode(target, draft: DFlashDraftModel, input_ids: torch.Tensor, max_new_tokens: int,
                  block_size: int | None = None, stop_ids: set[int] = frozenset()) -> DecodeResult:
    """Greedy speculative decoding of ``input_ids [1, S]`` long with ``draft``; the output equals ``greedy_decode``'s.

    ``target``: an ``Eagle3TargetModel`` or a remote client (anything whose ``decode_session(layer_ids)`` captures
    the draft's target layers). ``block_size``: the decode-time block (default: the trained one; at least 2).
    """
    block_size = block_size or draft.config.block_size
    if not 2 <= block_size <= draft.config.block_size:
        raise ValueError(f"a DFlash block holds the anchor and at least one proposal, and no more slots than it was "
                         f"trained with: 2 <= block_size <= {draft.config.block_size}, got {block_size}")
    started = time.perf_counter()
    device = target.device
    input_ids = input_ids.to(device)
    session = target.decode_session(layer_ids=list(draft.config.target_layer_ids))
    cache = DFlashContextCache(len(draft.layers))
    try:
        step = session.extend(input_ids)
        next_token = int(step.next_token_ids[0, -1])
        tokens, forwards, drafted = [next_token], 1, 0
        near_ties = [bool(step.near_ties[0, -1])]
        states, start = step.aux_hidden_states.to(device), 0
        while len(tokens) < max_new_tokens and tokens[-1] not in stop_ids:
            committed = session.length
            proposal = _propose(draft, cache, states, start, next_token, block_size)
            step = session.extend(torch.tensor([[next_token] + proposal], device=device))
            greedy = step.next_token_ids[0].tolist()
            accepted = 0
            while accepted < len(proposal) and proposal[accepted] == greedy[accepted]:
                accepted += 1
            session.crop(committed + 1 + accepted)
            new = proposal[:accepted] + [greedy[accepted]]
            tokens.extend(new)
            near_ties.extend(step.near_ties[0, : accepted + 1].tolist())
            drafted += len(proposal)
            forwards += 1
            # The verified positions (the anchor and the accepted proposals) become the draft's next context.
            states, start, next_token = step.aux_hidden_states[:, : accepted + 1].to(device), committed, new[-1]
            if any(t in stop_ids for t in new):
                break
    finally:
        session.close()
    tokens = truncate_at_stop(tokens, max_new_tokens, stop_ids)
    return DecodeResult(tokens, forwards, time.perf_counter() - started, drafted, near_ties[: len(tokens)])


def dflash_for_decoding(draft: DFlashDraftModel, dtype: torch.dtype) -> DFlashDraftModel:
    """The draft as decoding runs it: eval mode, the target's ``dtype`` (a copy when that changes the dtype)."""
    if draft.fc.weight.dtype != dtype:
        draft = copy.deepcopy(draft).to(dtype)
    return draft.eval()


def evaluate_dflash(target, draft: DFlashDraftModel, prompts: list[torch.Tensor], max_new_tokens: int = 64,
                    block_sizes: list[int] | None = None, stop_ids: set[int] = frozenset(),
                    progress: bool = True, deadline: float | None = None,
                    min_prompts: int = 1) -> dict[int, EvalSummary]:
    """Decode every prompt (``[1, S]`` long each) plainly and with ``draft`` at each decode-time block size (default:
    the trained one), back to back per prompt as ``evaluation.evaluate_drafts`` does, and compare. ``deadline``: a
    ``time.perf_counter()`` after which no further prompt is started once ``min_prompts`` are done."""
    from tqdm.auto import tqdm

    draft = dflash_for_decoding(draft, target.dtype)
    sizes = block_sizes or [draft.config.block_size]
    greedy: list[DecodeResult] = []
    speculative: dict[int, list[DecodeResult]] = {size: [] for size in sizes}
    for done, prompt in enumerate(tqdm(prompts, desc="decode", unit="prompt", disable=not progress, leave=False)):
        if deadline is not None and done >= min_prompts and time.perf_counter() > deadline:
            logger.warning("evaluation time is up: %d of %d prompts decoded", done, len(prompts))
            break
        greedy.append(greedy_decode(target, prompt, max_new_tokens, stop_ids))
        for size in sizes:
            speculative[size].append(dflash_decode(target, draft, prompt, max_new_tokens, size, stop_ids))
    return {size: summarize(greedy, results) for size, results in speculative.items()}
