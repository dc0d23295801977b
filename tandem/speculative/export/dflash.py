"""The exported DFlash draft directory: the native format vLLM and SGLang load, and the speculators ``dflash`` format.

Native (``native``): ``config.json`` with ``architectures ["DFlashDraftModel"]``, ``model_type "qwen3"``, the
Qwen3 geometry, ``num_hidden_layers``, ``layer_types`` (all ``full_attention``: the block attends bidirectionally),
``block_size`` (top level, and inside ``dflash_config`` where newer checkpoints keep it), ``num_target_layers`` and
``dflash_config {mask_token_id, target_layer_ids}`` with the target layers in the reference's numbering (a layer's
*output*, HF ``hidden_states[i + 1]``: SGLang and vLLM each add one to reach the decoder input they capture).
Speculators (``speculators``): ``speculators_model_type "dflash"``, ``transformer_layer_config``, ``block_size``,
``mask_token_id`` and ``aux_hidden_state_layer_ids`` in vLLM's numbering (the input of layer ``i + 1``).

Both weights files hold the same names, without a ``model.`` prefix: ``layers.{i}.*``, ``fc.weight``,
``hidden_norm.weight``, ``norm.weight``; the embedding and the head are the target's and are not stored. The
metadata carries tandem's record of the run (``RECORD_METADATA_KEY``), where engines never look.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tandem.speculative.drafts.dflash import DFlashDraftConfig, DFlashDraftModel
from tandem.speculative.export.eagle3 import RECORD_METADATA_KEY, write_draft_directory
from tandem.speculative.export.engine_conventions import dtype_name, parse_dtype, vllm_aux_layer_ids

DFLASH_EXPORT_FORMATS = ("native", "speculators")
DFLASH_ARCHITECTURE = "DFlashDraftModel"
DFLASH_SPECULATORS_ARCHITECTURE = "DFlashSpeculator"
DFLASH_EXPORT_DIRNAME = "dflash-draft"


def qwen3_fields(config: DFlashDraftConfig, dtype: torch.dtype) -> dict:
    """The Qwen3 decoder fields both formats carry."""
    out = {
        "model_type": "qwen3",
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "max_position_embeddings": config.max_position_embeddings,
        "vocab_size": config.vocab_size,
        "attention_bias": False,
        "tie_word_embeddings": False,
        "layer_types": ["full_attention"] * config.num_hidden_layers,
        "torch_dtype": dtype_name(dtype),
        "dtype": dtype_name(dtype),
    }
    out.update(config.extra)
    return out


def native_config(config: DFlashDraftConfig, dtype: torch.dtype) -> dict:
    """``config.json`` of the native format (read by vLLM's ``qwen3_dflash.py`` and SGLang's ``dflash.py``)."""
    return {
        "architectures": [DFLASH_ARCHITECTURE],
        **qwen3_fields(config, dtype),
        "block_size": config.block_size,
        "num_target_layers": config.num_target_layers,
        "dflash_config": {"mask_token_id": config.mask_token_id, "target_layer_ids": list(config.target_layer_ids),
                          "block_size": config.block_size},
    }


def speculators_dflash_config(config: DFlashDraftConfig, dtype: torch.dtype, verifier: str,
                              verifier_architectures: list[str] | None = None) -> dict:
    """``config.json`` of the speculators ``dflash`` format (``vllm-project/speculators``)."""
    return {
        "architectures": [DFLASH_SPECULATORS_ARCHITECTURE],
        "speculators_model_type": "dflash",
        "transformer_layer_config": qwen3_fields(config, dtype),
        "draft_vocab_size": config.vocab_size,
        "block_size": config.block_size,
        "target_hidden_size": config.hidden_size,
        "aux_hidden_state_layer_ids": vllm_aux_layer_ids(config.target_layer_ids),
        "mask_token_id": config.mask_token_id,
        "sliding_window_non_causal": False,
        "sample_from_anchor": False,
        "speculators_config": {
            "algorithm": "dflash",
            "default_proposal_method": "greedy",
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": config.block_size - 1}],
            "verifier": {"name_or_path": verifier, "architectures": list(verifier_architectures or [])},
        },
        "torch_dtype": dtype_name(dtype),
    }


def export_dflash_draft(draft: DFlashDraftModel, out_dir: str | Path, dtype: torch.dtype | None = None, *,
                        export_format: str = "native", record: dict | None = None, verifier: str = "",
                        verifier_architectures: list[str] | None = None) -> Path:
    """Write the DFlash directory serving engines load; returns it (``dtype``: the weights', default the draft's)."""
    if export_format not in DFLASH_EXPORT_FORMATS:
        raise ValueError(f"DFlash export format must be one of {DFLASH_EXPORT_FORMATS}, got {export_format!r}")
    out_dir = Path(out_dir)
    dtype = parse_dtype(dtype or draft.fc.weight.dtype)
    if export_format == "speculators":
        if not verifier:
            raise ValueError("the speculators format needs the verifier (target) name or path")
        config = speculators_dflash_config(draft.config, dtype, verifier, verifier_architectures)
    else:
        config = native_config(draft.config, dtype)
    tensors = {k: v.detach().cpu().to(dtype).contiguous() for k, v in draft.trainable_state_dict().items()}
    return write_draft_directory(out_dir, config, tensors, record)


def is_dflash_export(path: str | Path) -> bool:
    """Whether ``path/config.json`` describes a DFlash draft (either format)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        raw = json.loads(config.read_text())
    except (ValueError, UnicodeDecodeError):
        return False  # not a readable config: the EAGLE-3 loader's checks name what is wrong with it
    if not isinstance(raw, dict):
        return False
    architectures = raw.get("architectures")
    return raw.get("speculators_model_type") == "dflash" or (
        isinstance(architectures, list) and DFLASH_ARCHITECTURE in architectures)


