"""The exported EAGLE-3 draft directory: write it in either engine format, read it back, read its record.

``export_draft(..., export_format=...)`` writes ``config.json`` (``sglang.py`` or ``speculators.py``) and
``model.safetensors``: ``embed_tokens.weight``, ``fc.weight``, the decoder layer (``midlayer.*`` for sglang,
``layers.0.*`` for speculators), ``norm.weight``, ``lm_head.weight``, and ``d2t``/``t2d`` unless the draft
vocabulary is the whole target's. The weights file's metadata carries tandem's own record
(``RECORD_METADATA_KEY``: the target the draft was trained against, its aux layers and the draft vocabulary's
digest; see ``target/identity.py``), where engines never look.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tandem.speculative.atomic_files import atomic_write
from tandem.speculative.drafts.eagle3 import Eagle3DraftConfig, Eagle3DraftModel
from tandem.speculative.export.draft_checks import (
    check_vocab_mapping,
    check_weights_against,
    draft_config_fields,
    read_json_object,
    weights_header,
)
from tandem.speculative.export.engine_conventions import parse_dtype
from tandem.speculative.export.sglang import EAGLE3_ARCHITECTURE, export_config
from tandem.speculative.export.speculators import speculators_config

EXPORT_FORMATS = ("sglang", "speculators")
# The exported folder's name: vLLM, given no "method", guesses eagle3 from "eagle3" in the path.
EXPORT_DIRNAME = "eagle3-draft"
RECORD_METADATA_KEY = "tandem_record"
DECODER_PREFIX = {"sglang": "midlayer.", "speculators": "layers.0."}
DECODER_WEIGHTS = [
    "input_layernorm.weight",
    "hidden_norm.weight",
    "post_attention_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
]
VOCAB_MAPPING_KEYS = ["d2t", "t2d"]
EXPORT_WEIGHT_KEYS = [
    "embed_tokens.weight",
    "fc.weight",
    *(DECODER_PREFIX["sglang"] + name for name in DECODER_WEIGHTS),
    "norm.weight",
    "lm_head.weight",
    *VOCAB_MAPPING_KEYS,
]
"""The ``sglang``-format keys of a draft with a reduced vocabulary (``Eagle3DraftModel``'s state dict)."""


def has_identity_vocab(draft: Eagle3DraftModel) -> bool:
    """True when the draft's vocabulary is the whole target vocabulary with no remapping."""
    return draft.config.draft_vocab_size == draft.config.vocab_size and not bool(draft.d2t.any())


def export_tensors(draft: Eagle3DraftModel, dtype: torch.dtype,
                   export_format: str = "sglang") -> dict[str, torch.Tensor]:
    """The weights file's tensors, floating point ones in ``dtype``; ``d2t``/``t2d`` only for a reduced vocabulary."""
    state = draft.state_dict()
    keys = [k for k in EXPORT_WEIGHT_KEYS if not (k in VOCAB_MAPPING_KEYS and has_identity_vocab(draft))]
    prefix = DECODER_PREFIX[export_format]
    tensors = {}
    for key in keys:
        value = state[key].detach().cpu().contiguous()
        name = prefix + key.removeprefix(DECODER_PREFIX["sglang"]) if key.startswith(DECODER_PREFIX["sglang"]) else key
        tensors[name] = value.to(dtype) if value.is_floating_point() else value
    return tensors


def write_draft_directory(out_dir: Path, config: dict, tensors: dict[str, torch.Tensor], record: dict | None) -> Path:
    """Write ``model.safetensors`` (tandem's ``record`` in its metadata, where engines never look) and
    ``config.json`` under ``out_dir``, each atomically; returns ``out_dir``. Every draft method's export ends here."""
    metadata = {"format": "pt"}
    if record is not None:
        metadata[RECORD_METADATA_KEY] = json.dumps(record, sort_keys=True)
    atomic_write(out_dir / "model.safetensors", lambda tmp: save_file(tensors, tmp, metadata=metadata))
    atomic_write(out_dir / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))
    return out_dir


def export_draft(draft: Eagle3DraftModel, out_dir: str | Path, dtype: torch.dtype | None = None,
                 aux_layer_ids: list[int] | None = None, *, export_format: str = "sglang",
                 record: dict | None = None, verifier: str = "", verifier_architectures: list[str] | None = None,
                 speculative_tokens: int = 3) -> Path:
    """Write the EAGLE-3 directory serving engines load; returns it.

    Arguments:
        dtype: the weights' dtype (default: the draft's own); the target's is what engines expect.
        aux_layer_ids: the target layers the draft was trained on, in tandem's numbering (layer outputs).
        export_format: ``"sglang"`` (SGLang and vLLM) or ``"speculators"`` (vLLM's native format; needs
            ``aux_layer_ids`` and ``verifier``, the target's name or path).
        record: tandem's record of the run (target identity, aux ids, vocabulary digest), kept in the
            weights file's metadata where engines never look.
    """
    if export_format not in EXPORT_FORMATS:
        raise ValueError(f"export format must be one of {EXPORT_FORMATS}, got {export_format!r}")
    out_dir = Path(out_dir)
    dtype = parse_dtype(dtype or draft.fc.weight.dtype)
    if export_format == "speculators":
        if aux_layer_ids is None or not verifier:
            raise ValueError("the speculators format needs the aux layer ids and the verifier (target) name")
        config = speculators_config(draft.config, dtype, aux_layer_ids, verifier, verifier_architectures,
                                    speculative_tokens)
    else:
        config = export_config(draft.config, dtype, aux_layer_ids)
    tensors = export_tensors(draft, dtype, export_format)
    return write_draft_directory(out_dir, config, tensors, record)


