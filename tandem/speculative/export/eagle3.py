"""Checkpoints: the exported EAGLE-3 directory serving engines load, and the trainer's resume state.

Two export formats (``export_draft(..., export_format=...)``):

``sglang`` (default; SGLang and vLLM both load it as ``LlamaForCausalLMEagle3``)::

    out/config.json          architectures ["LlamaForCausalLMEagle3"], Llama fields, draft_vocab_size,
                             the aux layers in each engine's numbering (below), torch_dtype
    out/model.safetensors    embed_tokens.weight, fc.weight, midlayer.*, norm.weight, lm_head.weight,
                             d2t, t2d (both left out when the draft vocabulary is the whole target's)

``speculators`` (vLLM's native format, what ``vllm-project/speculators`` writes)::

    out/config.json          speculators_model_type "eagle3", transformer_layer_config, speculators_config
                             (proposal method, verifier), draft_vocab_size, norm_before_residual false,
                             eagle_aux_hidden_state_layer_ids (vLLM numbering)
    out/model.safetensors    the same tensors, the decoder layer under layers.0.* instead of midlayer.*

Aux layer numbering. tandem trains on the *outputs* of decoder layers ``i``. SGLang reads
``eagle_config.eagle_aux_hidden_state_layer_ids`` and captures the input of layer ``id + 1`` (so it is
given ``i``); vLLM reads the top-level ``eagle_aux_hidden_state_layer_ids`` and captures the input of
layer ``id`` (its id 0 is the embeddings; so it is given ``i + 1``). Each reads only its own key
(SGLang merely counts the top-level one, which has the same length); ``tests/test_engine_conformance.py``
states the engines' rules with their sources and checks this directory against them.

The weights file's metadata carries tandem's own record (``RECORD_METADATA_KEY``): the target the draft
was trained against, its aux layers and the draft vocabulary's digest (see ``identity.py``).

Resume state (``save_training_state``) is a local file written atomically: a crash while writing leaves
the previous checkpoint in place, never a half-written one. It holds optimizer state, so it uses
``torch.save``; it is only ever read from the trainer's own disk (``weights_only=True``), never a socket.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tandem.speculative.eagle.draft import Eagle3DraftConfig, Eagle3DraftModel

EAGLE3_ARCHITECTURE = "LlamaForCausalLMEagle3"
SPECULATORS_ARCHITECTURE = "Eagle3Speculator"
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


def sglang_aux_layer_ids(aux_layer_ids: list[int]) -> list[int]:
    """SGLang's numbering of the trained layers: it captures the input of layer ``id + 1``."""
    return [int(i) for i in aux_layer_ids]


def vllm_aux_layer_ids(aux_layer_ids: list[int]) -> list[int]:
    """vLLM's numbering of the trained layers: it captures the input of layer ``id`` (0 = embeddings)."""
    return [int(i) + 1 for i in aux_layer_ids]


def has_identity_vocab(draft: Eagle3DraftModel) -> bool:
    """True when the draft's vocabulary is the whole target vocabulary with no remapping."""
    return draft.config.draft_vocab_size == draft.config.vocab_size and not bool(draft.d2t.any())


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
    out.update(config.extra)
    return out


def export_config(config: Eagle3DraftConfig, dtype: torch.dtype, aux_layer_ids: list[int] | None = None) -> dict:
    """The ``config.json`` of the ``sglang`` format (``LlamaForCausalLMEagle3``)."""
    out = {"architectures": [EAGLE3_ARCHITECTURE], **layer_config(config, dtype),
           "draft_vocab_size": config.draft_vocab_size}
    if config.target_hidden_size != config.hidden_size:
        out["target_hidden_size"] = config.target_hidden_size
    if aux_layer_ids is not None:
        out["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": sglang_aux_layer_ids(aux_layer_ids),
                               "use_aux_hidden_state": True}
        out["eagle_aux_hidden_state_layer_ids"] = vllm_aux_layer_ids(aux_layer_ids)
    return out


def speculators_config(config: Eagle3DraftConfig, dtype: torch.dtype, aux_layer_ids: list[int],
                       verifier: str, verifier_architectures: list[str] | None = None,
                       speculative_tokens: int = 3) -> dict:
    """The ``config.json`` of the ``speculators`` format: the fields vLLM's speculators adapter reads.

    ``norm_before_residual`` is written false on purpose: the adapter's default is true (the residual
    taken after ``hidden_norm``), and tandem's draft keeps the un-normalised hidden state as residual.
    """
    out = {
        "architectures": [SPECULATORS_ARCHITECTURE],
        "speculators_model_type": "eagle3",
        "transformer_layer_config": layer_config(config, dtype),
        "draft_vocab_size": config.draft_vocab_size,
        "target_hidden_size": config.target_hidden_size,
        "norm_before_residual": False,
        "norm_before_fc": False,
        "eagle_aux_hidden_state_layer_ids": vllm_aux_layer_ids(aux_layer_ids),
        "speculators_config": {
            "algorithm": "eagle3",
            "default_proposal_method": "greedy",
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": int(speculative_tokens)}],
            "verifier": {"name_or_path": verifier, "architectures": list(verifier_architectures or [])},
        },
        "torch_dtype": dtype_name(dtype),
    }
    return out


def export_tensors(draft: Eagle3DraftModel, dtype: torch.dtype, export_format: str = "sglang") -> dict[str, torch.Tensor]:
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


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then rename over ``path``: readers see the old file or the new, whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        # The rename itself must reach the disk too, or a power loss could still lose the new file.
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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
        config = speculators_config(draft.config, dtype, aux_layer_ids, verifier, verifier_architectures, speculative_tokens)
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
        stored = prefix + key.removeprefix(DECODER_PREFIX["sglang"]) if key.startswith(DECODER_PREFIX["sglang"]) else key
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


def save_training_state(state: dict, path: str | Path) -> None:
    """Atomically write a trainer ``state_dict()`` (local disk only)."""
    atomic_write(Path(path), lambda tmp: torch.save(state, tmp))


def load_training_state(path: str | Path) -> dict:
    """Read a state written by ``save_training_state``; refuses anything but tensors and plain containers."""
    return torch.load(path, map_location="cpu", weights_only=True)


# Only names tandem writes: a user's step_best.pt or step_60_backup.pt is not one of them.
_CHECKPOINT_NAME = re.compile(r"step_(0|[1-9][0-9]*)\.pt")


def checkpoint_step(path: str | Path) -> int | None:
    """N for a file tandem names ``step_N.pt``; None for anything else."""
    match = _CHECKPOINT_NAME.fullmatch(Path(path).name)
    return int(match.group(1)) if match else None


def latest_checkpoint(checkpoint_dir: str | Path) -> Path | None:
    """The newest ``step_N.pt`` under ``checkpoint_dir`` (by N), or None; other files are not checkpoints."""
    directory = Path(checkpoint_dir)
    if not directory.is_dir():
        return None
    found = [(step, p) for p in directory.iterdir() if (step := checkpoint_step(p)) is not None and p.is_file()]
    return max(found)[1] if found else None
