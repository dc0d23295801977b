"""What speculative decoding needs from the target, in-process or over HTTP: a decode session.

A decode session holds one sequence's KV cache. ``extend(ids)`` runs the target on the positions after
those already cached and answers, for each of them, the target's greedy next token (argmax over the *full*
vocabulary of float32 logits), whether that argmax was a near-tie in the target's dtype, and the three aux
hidden states the draft continues from; ``crop(n)`` keeps the first ``n`` cached positions (the rejected
proposals of a round go). ``decode.py`` drives every decode through this interface, so the same decoder runs
against ``Eagle3TargetModel.decode_session()`` (here) and ``RemoteEagle3TargetModel.decode_session()`` (the
server's ``/verify`` endpoint) and gives the same tokens.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch

from tandem.speculative.decoding.recurrent_state import new_decode_cache, rollback


class VerifyStep(NamedTuple):
    """The target's answer for ``n`` new positions of a batch of ``B`` sequences.

    next_token_ids: ``[B, n]`` long, the greedy next token after each position (full target vocabulary).
    near_ties: ``[B, n]`` bool, whether that position's top two logits lie within the target dtype's
        rounding (``near_tie_mask``): where bf16 verification and bf16 greedy decoding may disagree.
    aux_hidden_states: ``[B, n, 3H]`` target dtype, the captured layers at each position (not shifted).
    """

    next_token_ids: torch.Tensor
    near_ties: torch.Tensor
    aux_hidden_states: torch.Tensor


def near_tie_mask(logits: torch.Tensor, dtype: torch.dtype, magnitude: torch.Tensor | None = None) -> torch.Tensor:
    """``[...]`` bool: whether the top two of ``logits [..., V]`` (float32) lie within two rounding steps of
    ``dtype`` of each other.

    In bfloat16 a position's logits differ in their last bits between a 1-token forward and a (k+1)-token
    one (other kernels, other summation orders), so greedy decoding and speculative verification may pick
    different tokens exactly where the two best are that close. A logit is a dot product of the final hidden
    state with a row of the output head, so its rounding error scales with ``magnitude``, the sum of the
    absolute products ``sum_i |h_i w_i|`` for the best token (``dot_magnitude``), not with the logit itself,
    which cancellation can make small: the window is ``2 eps magnitude``. Without ``magnitude`` it falls
    back to ``|top logit|`` (a lower bound of it). In float32 the window is ~1e-5 wide."""
    top = logits.float().topk(2, dim=-1).values
    scale = top[..., 0].abs() if magnitude is None else magnitude
    return (top[..., 0] - top[..., 1]) <= 2 * torch.finfo(dtype).eps * scale


def dot_magnitude(hidden: torch.Tensor, weight: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """``[...]`` float32 ``sum_i |hidden_i * weight[token]_i|`` for ``hidden [..., H]`` and ``token_ids [...]`` long
    (``weight [V, H]``): the scale of a logit's rounding error (see ``near_tie_mask``)."""
    return (weight[token_ids].float() * hidden.float()).abs().sum(-1)


# Candidates re-scored in float32 per position (see greedy_from_hidden); more are needed only for flat rows, which
# get WIDE_CANDIDATES before the full float32 projection.
CANDIDATES = 16
WIDE_CANDIDATES = 512


def _from_candidates(hidden: torch.Tensor, weight: torch.Tensor, approx: torch.Tensor, count: int):
    """``(next_ids, near_ties, complete)`` from the ``count`` best tokens of ``approx [..., V]`` (the low-precision
    logits of ``hidden [..., H]``, in float32), each ``[...]``; where ``complete`` is False the candidates may
    miss the answer (see :func:`greedy_from_hidden`)."""
    top, index = approx.topk(min(count, approx.shape[-1]), dim=-1)
    eps = torch.finfo(hidden.dtype).eps
    products = weight[index].float() * hidden.float().unsqueeze(-2)  # [..., K, H] float32
    exact, magnitude = products.sum(-1), products.abs().sum(-1)
    window = 2 * eps * magnitude.amax(-1)
    complete = top[..., -1] + eps / 2 * top[..., -1].abs() < top[..., 0] - eps / 2 * top[..., 0].abs() - window - 1e-3
    best = exact.argmax(-1, keepdim=True)
    next_ids = index.gather(-1, best).squeeze(-1)
    near_ties = near_tie_mask(exact, hidden.dtype, magnitude.gather(-1, best).squeeze(-1))
    return next_ids, near_ties, complete


