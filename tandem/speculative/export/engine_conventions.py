"""What the serving engines expect of every draft they load: dtype names, Llama layer fields, aux-layer numbering.

tandem trains on the *outputs* of decoder layers ``i``. SGLang reads
``eagle_config.eagle_aux_hidden_state_layer_ids`` and captures the input of layer ``id + 1`` (so it is given
``i``); vLLM reads the top-level ``eagle_aux_hidden_state_layer_ids`` and captures the input of layer ``id``
(its id 0 is the embeddings; so it is given ``i + 1``). ``tests/speculative/export/test_engine_conformance.py``
states the engines' rules with their sources and checks the exports against them.
"""

from __future__ import annotations

import torch

from tandem.speculative.drafts.eagle3 import Eagle3DraftConfig


def sglang_aux_layer_ids(aux_layer_ids: list[int]) -> list[int]:
    """SGLang's numbering of the trained layers: it captures the input of layer ``id + 1``."""
    return [int(i) for i in aux_layer_ids]


def vllm_aux_layer_ids(aux_layer_ids: list[int]) -> list[int]:
    """vLLM's numbering of the trained layers: it captures the input of layer ``id`` (0 = embeddings)."""
    return [int(i) + 1 for i in aux_layer_ids]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"bfloat16"`` (or ``torch.bfloat16``) -> ``torch.bfloat16``; a clear error for anything else."""
    dtype = name if isinstance(name, torch.dtype) else getattr(torch, str(name).removeprefix("torch."), None)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"export dtype must be float32, bfloat16 or float16, got {name!r}")
    return dtype


def layer_config(config: Eagle3DraftConfig, dtype: torch.dtype) -> dict:
    """The Llama decoder-layer fields both formats carry."""
    out = {
        "model_type": "llama",
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "num_hidden_layers": 1,
        "hidden_act": "silu",
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "max_position_embeddings": config.max_position_embeddings,
        "vocab_size": config.vocab_size,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        # Both names: SGLang's --dtype auto reads it (a float32 draft beside a bf16 target became fp16).
        "torch_dtype": dtype_name(dtype),
        "dtype": dtype_name(dtype),
    }
    if config.mrope_section is not None:
        # SGLang's llama_eagle3 switches to the target's 3-D positions when the draft's rope_scaling has an
        # mrope_section; vLLM always gives them to the draft of an M-RoPE target (docs/design.md, section 8).
        # SpecForge's Qwen2.5-VL draft configs carry this same object.
        out["rope_scaling"] = {"type": "mrope", "mrope_section": list(config.mrope_section)}
    out.update(config.extra)
    return out
