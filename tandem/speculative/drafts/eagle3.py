"""Eagle3DraftModel: the single-layer Llama-style EAGLE-3 draft, with training-time-test attention.

Shapes: B batch, S sequence, H draft hidden (= target hidden), Ht target hidden, V target vocab,
Vd draft vocab, nH / nKV attention / key-value heads, D head dim.

One step: ``hidden = fc(aux [B,S,3Ht])`` at step 0 (the draft's own output hidden later); the decoder layer
attends over ``cat(input_layernorm(embed(tokens)), hidden_norm(hidden))`` (2H wide) and ``lm_head(norm(out))``
scores the draft vocabulary. Attention comes in two forms that agree by construction: ``ttt_attention``
(training: step k's queries see step-0 keys plus the diagonal key of every earlier step, what a query sees at
decode time) and ``cached_attention`` (decoding: causal attention over a growing key/value cache).
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(kw_only=True)
class Eagle3DraftConfig:
    """Shape of the draft; ``from_target_config`` copies the target's attention geometry."""

    hidden_size: int = 576
    """Draft hidden size (equal to the target's: the draft reads the target's embeddings)."""
    intermediate_size: int = 1536
    """SwiGLU MLP width."""
    num_attention_heads: int = 9
    num_key_value_heads: int = 3
    head_dim: int = 64
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    vocab_size: int = 49152
    """Target vocabulary size V (the draft's embedding)."""
    draft_vocab_size: int = 8192
    """Draft vocabulary size Vd (the draft's lm_head)."""
    target_hidden_size: int = 576
    """Hidden size Ht of the target's aux layers (fc maps 3Ht -> H)."""
    extra: dict = field(default_factory=dict)
    """Target config fields carried into the exported config (bos/eos ids, ...)."""
    mrope_section: list[int] | None = None
    """A target with M-RoPE (Qwen2-VL, Qwen2.5-VL): how many of the ``head_dim / 2`` frequencies follow the
    temporal, height and width positions (the target's ``mrope_section``). The engines then give the draft
    the target's 3-D positions, so it is trained on them (``rope_cos_sin``); None: 1-D RoPE."""

    @classmethod
    def from_target_config(cls, target_config, draft_vocab_size: int) -> "Eagle3DraftConfig":
        """The draft of a target: its hidden size, vocabulary, MLP width and RoPE base, and its attention shape
        (``draft_attention_shape``); ``target_config`` a transformers config (a VLM's text config is read)."""
        if hasattr(target_config, "get_text_config"):
            target_config = target_config.get_text_config(decoder=True)
        heads, kv_heads, head_dim = draft_attention_shape(target_config)
        rope = getattr(target_config, "rope_parameters", None) or {}
        rope_theta = rope.get("rope_theta", getattr(target_config, "rope_theta", 10000.0))
        extra = {k: getattr(target_config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                 if getattr(target_config, k, None) is not None}
        section = (rope or getattr(target_config, "rope_scaling", None) or {}).get("mrope_section")
        if section is not None and 2 * sum(section) != head_dim:  # the draft's heads are not the target's
            section = None
        return cls(
            hidden_size=target_config.hidden_size,
            intermediate_size=target_config.intermediate_size,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(target_config.rms_norm_eps),
            rope_theta=float(rope_theta),
            max_position_embeddings=int(target_config.max_position_embeddings),
            vocab_size=target_config.vocab_size,
            draft_vocab_size=min(draft_vocab_size, target_config.vocab_size),
            target_hidden_size=target_config.hidden_size,
            extra=extra,
            mrope_section=None if section is None else [int(n) for n in section],
        )

    def to_dict(self) -> dict:
        return asdict(self)


MLA_DRAFT_HEAD_DIM = 128
"""The draft's head size for a target with multi-head latent attention (Llama's; see ``draft_attention_shape``)."""
MLA_DRAFT_KV_HEADS = 8
"""The draft's key/value heads for such a target (grouped-query attention, as Llama 3's)."""


def draft_attention_shape(target_config) -> tuple[int, int, int]:
    """``(num_attention_heads, num_key_value_heads, head_dim)`` of the draft's Llama attention for a target.

    A target with Llama-style attention (Llama, Qwen, Mistral, Gemma, GPT-OSS, Qwen3-Next's full-attention layers,
    ...) gives its own. Multi-head latent attention (DeepSeek-V2/V3, Kimi-K2: ``kv_lora_rank`` set) has no such
    shape: its keys come from a low-rank latent with a split rope/no-rope head, which a Llama layer does not have.
    Its draft gets Llama's defaults instead: heads of ``MLA_DRAFT_HEAD_DIM`` (``hidden // heads`` where the hidden
    size is not a multiple of it) and ``MLA_DRAFT_KV_HEADS`` key/value heads where they divide the heads (else one
    a head); for DeepSeek-V3 (hidden 7168) 56 heads of 128, 8 key/value heads, the shape of the public EAGLE-3
    drafts of that target.
    """
    heads = target_config.num_attention_heads
    if getattr(target_config, "kv_lora_rank", None) is None:
        head_dim = getattr(target_config, "head_dim", None) or target_config.hidden_size // heads
        return heads, getattr(target_config, "num_key_value_heads", heads) or heads, head_dim
    hidden = target_config.hidden_size
    head_dim = MLA_DRAFT_HEAD_DIM if hidden % MLA_DRAFT_HEAD_DIM == 0 else hidden // heads
    heads = hidden // head_dim
    return heads, MLA_DRAFT_KV_HEADS if heads % MLA_DRAFT_KV_HEADS == 0 else heads, head_dim


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalised in float32 (one fused op), then scaled in the input's dtype, as Llama's RMSNorm does.
        dtype = x.dtype
        x = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * x.to(dtype)


@functools.lru_cache(maxsize=8)
def _inverse_frequencies(head_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    """``[D/2]`` float32 RoPE frequencies (made once: a decoding step would otherwise rebuild them)."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype,
                 mrope_section: list[int] | None = None):
    """``cos, sin [B, 1, S, D]`` for ``positions [B, S]`` long, or M-RoPE's ``[3, B, S]`` (temporal, height,
    width) with ``mrope_section``: the first ``mrope_section[0]`` frequencies turn with the temporal position,
    the next with the height, the last with the width (transformers' ``apply_multimodal_rotary_pos_emb``,
    SGLang's and vLLM's ``MRotaryEmbedding``). HF/neox half-rotation layout. 1-D positions are M-RoPE's with
    the three equal (text)."""
    inv_freq = _inverse_frequencies(head_dim, theta, positions.device)
    angles = positions.float().unsqueeze(-1) * inv_freq
    if positions.dim() == 3:  # [3, B, S, D/2]: each frequency band takes its axis
        if mrope_section is None:
            raise ValueError("3-D positions need the draft's mrope_section")
        angles = torch.cat([band[axis] for axis, band in enumerate(angles.split(mrope_section, dim=-1))], dim=-1)
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos().to(dtype).unsqueeze(1), emb.sin().to(dtype).unsqueeze(1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def ttt_attention(query: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor],
                  key_padding_mask: torch.Tensor | None) -> torch.Tensor:
    """Training-time-test attention for step ``k = len(keys) - 1``.

    Arguments:
        query: ``[B, nH, S, D]`` step-k queries.
        keys, values: ``k + 1`` tensors ``[B, nKV, S, D]`` (``nH`` a multiple of ``nKV``; query head ``h`` reads
            key/value head ``h // (nH / nKV)``): step 0's, then each later step's.
        key_padding_mask: ``[B, S]`` bool, True on real tokens (None: no padding).

    Returns:
        ``[B, nH, S, D]``: query i attends to step-0 keys j <= i and to key i of steps 1..k.

    The queries of a key/value group are stacked (``[B, nKV, group, S, D]``) rather than the keys repeated,
    so no step copies its keys and values ``nH / nKV`` times (nor does the backward pass).
    """
    batch, heads, seq, dim = query.shape
    kv_heads = keys[0].shape[1]
    group = heads // kv_heads
    scale = 1.0 / math.sqrt(dim)
    grouped = query.reshape(batch, kv_heads, group, seq, dim)
    scores = torch.matmul(grouped.reshape(batch, kv_heads, group * seq, dim), keys[0].transpose(-1, -2))
    scores = scores.view(batch, kv_heads, group, seq, seq) * scale
    causal = torch.ones(seq, seq, dtype=torch.bool, device=query.device).tril()
    allowed = causal if key_padding_mask is None else causal & key_padding_mask[:, None, None, None, :]
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    diagonal = [(grouped * k.unsqueeze(2)).sum(-1, keepdim=True) * scale for k in keys[1:]]
    probs = torch.softmax(torch.cat([scores, *diagonal], dim=-1).float(), dim=-1).to(query.dtype)
    out = torch.matmul(probs[..., :seq].reshape(batch, kv_heads, group * seq, seq), values[0])
    out = out.view(batch, kv_heads, group, seq, dim)
    for step, value in enumerate(values[1:]):
        out = out + probs[..., seq + step: seq + step + 1] * value.unsqueeze(2)
    return out.reshape(batch, heads, seq, dim)


def cached_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     tree_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of ``query [B, nH, Q, D]`` (the last Q positions) over ``keys/values [B, nKV, K, D]``
    (grouped as in :func:`ttt_attention`: no copy of the cache per step).

    ``tree_mask [Q, T]`` bool (T <= K) replaces causality for the last T keys, the speculative entries of a
    draft tree (``decoding/tree.py``): query q sees all K - T keys before them and tree key t where
    ``tree_mask[q, t]`` (its ancestors and itself)."""
    batch, heads, q_len, dim = query.shape
    kv_heads, k_len = keys.shape[1], keys.shape[2]
    group = heads // kv_heads
    scores = torch.matmul(query.reshape(batch, kv_heads, group * q_len, dim), keys.transpose(-1, -2)) / math.sqrt(dim)
    scores = scores.view(batch, kv_heads, group, q_len, k_len)
    if tree_mask is not None:
        allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device)
        allowed[:, k_len - tree_mask.shape[1]:] = tree_mask
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    elif q_len > 1:  # one query (a drafting step) sees every cached key: no mask to build
        allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores.float(), dim=-1).to(query.dtype).view(batch, kv_heads, group * q_len, k_len)
    return torch.matmul(probs, values).view(batch, heads, q_len, dim)