def dflash_config_from(raw: dict) -> DFlashDraftConfig:
    """A ``DFlashDraftConfig`` from either format's ``config.json``."""
    speculators = raw.get("speculators_model_type") == "dflash"
    layer = raw["transformer_layer_config"] if speculators else raw
    dflash = raw.get("dflash_config") or {}
    if speculators:
        layer_ids, mask_id = [int(i) - 1 for i in raw["aux_hidden_state_layer_ids"]], raw["mask_token_id"]
    else:
        layer_ids, mask_id = dflash["target_layer_ids"], dflash["mask_token_id"]
    return DFlashDraftConfig(
        hidden_size=layer["hidden_size"], intermediate_size=layer["intermediate_size"],
        num_hidden_layers=layer["num_hidden_layers"], num_attention_heads=layer["num_attention_heads"],
        num_key_value_heads=layer.get("num_key_value_heads", layer["num_attention_heads"]),
        head_dim=layer.get("head_dim") or layer["hidden_size"] // layer["num_attention_heads"],
        rms_norm_eps=layer["rms_norm_eps"], rope_theta=layer.get("rope_theta", 10000.0),
        max_position_embeddings=layer["max_position_embeddings"], vocab_size=layer["vocab_size"],
        block_size=int(dflash.get("block_size", raw.get("block_size", 16))),
        target_layer_ids=[int(i) for i in layer_ids], num_target_layers=int(raw.get("num_target_layers", 0)),
        mask_token_id=int(mask_id),
        extra={k: layer[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in layer},
    )


def load_dflash_draft(path: str | Path, input_embeddings: torch.Tensor, output_head: torch.Tensor) -> DFlashDraftModel:
    """Load an exported DFlash directory (either format) in float32, with the target's embedding and head ``[V, H]``."""
    path = Path(path)
    for needed in (path / "config.json", path / "model.safetensors"):
        if not needed.is_file():
            raise FileNotFoundError(f"not an exported DFlash draft: {needed} is missing")
    draft = DFlashDraftModel(dflash_config_from(json.loads((path / "config.json").read_text())))
    draft.set_target_weights(input_embeddings, output_head)
    state = {k: v.float() for k, v in load_file(str(path / "model.safetensors")).items()}
    expected = set(draft.trainable_state_dict())
    if set(state) != expected:
        raise ValueError(f"{path / 'model.safetensors'} holds {sorted(set(state) ^ expected)[:8]} beyond or short of "
                         f"a {draft.config.num_hidden_layers}-layer DFlash draft's weights")
    draft.load_state_dict(state, strict=False)
    return draft


def read_dflash_record(path: str | Path) -> dict | None:
    """tandem's record in an exported DFlash draft's weights file (None when written without one)."""
    with safe_open(str(Path(path) / "model.safetensors"), "pt") as handle:
        raw = (handle.metadata() or {}).get(RECORD_METADATA_KEY)
    return json.loads(raw) if raw else None
