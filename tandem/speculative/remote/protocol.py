"""What the remote target's server and client agree on: endpoints, headers, keys, JSON bodies (DESIGN 3.1).

HTTP is the control plane. ``/generate`` answers either with the wire-format body of the five supervision
tensors, or (process-group data plane, ``X-NeMo-NCCL: 1`` echoed) with JSON metadata only, after which
the tensors travel over the group in ``SUPERVISION_KEYS`` order. The names are those of the original
design, so its clients and servers interoperate with tandem's.
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any, Optional, Sequence

import torch

from tandem.speculative.remote.wire import CODE_TO_DTYPE, code_from_dtype
from tandem.speculative.target.supervision import SUPERVISION_KEYS

__all__ = [
    "SUPERVISION_KEYS",
    "REQUEST_KEYS",
    "VOCAB_MAPPING_KEYS",
    "ProtocolError",
    "encode_json",
    "decode_json",
    "encode_nccl_metadata",
    "decode_nccl_metadata",
    "dtype_from_code",
]

PROTOCOL_VERSION = 1
_INT64_MAX = 2**63 - 1

# Endpoint names; the URL path is "/" + name.
EP_HEALTH = "health"
EP_MODEL_INFO = "model_info"
EP_INPUT_EMBEDDINGS = "input_embeddings"
EP_SET_VOCAB_MAPPING = "set_vocab_mapping"
EP_GENERATE = "generate"
EP_INIT_NCCL = "init_nccl"
EP_HEARTBEAT = "heartbeat"
EP_DISCONNECT = "disconnect"
# Tandem extension: the target's lm_head rows for the session's draft vocabulary (compact supervision).
EP_DRAFT_LM_HEAD = "draft_lm_head"
# Tandem extension: speculative decoding's target step (``verification.py``): given token ids, the target's greedy
# next token at every position (full vocabulary) and the aux hidden states there, optionally on a KV cache kept
# per client between calls (``X-Tandem-Decode-Session``, ``X-Tandem-Past``).
EP_VERIFY = "verify"
GET_ENDPOINTS = frozenset({EP_HEALTH})
POST_ENDPOINTS = frozenset(
    {EP_MODEL_INFO, EP_INPUT_EMBEDDINGS, EP_SET_VOCAB_MAPPING, EP_GENERATE, EP_INIT_NCCL, EP_HEARTBEAT, EP_DISCONNECT,
     EP_DRAFT_LM_HEAD, EP_VERIFY}
)
# The tandem extensions a server offers, listed in /model_info under this key (a v1 client never asks for them).
EXTENSIONS_FIELD = "tandem_endpoints"
# Endpoints that run the target: they take a place in its fair queue and are bounded by the token budget.
TARGET_ENDPOINTS = frozenset({EP_GENERATE, EP_VERIFY})
# Endpoints anyone may call without the bearer token (load balancers probe it).
PUBLIC_ENDPOINTS = frozenset({EP_HEALTH})

# The client sets it to "1" to ask for the process-group data plane; the server echoes "1" when it used it.
NCCL_HEADER = "X-NeMo-NCCL"
AUTH_HEADER = "Authorization"
AUTH_SCHEME = "Bearer"
# Names one training client's session (e.g. its data-parallel rank); clients of the original design send
# none and share the anonymous session.
CLIENT_ID_HEADER = "X-Tandem-Client"
# Tandem extension, negotiated per /generate request: a client sends "compact" to receive the target's final
# hidden state instead of target_probs (see target/compact.py); the server echoes the encoding it used. A
# client that sends nothing (every client of the original design) always gets the full v1 answer.
SUPERVISION_HEADER = "X-Tandem-Supervision"
ENCODING_FULL = "full"
ENCODING_COMPACT = "compact"
SUPERVISION_ENCODINGS = (ENCODING_FULL, ENCODING_COMPACT)
ANONYMOUS_CLIENT = "anonymous"
# Tandem extension: on /generate and /draft_lm_head a tandem client names the digest of the vocabulary it sent
# (``vocab.vocab_digest``); the server answers with exactly that mapping or 409, so a client sharing a session
# id with another never gets supervision over the other's vocabulary. Absent (every client of the original
# design): the session's newest mapping applies, as in v1.
VOCAB_DIGEST_HEADER = "X-Tandem-Vocab"
TOKEN_ENV = "TANDEM_TOKEN"
# /verify: the client's name for the sequence it decodes (the server keeps that sequence's KV cache between calls;
# absent: stateless, nothing kept), and how many cached positions the new ids follow ("0": start afresh).
DECODE_SESSION_HEADER = "X-Tandem-Decode-Session"
PAST_HEADER = "X-Tandem-Past"
# /verify of a draft tree (``decoding/tree.py``): the body adds ``tree_parents [n]``, and the next call names the
# branch the client accepted, "BASE:i,j,.../TREE" -- keep the first BASE cached positions, then positions BASE+i,
# BASE+j, ... of the tree verified after them (before cropping to X-Tandem-Past); TREE (``tree_digest``, optional)
# names that tree, so that a retried call is told from a keep of the same indices of another tree.
KEEP_BRANCH_HEADER = "X-Tandem-Keep-Branch"
# /verify with a decode session: ``prefix_digest`` of the X-Tandem-Past ids the client believes are cached; a
# server whose cache holds other ids (another client's sequence under the same names) answers 409.
PREFIX_HEADER = "X-Tandem-Prefix"

# Tandem extension: the draft method and the target layers a session reads, "METHOD:ID,ID,..." (``draft_layers.py``:
# e.g. "dflash:1,9,17,25,33"), on /generate and /verify; the server captures exactly those layers in the same
# forward. Absent (every client of the original design): the server's own three EAGLE-3 layers, as in v1.
CAPTURE_HEADER = "X-Tandem-Capture"
# /model_info: the draft methods whose layers a session may declare (absent: a server that knows only its own).
DRAFT_METHODS_FIELD = "tandem_draft_methods"

WIRE_CONTENT_TYPE = "application/octet-stream"
JSON_CONTENT_TYPE = "application/json"

# Request bodies: /generate carries these three tensors, /set_vocab_mapping these two.
REQUEST_KEYS = ("input_ids", "attention_mask", "loss_mask")
# A vision-language target's /generate may add the image processor's patches (target/vision.py, docs/design.md 8).
IMAGE_KEYS = ("pixel_values", "image_grid_thw")
VOCAB_MAPPING_KEYS = ("selected_token_ids", "selected_token_mask")
# /verify: the request holds input_ids [B, n]; the answer these three (see verification.VerifyStep).
VERIFY_REQUEST_KEYS = ("input_ids",)
VERIFY_TREE_KEY = "tree_parents"
VERIFY_ANSWER_KEYS = ("next_token_ids", "near_ties", "aux_hidden_states")
EMBEDDINGS_KEY = "weight"

NCCL_STATUS_OK = "ok"
NCCL_STATUS_ALREADY = "already_initialized"
NCCL_STATUS_FAILED = "failed"
NCCL_STATUS_DISABLED = "disabled"
# Extension (a v1 client ignores it): why a "failed" answer failed, when the server knows. A port another
# client's group holds is worth another try on another port; anything else is not.
NCCL_REASON_PORT_IN_USE = "port_in_use"


class ProtocolError(ValueError):
    """A control-plane JSON body is malformed; the message says what is wrong."""


def prefix_digest(ids: Sequence[int]) -> str:
    """``X-Tandem-Prefix``: 32 hex digits of the SHA-256 of token ids as little-endian int64."""
    return hashlib.sha256(struct.pack(f"<{len(ids)}q", *ids)).hexdigest()[:32]


def tree_digest(base: int, ids: Sequence[int], parents: Sequence[int]) -> str:
    """The name of a draft tree of ``ids`` and ``parents`` verified after ``base`` cached positions (32 hex
    digits): the ``/TREE`` of ``X-Tandem-Keep-Branch``."""
    packed = struct.pack(f"<qq{len(ids)}q{len(parents)}q", base, len(ids), *ids, *parents)
    return hashlib.sha256(packed).hexdigest()[:32]


def path_of(endpoint: str) -> str:
    return "/" + endpoint


def bearer(token: str) -> str:
    """The ``Authorization`` header value for ``token``."""
    return f"{AUTH_SCHEME} {token}"


def encode_json(payload: Any) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode("utf-8")


def decode_json(raw: bytes, what: str = "body") -> dict:
    """Parse a JSON object body; ``ProtocolError`` naming ``what`` for anything else."""
    try:
        payload = json.loads(bytes(raw).decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        # ValueError covers bad UTF-8, bad JSON and integers past Python's digit limit; RecursionError
        # nesting deeper than the stack. Both are the sender's fault (400), never the server's (500).
        raise ProtocolError(f"{what} is not valid UTF-8 JSON: {type(exc).__name__}: {str(exc)[:200]}") from None
    if not isinstance(payload, dict):
        raise ProtocolError(f"{what} must be a JSON object, got {type(payload).__name__}")
    return payload


def error_body(status: int, message: str) -> bytes:
    """The JSON body of every error response."""
    return encode_json({"error": message, "status": status})


def encode_nccl_metadata(tensor_dict: dict[str, Optional[torch.Tensor]], keys_order: list[str]) -> bytes:
    """The ``/generate`` answer on the process-group data plane: dtype code and shape per key, no data.

    Arguments:
        tensor_dict: key -> tensor (any shape, a wire v1 dtype) or None.
        keys_order: the order the tensors are sent in (``SUPERVISION_KEYS``).

    Returns:
        UTF-8 JSON ``{"keys_order": [...], "metadata": {key: {"dtype_code": int, "shape": [...]} | null}}``.
    """
    metadata: dict[str, Optional[dict]] = {}
    for key in keys_order:
        tensor = tensor_dict.get(key)
        metadata[key] = (None if tensor is None
                         else {"dtype_code": code_from_dtype(tensor.dtype), "shape": list(tensor.shape)})
    return encode_json({"keys_order": list(keys_order), "metadata": metadata})


def decode_nccl_metadata(raw: bytes) -> tuple[list[str], dict[str, Optional[dict]]]:
    """Parse and check ``encode_nccl_metadata``'s JSON into ``(keys_order, metadata)``.

    Raises ``ProtocolError`` for a missing key, an unknown dtype code or a shape that is not a list of
    non-negative ints, so the receiver never allocates from a malformed description.
    """
    payload = decode_json(raw, "data-plane metadata")
    keys_order, metadata = payload.get("keys_order"), payload.get("metadata")
    if not isinstance(keys_order, list) or not all(isinstance(k, str) for k in keys_order):
        raise ProtocolError("data-plane metadata: keys_order must be a list of strings")
    if not isinstance(metadata, dict):
        raise ProtocolError("data-plane metadata: metadata must be an object")
    for key in keys_order:
        if key not in metadata:
            raise ProtocolError(f"data-plane metadata: no entry for key {key!r}")
        entry = metadata[key]
        if entry is None:
            continue
        shape = entry.get("shape") if isinstance(entry, dict) else None
        code = entry.get("dtype_code") if isinstance(entry, dict) else None
        # isinstance first: a list is unhashable (TypeError in the dict lookup) and 1.0 would match code 1.
        if not isinstance(code, int) or isinstance(code, bool) or code not in CODE_TO_DTYPE:
            raise ProtocolError(f"data-plane metadata: key {key!r} has unknown dtype_code {code!r}")
        if not isinstance(shape, list) or not all(
                isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise ProtocolError(f"data-plane metadata: key {key!r} has an invalid shape {shape!r}")
        numel = 1
        for dim in shape:
            numel *= dim
        if numel * CODE_TO_DTYPE[code].itemsize > _INT64_MAX:
            raise ProtocolError(f"data-plane metadata: key {key!r} has a shape {shape!r} past int64 bytes")
    return keys_order, metadata


def dtype_from_code(code: int) -> torch.dtype:
    """The ``torch.dtype`` of a wire v1 dtype code."""
    if code not in CODE_TO_DTYPE:
        raise ProtocolError(f"unknown dtype code {code!r}")
    return CODE_TO_DTYPE[code]
