"""The target's identity: which model a draft is trained against, and the checks no mismatch gets past.

A draft learns one target's aux states and next-token distributions. Supervision from any other target (a
server restarted with another model, aux layers off by one, a vocabulary from another run) trains on quietly
and makes the draft worse, so every such mismatch is an error at the first moment it can be seen. An identity
is a JSON-able dict (``IDENTITY_FIELDS``; ``weights_digest`` hashes the weights rounded to bfloat16, so the
same weights served in float32 or bfloat16 agree). A *run record* (``run_record``), kept by checkpoints and
exports, adds the aux layers and the draft vocabulary's digest. ``mismatched_fields`` names what differs;
``check_same_target`` turns a difference into ``TargetMismatchError`` unless it is accepted on purpose.
"""

from __future__ import annotations

import hashlib
import json
import logging

import torch
from torch import nn

from tandem.speculative.training.vocab import vocab_digest

logger = logging.getLogger(__name__)

IDENTITY_FIELDS = ("name", "architectures", "weights_digest", "dtype", "num_hidden_layers", "hidden_size",
                   "vocab_size", "aux_layer_ids", "tokenizer_digest", "checkpoint_dtype")
"""An identity's fields. ``name`` (HF id, directory or GGUF file as loaded) is informational;
``weights_digest`` is sha256 over every parameter's name, shape and values rounded to bfloat16 (computed once
at load); ``tokenizer_digest`` is sha256 of the vocabulary (token -> id), None when no tokenizer is known;
``checkpoint_dtype`` is the dtype the checkpoint is stored in (``models.checkpoint_dtype``), which the export
follows whatever ``dtype`` the target runs in; None for a model not loaded from a checkpoint, or a server
that does not say."""
SAME_MODEL_FIELDS = ("weights_digest", "num_hidden_layers", "hidden_size", "vocab_size", "aux_layer_ids",
                     "tokenizer_digest")
"""What makes two targets give the same supervision, whatever precision each runs in (eval, resume, export)."""
SAME_SERVING_FIELDS = (*SAME_MODEL_FIELDS, "dtype")
"""What the servers of one run must share, and a server restarted mid-run must keep."""
RECORD_FIELDS = tuple(f"target.{f}" for f in SAME_MODEL_FIELDS) + ("aux_layer_ids", "vocab_digest", "draft_method")
"""What a resumed run and the run it resumes must share (#14 extends this with data and config digests)."""
ALLOW_FLAG = "--allow-target-mismatch"


class TargetMismatchError(ValueError):
    """The target is not the one the draft was (or is being) trained against."""


def weights_digest(model: nn.Module) -> str:
    """sha256 over ``model``'s parameters: names, shapes and values rounded to bfloat16, one at a time.

    Rounding makes the digest independent of the precision the weights are served in: a float32 or a
    bfloat16 load of the same checkpoint agree (round-to-nearest-even either way).
    """
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        if hasattr(param, "full_tensor"):  # a tensor-parallel shard (DTensor): gathered, on every rank alike
            param = param.full_tensor()
        values = param.detach().to(torch.bfloat16).contiguous().cpu()
        digest.update(f"{name}:{list(values.shape)};".encode())
        digest.update(memoryview(values.view(torch.uint8).numpy()))  # hashed in place, not copied
    return digest.hexdigest()[:16]


def tokenizer_digest(tokenizer) -> str | None:
    """sha256 of ``tokenizer.get_vocab()`` (token -> id, added tokens included), or None without a tokenizer."""
    if tokenizer is None:
        return None
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: (item[1], item[0]))
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]


def target_identity(model: nn.Module, aux_layer_ids: list[int], *, name: str | None = None, tokenizer=None) -> dict:
    """The identity of a loaded transformers causal LM (see the module docstring)."""
    from tandem.models import text_config

    config = text_config(model.config)
    dtype = next(model.parameters()).dtype
    return {
        "name": name or getattr(config, "_name_or_path", "") or type(model).__name__,
        "architectures": list(getattr(config, "architectures", None) or [type(model).__name__]),
        "weights_digest": weights_digest(model),
        "dtype": str(dtype).removeprefix("torch."),
        "num_hidden_layers": int(config.num_hidden_layers),
        "hidden_size": int(config.hidden_size),
        "vocab_size": int(config.vocab_size),
        "aux_layer_ids": [int(i) for i in aux_layer_ids],
        "tokenizer_digest": tokenizer_digest(tokenizer),
        "checkpoint_dtype": getattr(model, "tandem_checkpoint_dtype", None),
    }


