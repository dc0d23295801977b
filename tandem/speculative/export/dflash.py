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
from tandem.speculative.export.draft_checks import (
    _shown,
    check_weights_against,
    draft_config_fields,
    positive_int,
    read_json_object,
    weights_header,
)
from tandem.speculative.export.eagle3 import RECORD_METADATA_KEY, write_draft_directory
from tandem.speculative.export.engine_conventions import dtype_name, parse_dtype, vllm_aux_layer_ids
from tandem.speculative.target.draft_layers import MAX_CAPTURED_LAYERS

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


# Bounds that keep a hostile config's arithmetic and decode-time allocations small (the reference's block is 16).
MAX_BLOCK_SIZE = 1024


def _layer_ids(value, key: str, where: str, low: int) -> list[int]:
    """A list of 1 .. ``MAX_CAPTURED_LAYERS`` distinct integers, each at least ``low``."""
    if not isinstance(value, list) or not value or len(value) > MAX_CAPTURED_LAYERS or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= low for i in value):
        raise ValueError(f"{where}: field {key!r} must be a list of 1 to {MAX_CAPTURED_LAYERS} integers >= {low}, "
                         f"got {_shown(value)}")
    if len(set(value)) != len(value):
        raise ValueError(f"{where}: field {key!r} names a layer twice: {_shown(value)}")
    return value


def _dflash_fields(raw: dict, where: str) -> tuple[dict, list[int], int, int]:
    """``(dflash_config or {}, target layer ids in the reference numbering, mask token id, block size)`` of either
    format, each checked."""
    speculators = raw.get("speculators_model_type") == "dflash"
    dflash = raw.get("dflash_config", {} if speculators else None)
    if not isinstance(dflash, dict):
        raise ValueError(f"{where}: field 'dflash_config' must be an object, got {_shown(dflash)}")
    if speculators:  # vLLM's numbering: the input of layer i, so the reference's i - 1
        layer_ids = [i - 1 for i in _layer_ids(raw.get("aux_hidden_state_layer_ids"), "aux_hidden_state_layer_ids",
                                               where, 1)]
        mask_key, mask_id = "mask_token_id", raw.get("mask_token_id")
    else:
        layer_ids = _layer_ids(dflash.get("target_layer_ids"), "dflash_config.target_layer_ids", where, 0)
        mask_key, mask_id = "dflash_config.mask_token_id", dflash.get("mask_token_id")
    if isinstance(mask_id, bool) or not isinstance(mask_id, int) or mask_id < 0:
        raise ValueError(f"{where}: field {mask_key!r} must be a token id (an integer >= 0), got {_shown(mask_id)}")
    block_key = "dflash_config.block_size" if "block_size" in dflash else "block_size"
    block_size = dflash.get("block_size", raw.get("block_size", 16))
    if isinstance(block_size, bool) or not isinstance(block_size, int) or not 2 <= block_size <= MAX_BLOCK_SIZE:
        raise ValueError(f"{where}: field {block_key!r} must be an integer from 2 to {MAX_BLOCK_SIZE}, "
                         f"got {_shown(block_size)}")
    return dflash, layer_ids, mask_id, block_size


