"""What an exported EAGLE-3 draft from elsewhere must satisfy before tandem builds a tensor for it.

``tandem export`` and ``tandem eval`` read drafts that other tools, other people or a damaged disk wrote. The
config alone must never size an allocation: a 323 KiB draft whose ``config.json`` claimed a vocabulary of
2**32 once made the loader ask for 16 TiB. So the loader checks, in this order and before building the model,
that the config's fields have the right types and sensible values, and that every tensor the config implies
has exactly the shape and kind of dtype the weights file's header announces (read from the header, no tensor
loaded); after loading, that ``d2t``/``t2d`` map the draft vocabulary into the target's, one to one. Every
refusal is a ``ValueError`` of one line naming the file and the field or tensor.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors import safe_open

# A draft's sizes are checked against its weights; these only keep the arithmetic of absurd values finite.
_MAX_SIZE = 1 << 31
_TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")
_FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})
_INTEGER_DTYPES = frozenset({"I64", "I32", "I16", "I8", "U8"})
# Which config fields size each weight: named in a refusal of that weight's shape.
_SIZED_BY = {
    "embed_tokens.weight": ("vocab_size", "hidden_size"),
    "fc.weight": ("hidden_size", "target_hidden_size"),
    "self_attn.q_proj.weight": ("num_attention_heads", "head_dim", "hidden_size"),
    "self_attn.k_proj.weight": ("num_key_value_heads", "head_dim", "hidden_size"),
    "self_attn.v_proj.weight": ("num_key_value_heads", "head_dim", "hidden_size"),
    "self_attn.o_proj.weight": ("hidden_size", "num_attention_heads", "head_dim"),
    "mlp.gate_proj.weight": ("intermediate_size", "hidden_size"),
    "mlp.up_proj.weight": ("intermediate_size", "hidden_size"),
    "mlp.down_proj.weight": ("hidden_size", "intermediate_size"),
    "lm_head.weight": ("draft_vocab_size", "hidden_size"),
    "d2t": ("draft_vocab_size",),
    "t2d": ("vocab_size",),
}


def read_json_object(path: Path, what: str = "") -> dict:
    """The JSON object in ``path``; a one-line ``ValueError`` naming the file when it is not one."""
    try:
        raw = json.loads(Path(path).read_text())
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc.reason})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: {what or 'the file'} must be a JSON object, got {type(raw).__name__}")
    return raw


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def positive_int(fields: dict, key: str, where: str, default=None) -> int:
    """``fields[key]`` as a positive integer (bools, strings and floats refused); ``default`` when absent."""
    value = fields.get(key, default)
    if value is None:
        raise ValueError(f"{where}: field {key!r} is missing")
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= _MAX_SIZE:
        raise ValueError(f"{where}: field {key!r} must be a positive integer (at most 2**31), got {_shown(value)}")
    return value


def positive_float(fields: dict, key: str, where: str, default=None) -> float:
    """``fields[key]`` as a finite positive number; ``default`` when absent."""
    value = fields.get(key, default)
    if value is None:
        raise ValueError(f"{where}: field {key!r} is missing")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{where}: field {key!r} must be a positive number, got {_shown(value)}")
    return float(value)


def token_id_field(fields: dict, key: str, where: str):
    """A ``bos/eos/pad_token_id``: an integer, a list of them, or null."""
    value = fields.get(key)
    ids = value if isinstance(value, list) else [value]
    if value is not None and not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ValueError(f"{where}: field {key!r} must be a token id, a list of them or null, got {_shown(value)}")
    return value


def draft_config_fields(raw: dict, where: str) -> dict:
    """The ``Eagle3DraftConfig`` keywords of a ``config.json`` of either format, each checked (see the module
    docstring); ``where`` names the file in a refusal."""
    layer = raw.get("transformer_layer_config", raw)
    if not isinstance(layer, dict):
        raise ValueError(f"{where}: field 'transformer_layer_config' must be an object, got {type(layer).__name__}")
    hidden = positive_int(layer, "hidden_size", where)
    heads = positive_int(layer, "num_attention_heads", where)
    kv_heads = positive_int(layer, "num_key_value_heads", where, default=heads)
    if heads % kv_heads:
        raise ValueError(f"{where}: field 'num_key_value_heads' ({kv_heads}) must divide num_attention_heads ({heads})")
    if layer.get("head_dim") is None and hidden % heads:
        raise ValueError(f"{where}: field 'num_attention_heads' ({heads}) must divide hidden_size ({hidden}) "
                         f"when no head_dim is given")
    head_dim = positive_int(layer, "head_dim", where, default=hidden // heads)
    rope_parameters = layer.get("rope_parameters") or {}
    if not isinstance(rope_parameters, dict):
        raise ValueError(f"{where}: field 'rope_parameters' must be an object, got {type(rope_parameters).__name__}")
    mrope_section = _mrope_section(layer, head_dim, where)
    vocab = positive_int(layer, "vocab_size", where)
    draft_vocab = positive_int(raw, "draft_vocab_size", where, default=vocab)
    if draft_vocab > vocab:
        raise ValueError(f"{where}: field 'draft_vocab_size' ({draft_vocab}) exceeds vocab_size ({vocab})")
    return dict(
        hidden_size=hidden,
        intermediate_size=positive_int(layer, "intermediate_size", where),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=positive_float(layer, "rms_norm_eps", where),
        rope_theta=positive_float(layer, "rope_theta", where,
                                  default=positive_float(rope_parameters, "rope_theta", where, default=10000.0)),
        max_position_embeddings=positive_int(layer, "max_position_embeddings", where),
        vocab_size=vocab,
        draft_vocab_size=draft_vocab,
        target_hidden_size=positive_int(raw, "target_hidden_size", where, default=hidden),
        mrope_section=mrope_section,
        extra={k: token_id_field(layer, k, where) for k in _TOKEN_ID_FIELDS if k in layer},
    )


def weights_header(weights_path: Path) -> dict[str, tuple[str, list[int]]]:
    """``{name: (safetensors dtype, shape)}`` of a weights file, from its header alone (nothing loaded)."""
    try:
        with safe_open(str(weights_path), "pt") as handle:
            return {name: (handle.get_slice(name).get_dtype(), list(handle.get_slice(name).get_shape()))
                    for name in handle.keys()}
    except Exception as exc:  # safetensors raises its own error types for a torn or foreign file
        raise ValueError(f"{weights_path}: not a readable safetensors file ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''})") from None


def check_weights_against(expected: dict[str, torch.Size], stored_name, header: dict, weights_path: Path,
                          config_path: Path, sized_by: dict[str, tuple[str, ...]] | None = None) -> None:
    """Every tensor the config implies (``expected``: name -> shape, from the model built on the meta device)
    that the file holds must have that shape, and a float dtype (``d2t`` integer, ``t2d`` bool): checked from
    the header, before any tensor is built. ``stored_name(key)`` is the key's name in the file; ``sized_by``:
    the config fields that size a key, where they differ from EAGLE-3's (``_SIZED_BY``)."""
    for key, shape in expected.items():
        name = stored_name(key)
        if name not in header:
            continue  # absent tensors are the loader's to refuse or rebuild
        dtype, stored_shape = header[name]
        if stored_shape != list(shape):
            short = re.sub(r"^(midlayer|layers\.\d+)\.", "", key)
            fields = {**_SIZED_BY, **(sized_by or {})}.get(short, ())
            raise ValueError(f"{weights_path}: tensor {name!r} has shape {stored_shape} but {config_path.name} "
                             f"({', '.join(fields) or 'its sizes'}) sizes it {list(shape)}")
        allowed = _INTEGER_DTYPES if key == "d2t" else {"BOOL", "U8"} if key == "t2d" else _FLOAT_DTYPES
        if dtype not in allowed:
            kind = "an integer" if key == "d2t" else "a bool" if key == "t2d" else "a floating-point"
            raise ValueError(f"{weights_path}: tensor {name!r} has dtype {dtype}, not {kind} dtype")


