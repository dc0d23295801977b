"""DFlashDraftModel: a block drafter that proposes a whole block of tokens in one forward (block diffusion).

Shapes: B batch, C context positions, Q block positions, H hidden (= the target's), K target layers read,
V target vocabulary, nH / nKV attention / key-value heads, D head dim.

The draft reads the outputs of K target layers at the committed positions (the *context*), projects them
with ``fc`` (K*H -> H) and ``hidden_norm``, and runs ``num_hidden_layers`` Qwen3-style layers (pre-norm,
per-head ``q_norm`` / ``k_norm``, RoPE, SwiGLU) over a query block ``[anchor, MASK x (B-1)]`` embedded with
the target's own embedding. In every layer the block's queries attend to keys and values made by that layer's
projections from ``[context; block]``: the whole block bidirectionally, the context only before the anchor.
The block's hidden states go through ``norm`` and the target's own ``lm_head``; slot k proposes the token k
places after the anchor. The embedding and the head are the target's, frozen, and not part of the export.

Training runs many blocks of one sequence in one pass under one mask (``block_attention_mask``); decoding
caches the context's keys and values layer by layer (``DFlashContextCache``) and drops the block's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from tandem.speculative.drafts.eagle3 import Eagle3MLP, RMSNorm, apply_rope, rope_cos_sin

DEFAULT_BLOCK_SIZE = 16
DEFAULT_NUM_LAYERS = 5


@dataclass(kw_only=True)
class DFlashDraftConfig:
    """Shape of a DFlash draft; ``from_target_config`` copies the target's attention geometry."""

    hidden_size: int = 576
    """Draft hidden size: the target's (the draft reads the target's embedding and head)."""
    intermediate_size: int = 1536
    """SwiGLU MLP width."""
    num_hidden_layers: int = DEFAULT_NUM_LAYERS
    """Draft decoder layers (the reference's Qwen3-8B draft has 5)."""
    num_attention_heads: int = 9
    num_key_value_heads: int = 3
    head_dim: int = 64
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    vocab_size: int = 49152
    """The target's vocabulary V (the draft proposes over all of it through the target's head)."""
    block_size: int = DEFAULT_BLOCK_SIZE
    """Trained block size B: the anchor and B-1 proposed tokens (the reference: 16)."""
    target_layer_ids: list[int] = field(default_factory=lambda: [1])
    """The target layers read, 0-based, each layer's *output* (HF ``hidden_states[i + 1]``), in ``fc``'s order."""
    num_target_layers: int = 30
    """The target's decoder layers (recorded in the export)."""
    mask_token_id: int = 0
    """The id embedded at the block's proposal slots (``choose_mask_token``)."""
    extra: dict = field(default_factory=dict)
    """Target config fields carried into the exported config (bos/eos ids, ...)."""

    @classmethod
    def from_target_config(cls, target_config, *, num_hidden_layers: int, block_size: int,
                           target_layer_ids: list[int], mask_token_id: int) -> "DFlashDraftConfig":
        heads = target_config.num_attention_heads
        head_dim = getattr(target_config, "head_dim", None) or target_config.hidden_size // heads
        rope = getattr(target_config, "rope_parameters", None) or {}
        rope_theta = rope.get("rope_theta", getattr(target_config, "rope_theta", 10000.0))
        extra = {k: getattr(target_config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                 if getattr(target_config, k, None) is not None}
        return cls(hidden_size=target_config.hidden_size, intermediate_size=target_config.intermediate_size,
                   num_hidden_layers=num_hidden_layers, num_attention_heads=heads,
                   num_key_value_heads=getattr(target_config, "num_key_value_heads", heads) or heads,
                   head_dim=head_dim, rms_norm_eps=float(target_config.rms_norm_eps), rope_theta=float(rope_theta),
                   max_position_embeddings=int(target_config.max_position_embeddings),
                   vocab_size=target_config.vocab_size, block_size=block_size,
                   target_layer_ids=[int(i) for i in target_layer_ids],
                   num_target_layers=int(target_config.num_hidden_layers), mask_token_id=int(mask_token_id),
                   extra=extra)

    def to_dict(self) -> dict:
        return asdict(self)


def choose_mask_token(tokenizer, vocab_size: int, token_counts: torch.Tensor | None = None) -> int:
    """The id the block's proposal slots are embedded with, chosen as the references do: the tokenizer's own mask
    token if it has one; else the first embedding row no token uses (Qwen3-8B: 151669, the row after its
    tokenizer's last id); else (a tokenizer that uses every row, as SmolLM2's) the highest id that never occurs in
    the training data (``token_counts [V]``), so the mask never stands for a token the draft must also read."""
    mask_id = getattr(tokenizer, "mask_token_id", None)
    if mask_id is not None and 0 <= int(mask_id) < vocab_size:
        return int(mask_id)
    if len(tokenizer) < vocab_size:
        return len(tokenizer)
    if token_counts is not None:
        unused = torch.nonzero(token_counts[:vocab_size] == 0).flatten()
        if unused.numel():
            return int(unused[-1])
    raise ValueError("no token id is free to serve as DFlash's mask token: the tokenizer has no mask token, uses "
                     "every embedding row, and the training data uses every id; pass --mask-token-id")


def block_attention_mask(anchors: torch.Tensor, context_length: int, block_size: int,
                         context_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Which keys each block query sees, for N blocks of one sequence run in one pass.

    Arguments:
        anchors: ``[B, N]`` long, the anchor position of each block.
        context_length: C, the context positions (keys ``0 .. C-1``; the blocks' keys follow them).
        block_size: the block size (queries and keys of block n are ``n*block_size .. (n+1)*block_size - 1``).
        context_valid: ``[B, C]`` bool, False on padding (None: all real).

    Returns:
        ``[B, N*block_size, C + N*block_size]`` bool: query of block n sees context key j iff ``j < anchors[n]``
        (and j is real), and every key of its own block.
    """
    batch, num_blocks = anchors.shape
    device = anchors.device
    query_anchor = anchors.repeat_interleave(block_size, dim=1)  # [B, N*bs]
    context = torch.arange(context_length, device=device)[None, None, :] < query_anchor[:, :, None]
    if context_valid is not None:
        context = context & context_valid[:, None, :]
    block_of = torch.arange(num_blocks, device=device).repeat_interleave(block_size)
    same_block = (block_of[:, None] == block_of[None, :]).expand(batch, -1, -1)
    return torch.cat([context, same_block], dim=-1)


class DFlashContextCache:
    """Decode time: each layer's keys and values of the context positions, ``[B, nKV, C, D]`` each."""

    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    @property
    def length(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[2]

    def extend(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append a layer's new context keys/values; returns the layer's whole context."""
        if self.keys[layer] is not None:
            keys = torch.cat([self.keys[layer], keys], dim=2)
            values = torch.cat([self.values[layer], values], dim=2)
        self.keys[layer], self.values[layer] = keys, values
        return keys, values


class DFlashAttention(nn.Module):
    """Queries from the block, keys/values from ``[context; block]`` with this layer's projections (q/k norm, RoPE)."""

    def __init__(self, config: DFlashDraftConfig):
        super().__init__()
        self.config = config
        d, h = config.head_dim, config.hidden_size
        self.q_proj = nn.Linear(h, config.num_attention_heads * d, bias=False)
        self.k_proj = nn.Linear(h, config.num_key_value_heads * d, bias=False)
        self.v_proj = nn.Linear(h, config.num_key_value_heads * d, bias=False)
        self.o_proj = nn.Linear(config.num_attention_heads * d, h, bias=False)
        self.q_norm = RMSNorm(d, config.rms_norm_eps)
        self.k_norm = RMSNorm(d, config.rms_norm_eps)

    def _heads(self, x: torch.Tensor, proj: nn.Linear) -> torch.Tensor:
        b, s, _ = x.shape
        return proj(x).view(b, s, -1, self.config.head_dim)

    def keys_values(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [B, T, H]`` at ``positions [B, T]`` -> keys and values ``[B, nKV, T, D]`` (keys normed and rotated)."""
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        keys = apply_rope(self.k_norm(self._heads(x, self.k_proj)).transpose(1, 2), cos, sin)
        return keys, self._heads(x, self.v_proj).transpose(1, 2)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, context_kv: tuple[torch.Tensor, torch.Tensor],
                mask: torch.Tensor | None) -> torch.Tensor:
        """``x [B, Q, H]`` block states at ``positions [B, Q]``; ``context_kv`` the context's keys/values
        ``[B, nKV, C, D]``; ``mask [B, Q, C + Q]`` bool or None (everything visible) -> ``[B, Q, H]``."""
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        query = apply_rope(self.q_norm(self._heads(x, self.q_proj)).transpose(1, 2), cos, sin)
        block_keys, block_values = self.keys_values(x, positions)
        keys = torch.cat([context_kv[0], block_keys], dim=2)
        values = torch.cat([context_kv[1], block_values], dim=2)
        attn_mask = None if mask is None else mask[:, None]
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=attn_mask, enable_gqa=True)
        b, _, q, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(b, q, -1))


class DFlashDecoderLayer(nn.Module):
    def __init__(self, config: DFlashDraftConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = DFlashAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = Eagle3MLP(config)  # the same SwiGLU MLP

    def forward(self, x: torch.Tensor, positions: torch.Tensor, context_kv, mask) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), positions, context_kv, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class DFlashDraftModel(nn.Module):
    """The DFlash draft. Parameter names are the exported checkpoint's keys; ``embed_tokens`` and ``lm_head`` are
    the target's, frozen, and never exported."""

    def __init__(self, config: DFlashDraftConfig):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(DFlashDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.fc = nn.Linear(len(config.target_layer_ids) * config.hidden_size, config.hidden_size, bias=False)
        self.hidden_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size).requires_grad_(False)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False).requires_grad_(False)

    FROZEN = ("embed_tokens.weight", "lm_head.weight")

    def set_target_weights(self, input_embeddings: torch.Tensor, output_head: torch.Tensor) -> None:
        """Copy the target's embedding ``[V, H]`` and output head ``[V, H]`` (both frozen)."""
        with torch.no_grad():
            self.embed_tokens.weight.copy_(input_embeddings.to(self.embed_tokens.weight.dtype))
            self.lm_head.weight.copy_(output_head.to(self.lm_head.weight.dtype))

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The draft's own weights: what checkpoints and exports keep (not the target's embedding and head)."""
        return {k: v for k, v in self.state_dict().items() if k not in self.FROZEN}

    def project_context(self, target_states: torch.Tensor) -> torch.Tensor:
        """``[B, C, K*H]`` target layer outputs -> ``[B, C, H]`` context states (``hidden_norm(fc(.))``)."""
        return self.hidden_norm(self.fc(target_states.to(self.fc.weight.dtype)))

    def block_inputs(self, anchor_ids: torch.Tensor, block_size: int) -> torch.Tensor:
        """``anchor_ids [B, N]`` -> block token ids ``[B, N*block_size]``: each anchor then ``block_size - 1`` masks."""
        batch, num_blocks = anchor_ids.shape
        ids = torch.full((batch, num_blocks, block_size), self.config.mask_token_id, dtype=torch.long,
                         device=anchor_ids.device)
        ids[:, :, 0] = anchor_ids
        return ids.view(batch, num_blocks * block_size)

    def forward(self, block_ids: torch.Tensor, block_positions: torch.Tensor, context: torch.Tensor,
                context_positions: torch.Tensor, mask: torch.Tensor | None = None,
                cache: DFlashContextCache | None = None) -> torch.Tensor:
        """The block's final hidden states (after ``norm``).

        Arguments:
            block_ids: ``[B, Q]`` long, the blocks' token ids (``block_inputs``).
            block_positions: ``[B, Q]`` long, each block slot's position (anchor + slot).
            context: ``[B, C, H]`` new context states (``project_context``); C may be 0.
            context_positions: ``[B, C]`` long, their positions.
            mask: ``[B, Q, C' + Q]`` bool over the keys ``[context; block]`` (C' = C, or the cache's length after
                this call); None: every key visible (one block at decode time).
            cache: decode time: the context's keys/values so far, extended here by ``context``.

        Returns:
            ``[B, Q, H]`` in the computation's dtype.
        """
        x = self.embed_tokens(block_ids).to(context.dtype)
        for index, layer in enumerate(self.layers):
            kv = layer.self_attn.keys_values(context, context_positions)
            if cache is not None:
                kv = cache.extend(index, *kv)
            x = layer(x, block_positions, kv, mask)
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[..., H]`` -> ``[..., V]`` through the target's head (frozen)."""
        return self.lm_head(hidden)