def identity_of(target, *, tokenizer=None) -> dict:
    """The identity of a training target: what a remote one's servers report (``identity()``), or
    computed for an in-process ``Eagle3TargetModel``."""
    reported = getattr(target, "identity", None)
    if callable(reported):
        return reported()
    if not isinstance(getattr(target, "model", None), nn.Module):  # a wrapper that exposes only model_info
        return reported_identity(target.model_info())
    return target_identity(target.model, target.aux_layer_ids, tokenizer=tokenizer)


def reported_identity(info: dict) -> dict:
    """The identity fields of a ``/model_info`` answer (a server of the original design reports only the
    structural ones; the others are None and are not compared)."""
    return {field: info.get(field) for field in IDENTITY_FIELDS}


def _value(record: dict, path: str):
    for key in path.split("."):
        record = record.get(key) if isinstance(record, dict) else None
    return record


def mismatched_fields(expected: dict, actual: dict, fields=SAME_MODEL_FIELDS) -> list[str]:
    """The ``fields`` (dotted paths into nested dicts) both sides know and that differ; a field absent or
    None on either side cannot be compared and is not reported."""
    differ = []
    for field in fields:
        left, right = _value(expected, field), _value(actual, field)
        if left is not None and right is not None and left != right:
            differ.append(field)
    return differ


def describe(identity: dict) -> str:
    """One line naming an identity, for error messages."""
    def short(value):
        return value if value is not None else "unknown"

    return (f"{identity.get('name') or 'unnamed'} (weights {short(identity.get('weights_digest'))}, "
            f"{short(identity.get('dtype'))}, {identity.get('num_hidden_layers')} layers, hidden "
            f"{identity.get('hidden_size')}, vocab {identity.get('vocab_size')}, aux layers "
            f"{identity.get('aux_layer_ids')}, tokenizer {short(identity.get('tokenizer_digest'))})")


def _refuse(differ: list[str], message: str, allow: bool) -> list[str]:
    """Raise ``TargetMismatchError`` with ``message`` when anything differs; with ``allow`` only warn."""
    if differ:
        if not allow:
            raise TargetMismatchError(f"{message}; pass {ALLOW_FLAG} to accept this on purpose")
        logger.warning("%s (accepted: %s)", message, ALLOW_FLAG)
    return differ


def check_same_target(expected: dict, actual: dict, *, what: str, fields=SAME_MODEL_FIELDS,
                      allow: bool = False) -> list[str]:
    """``TargetMismatchError`` naming both identities when ``fields`` differ (a warning with ``allow``);
    returns the differing fields."""
    differ = mismatched_fields(expected, actual, fields)
    return _refuse(differ, f"{what}: the target differs in {', '.join(differ)}: expected {describe(expected)}, "
                           f"got {describe(actual)}", allow)


def run_record(identity: dict, selected_token_ids: torch.Tensor, draft_method: str = "eagle3") -> dict:
    """What a checkpoint and an exported draft record about their run (``RECORD_FIELDS``): the target, the layers
    the draft reads, the draft vocabulary and the draft method (``draft_layers.DRAFT_METHODS``)."""
    return {"target": dict(identity), "aux_layer_ids": list(identity.get("aux_layer_ids") or []),
            "vocab_digest": vocab_digest(selected_token_ids), "draft_method": draft_method}


def check_run_record(saved: dict | None, current: dict, *, what: str, allow: bool = False) -> list[str]:
    """Compare a saved run record with the current run's (``RECORD_FIELDS``); None: nothing recorded to check."""
    if saved is None:
        logger.warning("%s: no target record (written before tandem recorded one): the target cannot be checked", what)
        return []
    # Records written before a second draft method existed are all EAGLE-3's.
    saved, current = {"draft_method": "eagle3", **saved}, {"draft_method": "eagle3", **current}
    differ = mismatched_fields(saved, current, RECORD_FIELDS)
    return _refuse(differ, f"{what}: the run differs in {', '.join(differ)}: recorded a {saved['draft_method']} draft "
                           f"on target {describe(saved.get('target') or {})}, vocabulary {saved.get('vocab_digest')}; "
                           f"now a {current['draft_method']} draft on {describe(current['target'])}, vocabulary "
                           f"{current.get('vocab_digest')}", allow)
