"""Real speculative decoding with an EAGLE-3 draft: measured acceptance length and wall-clock speed-up.

Greedy chain drafting: the draft proposes ``k`` tokens, the target scores them all in one forward,
and the longest prefix that equals the target's own greedy choice is kept, plus the target's next
token. The output is therefore the target's greedy output, token for token; what the draft changes
is how many target forwards it takes. Acceptance length = new tokens / verifying target forwards.

Alignment (the same as training): the draft at position i reads token i+1 and the target's aux
hidden state at i, and predicts token i+2.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch

from tandem.speculative.decoding.recurrent_state import check_tree_support
from tandem.speculative.decoding.tree import TreeShape, draft_tree
from tandem.speculative.decoding.verification import VerifyStep
from tandem.speculative.drafts.eagle3 import DraftKVCache, Eagle3DraftModel


@dataclass
class DecodeResult:
    """tokens: the new token ids. target_forwards: target forwards, the prefill included. wall_s: seconds.
    drafted: tokens the draft proposed (0 for plain decoding). near_ties: for each token,
    whether the top two logits of the forward that chose it were within the target dtype's rounding
    (``verification.near_tie_mask``)."""

    tokens: list[int]
    target_forwards: int
    wall_s: float
    drafted: int = 0
    near_ties: list[bool] | None = None


def truncate_at_stop(tokens: list[int], max_new_tokens: int, stop_ids: set[int]) -> list[int]:
    """``tokens`` cut after the first stop token and to ``max_new_tokens``."""
    for i, token in enumerate(tokens[:max_new_tokens]):
        if token in stop_ids:
            return tokens[: i + 1]
    return tokens[:max_new_tokens]


@torch.no_grad()
def greedy_decode(target, input_ids: torch.Tensor, max_new_tokens: int,
                  stop_ids: set[int] = frozenset()) -> DecodeResult:
    """Plain greedy decoding of ``input_ids [1, S]`` long, one target forward a token.

    ``target``: an ``Eagle3TargetModel`` or a ``RemoteEagle3TargetModel`` (anything with ``decode_session()``,
    see ``verification.py``)."""
    started = time.perf_counter()
    session = target.decode_session()
    try:
        step = session.extend(input_ids)
        tokens, near_ties = [int(step.next_token_ids[0, -1])], [bool(step.near_ties[0, -1])]
        forwards = 0
        while len(tokens) < max_new_tokens and tokens[-1] not in stop_ids:
            step = session.extend(torch.tensor([[tokens[-1]]]))
            tokens.append(int(step.next_token_ids[0, -1]))
            near_ties.append(bool(step.near_ties[0, -1]))
            forwards += 1
    finally:
        session.close()
    # The first token comes from the prefill; count it as that forward's output.
    return DecodeResult(tokens, forwards + 1, time.perf_counter() - started, near_ties=near_ties)


def _draft_chain(draft: Eagle3DraftModel, new_tokens: torch.Tensor, new_aux: torch.Tensor, start: int,
                 cache: DraftKVCache, num_draft_tokens: int, min_confidence: float = 0.0) -> list[int]:
    """Extend the draft cache with committed positions, then draft a chain of target token ids.

    The chain stops early (after at least one token) once the draft's probability of its next token falls
    below ``min_confidence``: a token that will likely be rejected costs a draft step and a longer verification.
    """
    positions = torch.arange(start, start + new_tokens.shape[1], device=new_tokens.device).unsqueeze(0)
    hidden = draft.step(new_tokens, draft.project_aux(new_aux), positions, kv_cache=cache)[:, -1:]
    committed = cache.length
    proposal = []
    for j in range(num_draft_tokens):
        logits = draft.logits(hidden)[0, -1]
        best = logits.argmax()
        if j > 0 and min_confidence > 0 and float(torch.softmax(logits.float(), -1)[best]) < min_confidence:
            break
        token = draft.draft_to_target(best)
        proposal.append(int(token))
        if j + 1 < num_draft_tokens:
            position = torch.tensor([[committed + j]], device=new_tokens.device)
            hidden = draft.step(token.view(1, 1), hidden, position, kv_cache=cache)
    cache.crop(committed)  # chain entries are speculative; the next round rebuilds from the target
    return proposal


def _chain_round(session, draft: Eagle3DraftModel, pending: tuple, cache: DraftKVCache, next_token: int,
                 num_draft_tokens: int, min_confidence: float) -> tuple[list[int], list[int], VerifyStep, int]:
    """Draft a chain, verify it: ``(new tokens, kept verification indices, the target's answer, drafted)``."""
    proposal = _draft_chain(draft, *pending, cache, num_draft_tokens, min_confidence)
    committed = session.length
    step = session.extend(torch.tensor([[next_token] + proposal], device=pending[0].device))
    greedy = step.next_token_ids[0].tolist()
    accepted = 0
    while accepted < len(proposal) and proposal[accepted] == greedy[accepted]:
        accepted += 1
    session.crop(committed + 1 + accepted)
    return proposal[:accepted] + [greedy[accepted]], list(range(accepted + 1)), step, len(proposal)


def _tree_round(session, draft: Eagle3DraftModel, pending: tuple, cache: DraftKVCache, next_token: int,
                shape: TreeShape) -> tuple[list[int], list[int], VerifyStep, int]:
    """Draft a tree, verify it in one forward, keep the accepted branch (as :func:`_chain_round`)."""
    tree = draft_tree(draft, *pending, cache, next_token, shape)
    committed = session.length
    step = session.extend(torch.tensor([tree.tokens], device=pending[0].device), tree.parents)
    greedy = step.next_token_ids[0].tolist()
    branch = [0] + tree.accept(greedy)
    session.keep_branch(committed, branch)
    return [tree.tokens[i] for i in branch[1:]] + [greedy[branch[-1]]], branch, step, len(tree) - 1


@torch.no_grad()
def speculative_decode(target, draft: Eagle3DraftModel, input_ids: torch.Tensor, max_new_tokens: int,
                       num_draft_tokens: int = 4, stop_ids: set[int] = frozenset(),
                       min_confidence: float = 0.0, tree: TreeShape | None = None) -> DecodeResult:
    """Greedy speculative decoding of ``input_ids [1, S]`` long; output equals ``greedy_decode``'s.

    ``target``: an ``Eagle3TargetModel`` or a ``RemoteEagle3TargetModel`` (anything with ``decode_session()``);
    the draft runs here, on ``target.device``. ``num_draft_tokens`` is the longest chain; with
    ``min_confidence`` > 0 a round drafts fewer tokens when the draft is unsure (dynamic draft length), which
    never changes the output, only the cost. With ``tree`` the draft proposes a tree instead of a chain
    (``decoding/tree.py``), and the chain settings are unused; a target whose layers keep a recurrent state
    verifies chains only (``recurrent_state.TreeUnsupportedError``)."""
    if num_draft_tokens < 1:
        raise ValueError(f"num_draft_tokens must be at least 1, got {num_draft_tokens}")
    check_tree_support(target, tree)
    started = time.perf_counter()
    device = target.device
    input_ids = input_ids.to(device)
    session, draft_cache = target.decode_session(), DraftKVCache()
    try:
        step = session.extend(input_ids)
        next_token = int(step.next_token_ids[0, -1])
        tokens, forwards, drafted = [next_token], 1, 0  # the prefill counts as a forward, as in greedy_decode
        near_ties = [bool(step.near_ties[0, -1])]
        # What the draft reads next: tokens i+1 for the aux states at positions i, from draft position start.
        pending = (torch.cat([input_ids[:, 1:], torch.tensor([[next_token]], device=device)], dim=1),
                   step.aux_hidden_states.to(device), 0)
        while len(tokens) < max_new_tokens and tokens[-1] not in stop_ids:
            committed = session.length
            if tree is None:
                new, branch, step, count = _chain_round(session, draft, pending, draft_cache, next_token,
                                                        num_draft_tokens, min_confidence)
            else:
                new, branch, step, count = _tree_round(session, draft, pending, draft_cache, next_token, tree)
            drafted += count
            tokens.extend(new)
            near_ties.extend(step.near_ties[0, branch].tolist())
            forwards += 1
            pending = (torch.tensor([new], device=device), step.aux_hidden_states[:, branch].to(device), committed)
            next_token = new[-1]
            if any(t in stop_ids for t in new):
                break
    finally:
        session.close()
    tokens = truncate_at_stop(tokens, max_new_tokens, stop_ids)
    return DecodeResult(tokens, forwards, time.perf_counter() - started, drafted, near_ties[: len(tokens)])


def for_decoding(draft: Eagle3DraftModel, dtype: torch.dtype) -> Eagle3DraftModel:
    """The draft as decoding runs it: in eval mode and in the target's ``dtype`` (a bf16 target gets a bf16
    draft, as a serving engine runs it); a copy when that changes the dtype, so fp32 master weights stay."""
    if draft.fc.weight.dtype != dtype:
        draft = copy.deepcopy(draft).to(dtype)
    return draft.eval()