def read_export_record(path: str | Path) -> dict | None:
    """tandem's record in an exported draft's weights file (None for drafts written without one); a one-line
    ``ValueError`` when it is not a JSON object (or its ``target`` not one)."""
    weights_path = Path(path) / "model.safetensors"
    with safe_open(str(weights_path), "pt") as handle:
        raw = (handle.metadata() or {}).get(RECORD_METADATA_KEY)
    if not raw:
        return None
    try:
        record = json.loads(raw)
    except ValueError:
        record = None
    if not isinstance(record, dict) or not isinstance(record.get("target") or {}, dict):
        raise ValueError(f"{weights_path}: metadata field {RECORD_METADATA_KEY!r} must be a JSON object (with an "
                         f"object as its 'target'), got {raw[:60]!r}")
    return record

def _draft_config_from(raw: dict, where: str = "config.json") -> Eagle3DraftConfig:
    """An ``Eagle3DraftConfig`` from either format's ``config.json``, every field checked (``draft_checks.py``)."""
    return Eagle3DraftConfig(**draft_config_fields(raw, where))

def exported_format(raw: dict, where: Path) -> str:
    """``"sglang"`` or ``"speculators"`` from a ``config.json``; a clear error for anything else."""
    if raw.get("speculators_model_type") == "eagle3":
        return "speculators"
    architectures = raw.get("architectures")
    if isinstance(architectures, list) and EAGLE3_ARCHITECTURE in architectures:
        return "sglang"
    raise ValueError(f"{where} is not an EAGLE-3 draft (architectures={raw.get('architectures')}, "
                     f"speculators_model_type={raw.get('speculators_model_type')})")


def exported_aux_layer_ids(path: str | Path) -> list[int] | None:
    """The layers an exported draft was trained on, in tandem's numbering (layer outputs), or None."""
    config_path = Path(path) / "config.json"
    raw = read_json_object(config_path, "config.json")
    eagle_config = raw.get("eagle_config") or {}
    if not isinstance(eagle_config, dict):
        raise ValueError(f"{config_path}: field 'eagle_config' must be an object, got {type(eagle_config).__name__}")
    nested = _layer_ids(eagle_config, "eagle_aux_hidden_state_layer_ids", config_path)
    top = _layer_ids(raw, "eagle_aux_hidden_state_layer_ids", config_path)
    if nested:
        return nested
    return [i - 1 for i in top] if top else None


def _layer_ids(fields: dict, key: str, where: Path) -> list[int] | None:
    value = fields.get(key)
    if value is not None and (not isinstance(value, list)
                              or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value)):
        raise ValueError(f"{where}: field {key!r} must be a list of integers, got {str(value)[:60]}")
    return value


def _stored_name(export_format: str):
    """``key -> its name in a weights file of export_format`` (the decoder layer's prefix differs)."""
    prefix, sglang_prefix = DECODER_PREFIX[export_format], DECODER_PREFIX["sglang"]
    return lambda key: prefix + key.removeprefix(sglang_prefix) if key.startswith(sglang_prefix) else key

def load_exported_draft(path: str | Path, dtype: torch.dtype = torch.float32) -> Eagle3DraftModel:
    """Load an exported EAGLE-3 directory (either format) back into an ``Eagle3DraftModel``.

    A directory without ``d2t``/``t2d`` is a draft over the whole target vocabulary (the identity map). Nothing
    is allocated for the draft before its config and its weights file's header agree (``draft_checks.py``): a
    refusal is a one-line ``ValueError`` naming the file and the field or tensor.
    """
    path = Path(path)
    config_path, weights_path = path / "config.json", path / "model.safetensors"
    for needed in (config_path, weights_path):
        if not needed.is_file():
            raise FileNotFoundError(f"not an exported EAGLE-3 draft: {needed} is missing")
    raw = read_json_object(config_path, "config.json")
    export_format = exported_format(raw, config_path)
    config = _draft_config_from(raw, str(config_path))
    stored_name = _stored_name(export_format)
    with torch.device("meta"):  # the shapes the config implies, without allocating them
        expected = {key: value.shape for key, value in Eagle3DraftModel(config).state_dict().items()}
    header = weights_header(weights_path)
    missing = [k for k in EXPORT_WEIGHT_KEYS if stored_name(k) not in header and k not in VOCAB_MAPPING_KEYS]
    if missing:
        raise ValueError(f"{weights_path} lacks keys {missing}")
    if "d2t" not in header and config.draft_vocab_size != config.vocab_size:
        raise ValueError(f"{weights_path} has no d2t but its draft vocabulary ({config.draft_vocab_size}) "
                         f"is smaller than the target's ({config.vocab_size})")
    check_weights_against(expected, stored_name, header, weights_path, config_path)
    draft = Eagle3DraftModel(config)
    tensors = load_file(str(weights_path))
    state = {key: tensors[stored_name(key)] for key in EXPORT_WEIGHT_KEYS if stored_name(key) in tensors}
    if "d2t" not in state:
        state["d2t"] = torch.zeros(draft.config.draft_vocab_size, dtype=torch.long)
        state["t2d"] = torch.ones(draft.config.vocab_size, dtype=torch.bool)
    else:
        check_vocab_mapping(state["d2t"], state.get("t2d"), draft.config.vocab_size, weights_path)
    if "t2d" not in state:  # both engines skip t2d; rebuild it from d2t
        t2d = torch.zeros(draft.config.vocab_size, dtype=torch.bool)
        t2d[torch.arange(draft.config.draft_vocab_size) + state["d2t"].long()] = True
        state["t2d"] = t2d
    draft.load_state_dict(state, strict=True)  # copies into the float32 parameters, whatever the stored dtype
    draft.embed_tokens.weight.requires_grad_(False)
    return draft.to(dtype)