class DraftKVCache:
    """Keys/values of the positions the draft has seen at decode time, ``[B, nKV, K, D]`` each."""

    def __init__(self):
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys is None:
            self.keys, self.values = keys, values
        else:
            self.keys = torch.cat([self.keys, keys], dim=2)
            self.values = torch.cat([self.values, values], dim=2)
        return self.keys, self.values

    def crop(self, length: int) -> None:
        if self.keys is not None:
            self.keys, self.values = self.keys[:, :, :length], self.values[:, :, :length]


class Eagle3Attention(nn.Module):
    def __init__(self, config: Eagle3DraftConfig):
        super().__init__()
        self.config = config
        width_in = 2 * config.hidden_size
        d = config.head_dim
        self.q_proj = nn.Linear(width_in, config.num_attention_heads * d, bias=False)
        self.k_proj = nn.Linear(width_in, config.num_key_value_heads * d, bias=False)
        self.v_proj = nn.Linear(width_in, config.num_key_value_heads * d, bias=False)
        self.o_proj = nn.Linear(config.num_attention_heads * d, config.hidden_size, bias=False)

    def _heads(self, x: torch.Tensor, proj: nn.Linear) -> torch.Tensor:
        b, s, _ = x.shape
        return proj(x).view(b, s, -1, self.config.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, ttt_cache: list | None = None,
                key_padding_mask: torch.Tensor | None = None, kv_cache: DraftKVCache | None = None,
                tree_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x [B, S, 2H]``, ``positions [B, S]`` (or M-RoPE's ``[3, B, S]``) -> ``[B, S, H]``.

        With ``ttt_cache`` (a list the caller keeps across TTT steps) this is training-time-test
        attention; with ``kv_cache`` it is causal decoding attention (``tree_mask``: see
        :func:`cached_attention`); with neither, plain causal.
        """
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype,
                                self.config.mrope_section)
        q = apply_rope(self._heads(x, self.q_proj), cos, sin)
        k = apply_rope(self._heads(x, self.k_proj), cos, sin)
        v = self._heads(x, self.v_proj)
        if ttt_cache is not None:
            ttt_cache.append((k, v))
            out = ttt_attention(q, [kk for kk, _ in ttt_cache], [vv for _, vv in ttt_cache], key_padding_mask)
        else:
            if kv_cache is not None:
                k, v = kv_cache.append(k, v)
            out = cached_attention(q, k, v, tree_mask)
        b, _, s, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class Eagle3MLP(nn.Module):
    def __init__(self, config: Eagle3DraftConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Eagle3DecoderLayer(nn.Module):
    def __init__(self, config: Eagle3DraftConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hidden_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Eagle3Attention(config)
        self.mlp = Eagle3MLP(config)

    def forward(self, embeds: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor,
                **attention_kwargs) -> torch.Tensor:
        residual = hidden
        fused = torch.cat([self.input_layernorm(embeds), self.hidden_norm(hidden)], dim=-1)
        hidden = residual + self.self_attn(fused, positions, **attention_kwargs)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class Eagle3DraftModel(nn.Module):
    """The EAGLE-3 draft. Parameter names are the exported checkpoint's keys (see ``export/eagle3.py``)."""

    def __init__(self, config: Eagle3DraftConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.fc = nn.Linear(3 * config.target_hidden_size, config.hidden_size, bias=False)
        self.midlayer = Eagle3DecoderLayer(config)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.draft_vocab_size, bias=False)
        self.register_buffer("d2t", torch.zeros(config.draft_vocab_size, dtype=torch.long))
        # Until set_vocab: draft id i is target id i, so t2d marks the first Vd target ids (consistent with d2t).
        self.register_buffer("t2d", torch.arange(config.vocab_size) < config.draft_vocab_size)

    def set_vocab(self, d2t: torch.Tensor, t2d: torch.Tensor) -> None:
        """``d2t [Vd]`` long offsets, ``t2d [V]`` bool (see ``vocab.DraftVocab``)."""
        self.d2t.copy_(d2t)
        self.t2d.copy_(t2d)

    def seed_from_target(self, input_embeddings: torch.Tensor, selected_token_ids: torch.Tensor | None = None,
                         seed_lm_head: bool = False) -> None:
        """Copy the target's ``[V, H]`` embedding into the frozen draft embedding.

        With ``seed_lm_head``, ``lm_head`` starts from the embedding rows of the draft vocabulary: for
        a target with tied embeddings (SmolLM2) that is the target's own output head restricted to Vd.
        """
        with torch.no_grad():
            self.embed_tokens.weight.copy_(input_embeddings.to(self.embed_tokens.weight.dtype))
            if seed_lm_head:
                self.lm_head.weight.copy_(input_embeddings[selected_token_ids.cpu()].to(self.lm_head.weight.dtype))
        self.embed_tokens.weight.requires_grad_(False)

    def project_aux(self, aux_hidden_states: torch.Tensor) -> torch.Tensor:
        """``[B, S, 3Ht]`` -> ``[B, S, H]``: the step-0 hidden input."""
        return self.fc(aux_hidden_states.to(self.fc.weight.dtype))

    def step(self, input_ids: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor,
             **attention_kwargs) -> torch.Tensor:
        """One draft step: ``input_ids [B, S]``, ``hidden [B, S, H]``, ``positions [B, S]`` (M-RoPE: ``[3, B, S]``)
        -> output hidden ``[B, S, H]``."""
        embeds = self.embed_tokens(input_ids).to(hidden.dtype)
        return self.midlayer(embeds, hidden, positions, **attention_kwargs)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[B, S, H]`` -> ``[B, S, Vd]`` draft-vocabulary logits."""
        return self.lm_head(self.norm(hidden))

    def draft_to_target(self, draft_ids: torch.Tensor) -> torch.Tensor:
        """Map draft-vocabulary ids to target ids with ``d2t``."""
        return draft_ids + self.d2t[draft_ids]
