"""Checkpoints: the exported EAGLE-3 directory SGLang and vLLM load, and the trainer's resume state.

Export layout (``export_draft``)::

    out/config.json          architectures ["LlamaForCausalLMEagle3"], Llama fields, draft_vocab_size
    out/model.safetensors    embed_tokens.weight, fc.weight, midlayer.*, norm.weight, lm_head.weight, d2t, t2d

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
from safetensors.torch import load_file, save_file

from tandem.speculative.eagle.draft import Eagle3DraftConfig, Eagle3DraftModel

EAGLE3_ARCHITECTURE = "LlamaForCausalLMEagle3"
EXPORT_WEIGHT_KEYS = [
    "embed_tokens.weight",
    "fc.weight",
    "midlayer.input_layernorm.weight",
    "midlayer.hidden_norm.weight",
    "midlayer.post_attention_layernorm.weight",
    "midlayer.self_attn.q_proj.weight",
    "midlayer.self_attn.k_proj.weight",
    "midlayer.self_attn.v_proj.weight",
    "midlayer.self_attn.o_proj.weight",
    "midlayer.mlp.gate_proj.weight",
    "midlayer.mlp.up_proj.weight",
    "midlayer.mlp.down_proj.weight",
    "norm.weight",
    "lm_head.weight",
    "d2t",
    "t2d",
]


def export_config(config: Eagle3DraftConfig, dtype: torch.dtype, aux_layer_ids: list[int] | None = None) -> dict:
    """The ``config.json`` of an exported draft."""
    out = {
        "architectures": [EAGLE3_ARCHITECTURE],
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
        "draft_vocab_size": config.draft_vocab_size,
        "tie_word_embeddings": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if config.target_hidden_size != config.hidden_size:
        out["target_hidden_size"] = config.target_hidden_size
    if aux_layer_ids is not None:
        out["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": list(aux_layer_ids), "use_aux_hidden_state": True}
    out.update(config.extra)
    return out


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
                 aux_layer_ids: list[int] | None = None) -> Path:
    """Write the SGLang/vLLM EAGLE-3 directory; returns it."""
    out_dir = Path(out_dir)
    state = draft.state_dict()
    dtype = dtype or draft.fc.weight.dtype
    tensors = {}
    for key in EXPORT_WEIGHT_KEYS:
        value = state[key].detach().cpu().contiguous()
        tensors[key] = value.to(dtype) if value.is_floating_point() else value
    atomic_write(out_dir / "model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    config = export_config(draft.config, dtype, aux_layer_ids)
    atomic_write(out_dir / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))
    return out_dir


def load_exported_draft(path: str | Path, dtype: torch.dtype = torch.float32) -> Eagle3DraftModel:
    """Load an exported EAGLE-3 directory back into an ``Eagle3DraftModel``."""
    path = Path(path)
    config_path, weights_path = path / "config.json", path / "model.safetensors"
    for needed in (config_path, weights_path):
        if not needed.is_file():
            raise FileNotFoundError(f"not an exported EAGLE-3 draft: {needed} is missing")
    raw = json.loads(config_path.read_text())
    if EAGLE3_ARCHITECTURE not in raw.get("architectures", []):
        raise ValueError(f"{config_path} is not an EAGLE-3 draft (architectures={raw.get('architectures')})")
    rope = raw.get("rope_theta", (raw.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    config = Eagle3DraftConfig(
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_attention_heads=raw["num_attention_heads"],
        num_key_value_heads=raw.get("num_key_value_heads", raw["num_attention_heads"]),
        head_dim=raw.get("head_dim") or raw["hidden_size"] // raw["num_attention_heads"],
        rms_norm_eps=raw["rms_norm_eps"],
        rope_theta=rope,
        max_position_embeddings=raw["max_position_embeddings"],
        vocab_size=raw["vocab_size"],
        draft_vocab_size=raw.get("draft_vocab_size", raw["vocab_size"]),
        target_hidden_size=raw.get("target_hidden_size", raw["hidden_size"]),
        extra={k: raw[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in raw},
    )
    draft = Eagle3DraftModel(config)
    tensors = load_file(str(weights_path))
    missing = [k for k in EXPORT_WEIGHT_KEYS if k not in tensors]
    if missing:
        raise ValueError(f"{weights_path} lacks keys {missing}")
    draft.load_state_dict({k: tensors[k] for k in EXPORT_WEIGHT_KEYS}, strict=True)
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