def greedy_from_hidden(hidden: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(next_token_ids [B, n] long, near_ties [B, n] bool)`` of the float32 logits ``hidden @ weight.T``, at
    the cost of a low-precision projection.

    Arguments:
        hidden: ``[B, n, H]`` the final hidden states, in the target's low-precision dtype (bf16, fp16).
        weight: ``[V, H]`` the output projection, in the same dtype.

    The float32 projection of a bf16 target reads twice the bytes and runs at a fraction of the bf16 rate,
    which made a verification cost much more than a plain decoding step (docs/training.md, "The output
    projection was the hidden cost"). Here the bf16 projection (float32 accumulation, output rounded
    to bf16: each value off by at most half a rounding step, ``eps/2 x |value|``) picks the ``CANDIDATES``
    best tokens; every token whose float32 logit could be the best or within the near-tie window
    (``2 eps magnitude``, see ``near_tie_mask``) of it lies above the last candidate when that one is lower
    than the rounded maximum by more than the window and both roundings, so the candidates then hold the
    answer, and their float32 logits, recomputed position by position (the same sums whatever the number of
    positions), give it exactly. Rows where they do not (flat distributions: after a draft tree's wrong
    guesses) try ``WIDE_CANDIDATES`` the same way, and only rows those cannot settle either pay for the full
    float32 projection (which converts the whole head)."""
    approx = torch.nn.functional.linear(hidden, weight).float()
    next_ids, near_ties, complete = _from_candidates(hidden, weight, approx, CANDIDATES)
    if bool(complete.all()):
        return next_ids, near_ties
    rows = ~complete
    wide_ids, wide_ties, wide_complete = _from_candidates(hidden[rows], weight, approx[rows], WIDE_CANDIDATES)
    if not bool(wide_complete.all()):
        flat = ~wide_complete
        logits = torch.nn.functional.linear(hidden[rows][flat].float(), weight.float())
        wide_ids[flat] = logits.argmax(-1)
        wide_ties[flat] = near_tie_mask(logits, hidden.dtype, dot_magnitude(hidden[rows][flat], weight, wide_ids[flat]))
    next_ids[rows], near_ties[rows] = wide_ids, wide_ties
    return next_ids, near_ties


def greedy_step(logits: torch.Tensor, aux_hidden_states: torch.Tensor, dtype: torch.dtype) -> VerifyStep:
    """The :class:`VerifyStep` of one forward's ``logits [B, n, V]`` float32 and ``aux_hidden_states [B, n, 3H]``."""
    return VerifyStep(logits.argmax(-1), near_tie_mask(logits, dtype), aux_hidden_states)


class DecodeSession(Protocol):
    """One sequence being decoded against a target (see the module docstring)."""

    length: int
    """Positions in the target's KV cache."""

    def extend(self, input_ids: torch.Tensor, tree_parents: list[int] | None = None) -> VerifyStep:
        """Run the target on ``input_ids [1, n]`` long, the positions after the ``length`` cached ones: a causal
        chain, or with ``tree_parents`` a draft tree (``decoding/tree.py``)."""

    def crop(self, keep_length: int) -> None:
        """Keep the first ``keep_length`` cached positions."""

    def keep_branch(self, past_length: int, branch: list[int]) -> None:
        """After a tree: keep the first ``past_length`` positions, then positions ``past_length + i`` for i in
        ``branch`` (increasing), which become ``past_length, past_length + 1, ...``."""

    def close(self) -> None:
        """Free the cache."""


def crop_cache(cache, keep_length: int) -> None:
    """Keep the first ``keep_length`` positions of a transformers cache.

    A negative argument to ``crop`` removes that many tokens in transformers 4 and 5 alike (the meaning
    of a positive one changed between them). A hybrid target's cache rolls its recurrent states back
    (``recurrent_state.rollback``).
    """
    remove = int(cache.get_seq_length()) - keep_length
    if remove > 0:
        rollback(cache, remove)
        _log_for_mirrors(cache, ("crop", keep_length))


def check_branch(past_length: int, branch: list[int], length: int) -> None:
    """ValueError unless ``branch`` (tree indices, increasing, at least one) lies in the ``length - past_length``
    positions verified after the first ``past_length`` of ``length`` cached ones (``DecodeSession.keep_branch``)."""
    if not 0 <= past_length < length or not branch or branch[0] < 0 or past_length + branch[-1] >= length \
            or any(b <= a for a, b in zip(branch, branch[1:])):
        raise ValueError(f"cannot keep branch {branch} after {past_length} of {length} cached positions")


def select_cache_positions(cache, past_length: int, keep: torch.Tensor) -> None:
    """Keep the first ``past_length`` positions of a transformers cache followed by positions ``keep [m]`` long."""

    def select(tensor: torch.Tensor) -> torch.Tensor:  # [B, nKV, T, D]
        return torch.cat([tensor[..., :past_length, :], tensor[..., keep.to(tensor.device), :]], dim=-2)

    if hasattr(cache, "layers"):  # transformers >= 4.56: one object per layer
        for layer in cache.layers:
            layer.keys, layer.values = select(layer.keys), select(layer.values)
    else:
        cache.key_cache = [select(k) for k in cache.key_cache]
        cache.value_cache = [select(v) for v in cache.value_cache]
    _log_for_mirrors(cache, ("select", past_length, keep.tolist()))


def _log_for_mirrors(cache, operation: tuple) -> None:
    """Record a change of ``cache`` for the ranks that hold its other shards (a tensor-parallel server's caches
    carry a ``mirror_log``: ``remote/serving/tensor_parallel.py`` replays it on them before the next forward)."""
    log = getattr(cache, "mirror_log", None)
    if log is not None:
        log.append(operation)


class LocalDecodeSession:
    """A :class:`DecodeSession` on an in-process ``Eagle3TargetModel`` (a transformers ``DynamicCache``; for a
    hybrid target one that records its recurrent states, ``recurrent_state.new_decode_cache``).

    Arguments:
        target: the ``Eagle3TargetModel`` (its ``greedy_forward`` gives the greedy tokens and the aux states).
        layer_ids: the target layers each step captures (a DFlash draft's); None: the target's own.
    """

    def __init__(self, target, layer_ids: list[int] | None = None):
        self.target = target
        self.layer_ids = layer_ids
        self.cache = new_decode_cache(target.config)
        self.length = 0

    def extend(self, input_ids: torch.Tensor, tree_parents: list[int] | None = None) -> VerifyStep:
        if self.layer_ids is None:  # (targets that capture one fixed set take no layer_ids)
            step = self.target.greedy_forward(input_ids, self.cache, tree_parents)
        else:
            step = self.target.greedy_forward(input_ids, self.cache, tree_parents, self.layer_ids)
        self.length += int(input_ids.shape[1])
        return step

    def keep_branch(self, past_length: int, branch: list[int]) -> None:
        check_branch(past_length, branch, self.length)
        select_cache_positions(self.cache, past_length, torch.tensor([past_length + i for i in branch]))
        self.length = past_length + len(branch)

    def crop(self, keep_length: int) -> None:
        if not 0 <= keep_length <= self.length:
            raise ValueError(f"cannot keep {keep_length} of {self.length} cached positions")
        crop_cache(self.cache, keep_length)
        self.length = keep_length

    def close(self) -> None:
        self.cache = None
        self.length = 0
