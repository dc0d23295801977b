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

from tandem.speculative.eagle.draft import DraftKVCache, Eagle3DraftModel
from tandem.speculative.eagle.draft_tree import TreeShape, draft_tree
from tandem.speculative.eagle.target import Eagle3TargetModel
from tandem.speculative.eagle.verification import VerifyStep


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


def _truncate(tokens: list[int], max_new_tokens: int, stop_ids: set[int]) -> list[int]:
    """``tokens`` cut after the first stop token and to ``max_new_tokens``."""
    for i, token in enumerate(tokens[:max_new_tokens]):
        if token in stop_ids:
            return tokens[: i + 1]
    return tokens[:max_new_tokens]


@torch.no_grad()
def greedy_decode(target, input_ids: torch.Tensor, max_new_tokens: int, stop_ids: set[int] = frozenset()) -> DecodeResult:
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
    (``draft_tree.py``), and the chain settings are unused."""
    if num_draft_tokens < 1:
        raise ValueError(f"num_draft_tokens must be at least 1, got {num_draft_tokens}")
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
    tokens = _truncate(tokens, max_new_tokens, stop_ids)
    return DecodeResult(tokens, forwards, time.perf_counter() - started, drafted, near_ties[: len(tokens)])


def for_decoding(draft: Eagle3DraftModel, dtype: torch.dtype) -> Eagle3DraftModel:
    """The draft as decoding runs it: in eval mode and in the target's ``dtype`` (a bf16 target gets a bf16
    draft, as a serving engine runs it); a copy when that changes the dtype, so fp32 master weights stay."""
    if draft.fc.weight.dtype != dtype:
        draft = copy.deepcopy(draft).to(dtype)
    return draft.eval()


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
                    tree: TreeShape | None = None) -> dict[str, EvalSummary]:
    """Decode every prompt (``[1, S]`` long each) plainly and with each draft, and compare.

    The decodes of one prompt run back to back (plain, then each draft), so a shared, noisy machine
    slows every side of a comparison alike: the speed-ups are ratios taken at the same moment.
    ``greedy_results``: a list to receive the plain decodes (for a caller that needs the target's greedy
    continuations too, without decoding them again). ``tree``: draft trees of that shape instead of chains.
    """
    from tqdm.auto import tqdm

    drafts = {name: for_decoding(draft, target.dtype) for name, draft in drafts.items()}
    greedy: list[DecodeResult] = [] if greedy_results is None else greedy_results
    speculative: dict[str, list[DecodeResult]] = {name: [] for name in drafts}
    for prompt in tqdm(prompts, desc="decode", unit="prompt", disable=not progress, leave=False):
        greedy.append(greedy_decode(target, prompt, max_new_tokens, stop_ids))
        for name, draft in drafts.items():
            speculative[name].append(speculative_decode(target, draft, prompt, max_new_tokens, num_draft_tokens, stop_ids,
                                                        min_confidence, tree))
    return {name: summarize(greedy, results) for name, results in speculative.items()}


def evaluate_speculative(target: Eagle3TargetModel, draft: Eagle3DraftModel, prompts: list[torch.Tensor],
                         max_new_tokens: int = 64, num_draft_tokens: int = 4, stop_ids: set[int] = frozenset(),
                         progress: bool = True, min_confidence: float = 0.0, tree: TreeShape | None = None) -> EvalSummary:
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
