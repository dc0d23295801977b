"""Regeneration's batched decoding: grouped-query attention and the in-place cache equal transformers' own."""

import torch
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import eager_attention_forward

from tandem.speculative.training import generation_cache


class _Module(torch.nn.Module):
    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups = groups
        self.training = False


def test_grouped_attention_equals_eager_with_padding_mask():
    torch.manual_seed(0)
    batch, kv_heads, groups, q_len, k_len, dim = 3, 2, 3, 4, 9, 8
    query = torch.randn(batch, kv_heads * groups, q_len, dim)
    key, value = torch.randn(batch, kv_heads, k_len, dim), torch.randn(batch, kv_heads, k_len, dim)
    allowed = torch.ones(batch, 1, q_len, k_len, dtype=torch.bool).tril(k_len - q_len)
    allowed[1, :, :, :3] = False  # a left-padded row
    mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    expected, _ = eager_attention_forward(_Module(groups), query, key, value, mask, scaling=dim ** -0.5)
    got, weights = generation_cache.grouped_query_attention(_Module(groups), query, key, value, mask,
                                                            scaling=dim ** -0.5)
    assert weights is None and got.shape == (batch, q_len, kv_heads * groups, dim)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_growing_cache_returns_what_dynamic_cache_returns():
    torch.manual_seed(0)
    plain, growing = DynamicCache(), generation_cache.growing_cache()
    rows = 5
    for step, length in enumerate([7] + [1] * 80):  # a prefill, then enough steps to outgrow the reserve
        keys, values = torch.randn(rows, 2, length, 4), torch.randn(rows, 2, length, 4)
        for layer in range(2):
            want = plain.update(keys, values, layer)
            got = growing.update(keys, values, layer)
            assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])
        if step in (3, 40):  # rows finish and leave the batch
            keep = torch.tensor([0, 2, 3][: rows - 1])
            plain.batch_select_indices(keep)
            growing.batch_select_indices(keep)
            rows = len(keep)
    assert growing.get_seq_length() == plain.get_seq_length() == 87


def test_registered_attention_runs_a_model_like_eager(tiny_llama):
    torch.manual_seed(0)
    input_ids = torch.randint(0, tiny_llama.config.vocab_size, (2, 6))
    attention_mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    before = tiny_llama.config._attn_implementation
    try:
        tiny_llama.set_attn_implementation("eager")
        expected = tiny_llama(input_ids=input_ids, attention_mask=attention_mask).logits
        tiny_llama.set_attn_implementation(generation_cache.register())
        got = tiny_llama(input_ids=input_ids, attention_mask=attention_mask).logits
    finally:
        tiny_llama.set_attn_implementation(before)
    real = attention_mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-5)
