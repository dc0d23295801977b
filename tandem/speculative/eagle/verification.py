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


def near_tie_mask(logits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[...]`` bool: whether the top two of ``logits [..., V]`` (float32) lie within two rounding steps of
    ``dtype`` at their size.

    In bfloat16 a position's logits differ in their last bits between a 1-token forward and a (k+1)-token
    one (other kernels, other summation orders), so greedy decoding and speculative verification may pick
    different tokens exactly where the two best are that close; in float32 the window is ~1e-5 wide."""
    top = logits.float().topk(2, dim=-1).values
    return (top[..., 0] - top[..., 1]) <= 2 * torch.finfo(dtype).eps * top[..., 0].abs()


def greedy_step(logits: torch.Tensor, aux_hidden_states: torch.Tensor, dtype: torch.dtype) -> VerifyStep:
    """The :class:`VerifyStep` of one forward's ``logits [B, n, V]`` float32 and ``aux_hidden_states [B, n, 3H]``."""
    return VerifyStep(logits.argmax(-1), near_tie_mask(logits, dtype), aux_hidden_states)


class DecodeSession(Protocol):
    """One sequence being decoded against a target (see the module docstring)."""

    length: int
    """Positions in the target's KV cache."""

    def extend(self, input_ids: torch.Tensor) -> VerifyStep:
        """Run the target on ``input_ids [1, n]`` long, the positions after the ``length`` cached ones."""

    def crop(self, keep_length: int) -> None:
        """Keep the first ``keep_length`` cached positions."""

    def close(self) -> None:
        """Free the cache."""


def crop_cache(cache, keep_length: int) -> None:
    """Keep the first ``keep_length`` positions of a transformers cache.

    A negative argument to ``crop`` removes that many tokens in transformers 4 and 5 alike (the meaning
    of a positive one changed between them).
    """
    remove = cache.get_seq_length() - keep_length
    if remove > 0:
        cache.crop(-remove)


class LocalDecodeSession:
    """A :class:`DecodeSession` on an in-process ``Eagle3TargetModel`` (a transformers ``DynamicCache``).

    Arguments:
        target: the ``Eagle3TargetModel`` (its ``forward_cached`` gives float32 logits and the aux states).
    """

    def __init__(self, target):
        from transformers import DynamicCache

        self.target = target
        self.cache = DynamicCache()
        self.length = 0

    def extend(self, input_ids: torch.Tensor) -> VerifyStep:
        logits, aux = self.target.forward_cached(input_ids, self.cache)
        self.length += int(input_ids.shape[1])
        return greedy_step(logits, aux, self.target.dtype)

    def crop(self, keep_length: int) -> None:
        if not 0 <= keep_length <= self.length:
            raise ValueError(f"cannot keep {keep_length} of {self.length} cached positions")
        crop_cache(self.cache, keep_length)
        self.length = keep_length

    def close(self) -> None:
        self.cache = None
        self.length = 0