def check_vocab_mapping(d2t: torch.Tensor, t2d: torch.Tensor | None, vocab_size: int, weights_path: Path) -> None:
    """``d2t [Vd]`` must send every draft id ``i`` to a distinct target id ``i + d2t[i]`` in ``[0, vocab_size)``,
    and ``t2d [V]`` (when stored) must mark exactly those target ids."""
    targets = torch.arange(d2t.numel()) + d2t.long()
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= vocab_size):
        bad = int(((targets < 0) | (targets >= vocab_size)).nonzero()[0])
        raise ValueError(f"{weights_path}: tensor 'd2t' sends draft id {bad} to target id {int(targets[bad])}, "
                         f"outside the target vocabulary [0, {vocab_size})")
    if int(torch.unique(targets).numel()) != targets.numel():
        raise ValueError(f"{weights_path}: tensor 'd2t' sends two draft ids to the same target id")
    if t2d is not None and (int(t2d.bool().sum()) != targets.numel() or not bool(t2d.bool()[targets].all())):
        raise ValueError(f"{weights_path}: tensor 't2d' does not mark exactly the {targets.numel()} target ids "
                         f"d2t maps to")


def _mrope_section(layer: dict, head_dim: int, where: str) -> list[int] | None:
    """The ``mrope_section`` of a draft's ``rope_scaling`` (or ``rope_parameters``): three non-negative ints
    summing to ``head_dim / 2``; None when there is none."""
    for field in ("rope_scaling", "rope_parameters"):
        rope = layer.get(field)
        if not isinstance(rope, dict) or rope.get("mrope_section") is None:
            continue
        section = rope["mrope_section"]
        if (not isinstance(section, list) or len(section) != 3
                or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in section)
                or 2 * sum(section) != head_dim):
            raise ValueError(f"{where}: field '{field}.mrope_section' must be three non-negative integers summing "
                             f"to head_dim / 2 = {head_dim // 2}, got {str(section)[:80]}")
        return list(section)
    return None