def dflash_config_from(raw: dict, where: str = "config.json") -> DFlashDraftConfig:
    """A ``DFlashDraftConfig`` from either format's ``config.json``, every field checked for type and range before
    anything is sized by it (``where`` names the file in the one-line ``ValueError``)."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: config.json must be a JSON object, got {type(raw).__name__}")
    fields = draft_config_fields(raw, where)  # the decoder geometry, checked as EAGLE-3's is
    if fields["draft_vocab_size"] != fields["vocab_size"]:
        raise ValueError(f"{where}: field 'draft_vocab_size' ({fields['draft_vocab_size']}) differs from vocab_size "
                         f"({fields['vocab_size']}): a DFlash draft here proposes over the whole target vocabulary")
    layer = raw.get("transformer_layer_config", raw)
    layers = positive_int(layer, "num_hidden_layers", where)
    _, layer_ids, mask_id, block_size = _dflash_fields(raw, where)
    if mask_id >= fields["vocab_size"]:
        raise ValueError(f"{where}: the mask token id {mask_id} is outside the vocabulary [0, {fields['vocab_size']})")
    target_layers = raw.get("num_target_layers", 0)
    if isinstance(target_layers, bool) or not isinstance(target_layers, int) or not 0 <= target_layers <= 1 << 16:
        raise ValueError(f"{where}: field 'num_target_layers' must be an integer >= 0, got {_shown(target_layers)}")
    if target_layers and max(layer_ids) >= target_layers:
        raise ValueError(f"{where}: target layer {max(layer_ids)} is past the target's {target_layers} layers "
                         f"(num_target_layers)")
    return DFlashDraftConfig(
        hidden_size=fields["hidden_size"], intermediate_size=fields["intermediate_size"], num_hidden_layers=layers,
        num_attention_heads=fields["num_attention_heads"], num_key_value_heads=fields["num_key_value_heads"],
        head_dim=fields["head_dim"], rms_norm_eps=fields["rms_norm_eps"], rope_theta=fields["rope_theta"],
        max_position_embeddings=fields["max_position_embeddings"], vocab_size=fields["vocab_size"],
        block_size=block_size, target_layer_ids=layer_ids, num_target_layers=target_layers, mask_token_id=mask_id,
        extra=fields["extra"])


def _check_header(config: DFlashDraftConfig, header: dict, weights_path: Path, config_path: Path) -> None:
    """The weights file's header (nothing loaded) holds exactly the tensors ``config`` implies, in their shapes."""
    stored_layers = {int(n.split(".")[1]) for n in header if n.startswith("layers.") and n.split(".")[1].isdigit()}
    if len(stored_layers) != config.num_hidden_layers:
        raise ValueError(f"{weights_path} holds {len(stored_layers)} decoder layers but {config_path.name} "
                         f"(num_hidden_layers) says {config.num_hidden_layers}")
    with torch.device("meta"):  # the shapes the config implies, without allocating them
        expected = {k: v.shape for k, v in DFlashDraftModel(config).trainable_state_dict().items()}
    if set(header) != set(expected):
        raise ValueError(f"{weights_path} holds {sorted(set(header) ^ set(expected))[:8]} beyond or short of "
                         f"a {config.num_hidden_layers}-layer DFlash draft's weights")
    check_weights_against(expected, lambda key: key, header, weights_path, config_path, _DFLASH_SIZED_BY)


_DFLASH_SIZED_BY = {"fc.weight": ("hidden_size", "target_layer_ids")}


def checked_dflash_config(path: str | Path) -> DFlashDraftConfig:
    """The config of the exported DFlash directory ``path`` (either format), once its fields and its weights file's
    header (nothing loaded) agree: a refusal is a one-line ``ValueError`` naming the file and the field."""
    path = Path(path)
    config_path, weights_path = path / "config.json", path / "model.safetensors"
    for needed in (config_path, weights_path):
        if not needed.is_file():
            raise FileNotFoundError(f"not an exported DFlash draft: {needed} is missing")
    config = dflash_config_from(read_json_object(config_path, "config.json"), str(config_path))
    _check_header(config, weights_header(weights_path), weights_path, config_path)
    return config


def load_dflash_draft(path: str | Path, input_embeddings: torch.Tensor, output_head: torch.Tensor) -> DFlashDraftModel:
    """Load an exported DFlash directory (either format) in float32, with the target's embedding and head ``[V, H]``.

    Nothing is allocated for the draft before its config, its weights file's header and the target's embedding
    agree (``checked_dflash_config``, as ``eagle3.load_exported_draft`` does for EAGLE-3).
    """
    config = checked_dflash_config(path)
    target_shape = (config.vocab_size, config.hidden_size)
    for name, weight in (("embedding", input_embeddings), ("output head", output_head)):
        if tuple(weight.shape) != target_shape:
            raise ValueError(f"{Path(path) / 'config.json'}: vocab_size x hidden_size {list(target_shape)} is not "
                             f"the target's {name} {list(weight.shape)}: a draft for another target")
    draft = DFlashDraftModel(config)
    draft.set_target_weights(input_embeddings, output_head)
    state = {k: v.float() for k, v in load_file(str(Path(path) / "model.safetensors")).items()}
    draft.load_state_dict(state, strict=False)
    return draft


def read_dflash_record(path: str | Path) -> dict | None:
    """tandem's record in an exported DFlash draft's weights file (None when written without one)."""
    with safe_open(str(Path(path) / "model.safetensors"), "pt") as handle:
        raw = (handle.metadata() or {}).get(RECORD_METADATA_KEY)
    return json.loads(raw) if raw else None
