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
    metadata = {"format": "pt"}
    if record is not None:
        metadata[RECORD_METADATA_KEY] = json.dumps(record, sort_keys=True)
    atomic_write(out_dir / "model.safetensors", lambda tmp: save_file(tensors, tmp, metadata=metadata))
    atomic_write(out_dir / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))
    return out_dir


def read_export_record(path: str | Path) -> dict | None:
    """tandem's record in an exported draft's weights file (None for drafts written without one)."""
    with safe_open(str(Path(path) / "model.safetensors"), "pt") as handle:
        raw = (handle.metadata() or {}).get(RECORD_METADATA_KEY)
    return json.loads(raw) if raw else None


def _draft_config_from(raw: dict) -> Eagle3DraftConfig:
    """An ``Eagle3DraftConfig`` from either format's ``config.json``."""
    layer = raw.get("transformer_layer_config", raw)
    rope = layer.get("rope_theta", (layer.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    return Eagle3DraftConfig(
        hidden_size=layer["hidden_size"],
        intermediate_size=layer["intermediate_size"],
        num_attention_heads=layer["num_attention_heads"],
        num_key_value_heads=layer.get("num_key_value_heads", layer["num_attention_heads"]),
        head_dim=layer.get("head_dim") or layer["hidden_size"] // layer["num_attention_heads"],
        rms_norm_eps=layer["rms_norm_eps"],
        rope_theta=rope,
        max_position_embeddings=layer["max_position_embeddings"],
        vocab_size=layer["vocab_size"],
        draft_vocab_size=raw.get("draft_vocab_size") or layer["vocab_size"],
        target_hidden_size=raw.get("target_hidden_size") or layer["hidden_size"],
        extra={k: layer[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in layer},
    )


def exported_format(raw: dict, where: Path) -> str:
    """``"sglang"`` or ``"speculators"`` from a ``config.json``; a clear error for anything else."""
    if raw.get("speculators_model_type") == "eagle3":
        return "speculators"
    if EAGLE3_ARCHITECTURE in raw.get("architectures", []):
        return "sglang"
    raise ValueError(f"{where} is not an EAGLE-3 draft (architectures={raw.get('architectures')}, "
                     f"speculators_model_type={raw.get('speculators_model_type')})")


def exported_aux_layer_ids(path: str | Path) -> list[int] | None:
    """The layers an exported draft was trained on, in tandem's numbering (layer outputs), or None."""
    raw = json.loads((Path(path) / "config.json").read_text())
    nested = (raw.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    if nested:
        return [int(i) for i in nested]
    top = raw.get("eagle_aux_hidden_state_layer_ids")
    return [int(i) - 1 for i in top] if top else None


def load_exported_draft(path: str | Path, dtype: torch.dtype = torch.float32) -> Eagle3DraftModel:
    """Load an exported EAGLE-3 directory (either format) back into an ``Eagle3DraftModel``.

    A directory without ``d2t``/``t2d`` is a draft over the whole target vocabulary (the identity map).
    """
    path = Path(path)
    config_path, weights_path = path / "config.json", path / "model.safetensors"
    for needed in (config_path, weights_path):
        if not needed.is_file():
            raise FileNotFoundError(f"not an exported EAGLE-3 draft: {needed} is missing")
    raw = json.loads(config_path.read_text())
    export_format = exported_format(raw, config_path)
    draft = Eagle3DraftModel(_draft_config_from(raw))
    tensors = load_file(str(weights_path))
    prefix = DECODER_PREFIX[export_format]
    state = {}
    for key in EXPORT_WEIGHT_KEYS:
        sglang_prefix = DECODER_PREFIX["sglang"]
        stored = prefix + key.removeprefix(sglang_prefix) if key.startswith(sglang_prefix) else key
        if stored in tensors:
            state[key] = tensors[stored]
    missing = [k for k in EXPORT_WEIGHT_KEYS if k not in state and k not in VOCAB_MAPPING_KEYS]
    if missing:
        raise ValueError(f"{weights_path} lacks keys {missing}")
    if "d2t" not in state:
        if draft.config.draft_vocab_size != draft.config.vocab_size:
            raise ValueError(f"{weights_path} has no d2t but its draft vocabulary ({draft.config.draft_vocab_size}) "
                             f"is smaller than the target's ({draft.config.vocab_size})")
        state["d2t"] = torch.zeros(draft.config.draft_vocab_size, dtype=torch.long)
        state["t2d"] = torch.ones(draft.config.vocab_size, dtype=torch.bool)
    elif "t2d" not in state:  # both engines skip t2d; rebuild it from d2t
        t2d = torch.zeros(draft.config.vocab_size, dtype=torch.bool)
        t2d[torch.arange(draft.config.draft_vocab_size) + state["d2t"].long()] = True
        state["t2d"] = t2d
    draft.load_state_dict(state, strict=True)  # copies into the float32 parameters, whatever the stored dtype
    draft.embed_tokens.weight.requires_grad_(False)
    return draft.to(dtype)


