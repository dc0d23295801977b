"""Batched greedy decoding on CPU without copying the key/value cache: what regeneration runs.

Two copies of the whole cache, every layer, every step, dominate a batched decoding step of a small model
(profile: docs/training.md): transformers' eager attention repeats each key/value head ``nH / nKV`` times
(``repeat_kv``), and ``DynamicCache`` grows by ``torch.cat``. :func:`grouped_query_attention` stacks the
queries of a key/value group instead (the same arithmetic, keys read once, in place), and
:class:`GrowingCacheLayer` writes each step into spare capacity. The attention is registered with transformers
as :data:`IMPLEMENTATION`; only regeneration uses it, so the decodes that tandem compares run the model's own.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

IMPLEMENTATION = "tandem_grouped_eager"


def grouped_query_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0, **kwargs):
    """transformers' attention-function signature.

    Arguments:
        query: ``[B, nH, Q, D]``; key, value: ``[B, nKV, T, D]`` (``nH`` a multiple of ``nKV``), any float dtype.
        attention_mask: ``[B, 1, Q, T]`` additive (0 or the dtype's minimum), or None.

    Returns:
        ``([B, Q, nH, D] attention output, None)``: no attention weights are kept.
    """
    batch, heads, q_len, head_dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    group = heads // kv_heads
    # Head h reads key/value head h // group: the group's queries become rows of one matmul.
    grouped = query.reshape(batch, kv_heads, group * q_len, head_dim)
    scores = torch.matmul(grouped, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        mask = attention_mask[:, :, :, :k_len].unsqueeze(2)  # [B, 1, 1, Q, T]
        scores = (scores.view(batch, kv_heads, group, q_len, k_len) + mask).view(batch, kv_heads, group * q_len, k_len)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(probs, value).view(batch, heads, q_len, head_dim)
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Make :data:`IMPLEMENTATION` known to transformers (idempotent); returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    AttentionInterface.register(IMPLEMENTATION, grouped_query_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(IMPLEMENTATION, eager_mask)
    return IMPLEMENTATION


class GrowingCacheLayer(DynamicLayer):
    """A ``DynamicLayer`` that appends into preallocated capacity instead of concatenating.

    ``keys`` / ``values`` stay what transformers expects (``[B, nKV, T, D]``, here views of the first ``T``
    positions of a larger buffer); the buffer grows by ``reserve`` positions at a time, so a step writes
    only its own new key/value rows.
    """

    reserve = 64

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self._key_buffer = self._value_buffer = None
        length = self.get_seq_length()
        needed = length + key_states.shape[-2]
        if self._key_buffer is None or needed > self._key_buffer.shape[-2]:
            self._grow(needed + self.reserve, key_states, value_states, length)
        self._key_buffer[..., length:needed, :] = key_states
        self._value_buffer[..., length:needed, :] = value_states
        self.keys, self.values = self._key_buffer[..., :needed, :], self._value_buffer[..., :needed, :]
        return self.keys, self.values

    def _grow(self, capacity: int, key_states: torch.Tensor, value_states: torch.Tensor, length: int) -> None:
        shape = (*key_states.shape[:-2], capacity, key_states.shape[-1])
        keys = key_states.new_empty(shape)
        values = value_states.new_empty((*shape[:-1], value_states.shape[-1]))
        if length:
            keys[..., :length, :] = self.keys
            values[..., :length, :] = self.values
        self._key_buffer, self._value_buffer = keys, values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep rows ``indices`` (a finished row leaves the batch): one copy of the kept rows' buffers (the
        filled part and the spare ``reserve``)."""
        length = self.get_seq_length()
        if length > 0:
            self._key_buffer, self._value_buffer = self._key_buffer[indices], self._value_buffer[indices]
            self.keys, self.values = self._key_buffer[..., :length, :], self._value_buffer[..., :length, :]


def growing_cache() -> DynamicCache:
    """An empty ``DynamicCache`` whose layers are :class:`GrowingCacheLayer` s."""
    cache = DynamicCache()
    cache.layer_class_to_replicate = GrowingCacheLayer
    return cache
