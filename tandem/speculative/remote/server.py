"""Remote EAGLE-3 target server: the frozen target behind HTTP (docs/design.md, section 3).

For each training request the server runs ``compute_supervision``, the very function the in-process trainer
calls, and ships the five supervision tensors back, so a remote run is bit-identical to a co-located one.
:class:`TargetModelServer` is the request logic (routing, auth, limits, the ``handle_*`` endpoints), tested
without sockets; its plumbing lives in ``serving/``: ``request_checks``, ``token_budget``, ``fair_queue``,
``sessions``, ``data_plane``, ``decode_caches``, ``http`` (:func:`serve`) and ``cli`` (``tandem serve-target``).

    tandem serve-target --model default --port 8001     # then: tandem train --target-url http://127.0.0.1:8001
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from tandem.speculative.remote import protocol, wire
from tandem.speculative.remote.serving.data_plane import DataPlaneHost
from tandem.speculative.remote.serving.decode_caches import DecodeCacheTable
from tandem.speculative.remote.serving.fair_queue import FairQueue, Place
from tandem.speculative.remote.serving.http import (  # noqa: F401 - the original module's names
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_HEADER_TIMEOUT_S,
    DEFAULT_IDLE_TIMEOUT_S,
    DEFAULT_MAX_CONNECTIONS,
    _make_request_handler,
    serve,
)
from tandem.speculative.remote.serving.request_checks import (  # noqa: F401 - re-exported for callers of this module
    KeptBranch,
    Reply,
    RequestError,
    check_generate_inputs,
    check_image_inputs,
    check_tree_parents,
    check_verify_inputs,
    check_vocab_mapping,
    decode_session_headers,
    decode_tensors,
    init_nccl_request,
    keep_branch_header,
    prefix_header,
)
from tandem.speculative.remote.serving.sessions import (
    DEFAULT_MAX_SESSIONS,
    DEFAULT_SESSION_IDLE_TIMEOUT_S,
    SessionTable,
    VocabMapping,
)
from tandem.speculative.remote.serving.token_budget import (
    check_batch_shape,
    check_tree_cost,
    context_window,
    default_max_batch_tokens,
    forward_bytes_per_token,
    generate_body_limit,
)
from tandem.speculative.remote.transport import default_port_range
from tandem.speculative.target import compact
from tandem.speculative.target.draft_layers import DRAFT_METHODS, CaptureSpec
from tandem.speculative.target.identity import identity_of
from tandem.speculative.target.supervision import compute_supervision  # noqa: F401 - named by the spec page
from tandem.speculative.training.vocab import vocab_digest

logger = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
# Rendezvous and per-transfer limit of a client's data-plane group.
DEFAULT_NCCL_TIMEOUT_S = 120.0
# Requests holding a place in the target's queue (running, waiting, or reading their body) before 503.
DEFAULT_MAX_QUEUED_REQUESTS = 64
# Bodies of the JSON endpoints (and of those that take none) are a few bytes; nothing needs more.
_SMALL_BODY_BYTES = 64 * 1024
_decode_tensors = decode_tensors  # the former private name (bench/bench_http.py)


@dataclass
class _Stats:
    """Counters for the shutdown summary; guarded by the server's stats lock."""

    requests: int = 0
    errors: int = 0
    batches: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    supervision_s: float = 0.0
    verify_calls: int = 0
    verify_positions: int = 0
    verify_s: float = 0.0
    batches_per_client: dict[str, int] = field(default_factory=dict)
    """Supervised batches by client id (the ranks of a data-parallel trainer each have their own)."""


def image_token_settings(model) -> tuple[int | None, int]:
    """``(image_token_id or None, spatial merge size)`` of a vision-language target (``target/vision.py``)."""
    config = getattr(model, "config", None)
    merge = getattr(getattr(config, "vision_config", None), "spatial_merge_size", 1)
    return getattr(config, "image_token_id", None), int(merge or 1)


class TargetModelServer:
    """Request-handling logic for the remote target server (HTTP-transport agnostic).

    Arguments:
        target_wrapper: a loaded ``Eagle3TargetModel`` (or anything with its ``generate_batch``,
            ``get_input_embeddings`` and ``model_info``).
        nccl_port: rendezvous port of the data plane for a client that proposes none (clients of tandem and
            of the original design always propose one in ``/init_nccl``); the base of the default port range.
        host: bind/advertise address (the rendezvous master for the data plane; its stores listen there alone).
        enable_nccl: offer the process-group data plane; off by default here, so the request logic alone
            never opens ports (``tandem serve-target`` turns it on unless ``TANDEM_ENABLE_NCCL=0`` or ``--no-nccl``).
        nccl_timeout_s: per-transfer limit of each client's group; ``/init_nccl`` answers a little sooner.
        nccl_port_range: inclusive ``(low, high)`` ports a client may propose for its group (default:
            ``transport.default_port_range(nccl_port)``: the port rule's ports, never below 1024).
        token: if set, every endpoint but ``/health`` needs ``Authorization: Bearer <token>``.
        max_body_bytes: larger request bodies get 413 before they are read (each endpoint also has its own,
            smaller bound: see :meth:`body_limit`).
        max_batch_tokens: ``B x S`` of the largest ``/generate`` served; larger ones get 413 before the
            forward (default: what fits the target's device, ``token_budget.default_max_batch_tokens``).
        max_queued_requests: ``/generate`` requests admitted at once (running, queued, or reading their
            body); one more gets 503 with ``Retry-After``. Waiting requests are served round-robin across clients.
        max_sessions: client sessions held at once; the least recently seen one without connections makes room.
        session_idle_timeout_s: a session without connections and requests this long is evicted.
        max_decode_tokens: positions the ``/verify`` KV caches hold in all (default ``max_batch_tokens``); the least
            recently used cache makes room (``decode_caches.DecodeCacheTable``).
        exit_when_idle: set ``shutdown_event`` when the last client session disconnects.
        fault_injection: testing only (``--enable-fault-injection``): :meth:`arm_teardown_fault` works.
    """

    def __init__(
        self,
        target_wrapper,
        nccl_port: int,
        host: str = "127.0.0.1",
        *,
        token: Optional[str] = None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        max_batch_tokens: Optional[int] = None,
        max_queued_requests: int = DEFAULT_MAX_QUEUED_REQUESTS,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        session_idle_timeout_s: float = DEFAULT_SESSION_IDLE_TIMEOUT_S,
        max_decode_tokens: Optional[int] = None,
        exit_when_idle: bool = False,
        enable_nccl: bool = False,
        nccl_timeout_s: float = DEFAULT_NCCL_TIMEOUT_S,
        nccl_port_range: Optional[tuple[int, int]] = None,
        fault_injection: bool = False,
        identity: Optional[dict] = None,
    ):
        self.target_wrapper = target_wrapper
        self.fault_injection = fault_injection
        self.nccl_port = nccl_port
        self.host = host
        self.token = token or None
        self.max_body_bytes = max_body_bytes
        self.exit_when_idle = exit_when_idle
        self._info = dict(target_wrapper.model_info())
        # The target's identity (name, weights digest, ...), computed once here unless the loader gave it.
        self._identity = identity if identity is not None else identity_of(target_wrapper)
        self._vocab_size = int(self._info["vocab_size"])
        self._device = self._infer_device()
        self.max_batch_tokens = int(max_batch_tokens or default_max_batch_tokens(target_wrapper, self._device))
        self.max_seq_len = context_window(target_wrapper)
        # What a draft tree's mask is charged against the budget (token_budget.tree_tokens).
        self._bytes_per_token = forward_bytes_per_token(target_wrapper)
        self._itemsize = getattr(getattr(target_wrapper, "dtype", torch.float32), "itemsize", 4)
        self.queue = FairQueue(max_queued_requests)
        # Held around the forward inside a queue turn: the aux-hidden capture hooks are shared state.
        self.generate_lock = threading.Lock()
        self.shutdown_event = threading.Event()
        self.decode_caches = DecodeCacheTable(int(max_decode_tokens or self.max_batch_tokens))
        # An evicted session's decode cache goes with it.
        self.sessions = SessionTable(max_sessions, session_idle_timeout_s, on_evict=self.decode_caches.drop)
        # /verify needs a target that decodes with a KV cache (Eagle3TargetModel.greedy_forward).
        self.verify_supported = callable(getattr(target_wrapper, "greedy_forward", None))
        self._image_tokens = image_token_settings(getattr(target_wrapper, "model", None))
        self._stats = _Stats()
        self._stats_lock = threading.Lock()
        self._closed = False
        # Compact supervision only where it is exact: logits a bias-free linear map of the final hidden state.
        self.compact_supported = compact.output_projection(getattr(target_wrapper, "model", None)) is not None
        self._nccl_enabled = bool(enable_nccl)
        self.nccl_timeout_s = float(nccl_timeout_s)
        self.data_plane = DataPlaneHost(self.sessions, host, nccl_port_range or default_port_range(nccl_port),
                                        self._device, nccl_timeout_s, fault_injection)
        self._pending = self.data_plane.pending

    # ------------------------------------------------------------ checks before the body is read

    def route(self, method: str, path: str) -> str:
        """The endpoint name for ``method path``; 404 for an unknown path, 405 for a wrong method."""
        endpoint = path.split("?", 1)[0].strip("/")
        allowed = ("GET" if endpoint in protocol.GET_ENDPOINTS
                   else "POST" if endpoint in protocol.POST_ENDPOINTS else None)
        if allowed is None:
            shown = endpoint[:64] + ("..." if len(endpoint) > 64 else "")
            raise RequestError(404, f"unknown endpoint {'/' + shown!r}; known: "
                                    f"{sorted(protocol.GET_ENDPOINTS | protocol.POST_ENDPOINTS)}")
        if method != allowed:
            raise RequestError(405, f"/{endpoint} takes {allowed}, not {method}")
        return endpoint

    def authorize(self, endpoint: str, authorization: Optional[str]) -> None:
        """401 unless the request carries the server's bearer token (``/health`` is public)."""
        if self.token is None or endpoint in protocol.PUBLIC_ENDPOINTS:
            return
        if not authorization:
            raise RequestError(401, "missing Authorization header: this server needs 'Authorization: Bearer <token>'")
        scheme, _, given = authorization.partition(" ")
        # compare_digest: the time taken must not tell an attacker how much of the token matched.
        if scheme != protocol.AUTH_SCHEME or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
            raise RequestError(401, "invalid bearer token")

    def body_limit(self, endpoint: Optional[str]) -> int:
        """The largest body ``endpoint`` reads: ``/generate`` what the token budget can use, the vocabulary
        mapping what the target's vocabulary needs, the JSON endpoints 64 KiB; never above ``max_body_bytes``."""
        if endpoint in protocol.TARGET_ENDPOINTS:
            own = generate_body_limit(self.max_batch_tokens)
        elif endpoint == protocol.EP_SET_VOCAB_MAPPING:
            own = 9 * self._vocab_size + _SMALL_BODY_BYTES  # a bool mask [V] and at most V int64 ids
        elif endpoint is None:
            own = self.max_body_bytes
        else:
            own = _SMALL_BODY_BYTES
        return min(own, self.max_body_bytes)

    def check_body_size(self, length: int, endpoint: Optional[str] = None) -> None:
        limit = self.body_limit(endpoint)
        if length > limit:
            where = f"/{endpoint}" if endpoint else "a request"
            raise RequestError(413, f"request body of {length} bytes exceeds the limit of {limit} bytes for {where}")

    def admit(self, endpoint: str, client_id: str) -> Optional[Place]:
        """A place in the target's queue for a ``/generate`` or ``/verify`` (503 when the queue is full);
        None otherwise."""
        return self.queue.reserve(client_id) if endpoint in protocol.TARGET_ENDPOINTS else None

    # ------------------------------------------------------------ dispatch

    def handle(
        self, endpoint: str, raw: bytes, *, client_id: str = protocol.ANONYMOUS_CLIENT, client_wants_nccl: bool = False,
        supervision_encoding: Optional[str] = None, vocab_digest: Optional[str] = None, place: Optional[Place] = None,
        decode_session: Optional[str] = None, past: Optional[str] = None, keep_branch: Optional[str] = None,
        prefix: Optional[str] = None, capture: Optional[str] = None,
    ) -> Reply:
        """Answer one routed, authorized request; ``RequestError`` for anything the client got wrong.

        ``supervision_encoding``, ``vocab_digest``, ``decode_session``, ``past``, ``keep_branch``, ``prefix``: the
        ``X-Tandem-Supervision``, ``X-Tandem-Vocab``, ``X-Tandem-Decode-Session``, ``X-Tandem-Past``,
        ``X-Tandem-Keep-Branch`` and ``X-Tandem-Prefix`` request headers (None when absent). ``capture``: the
        ``X-Tandem-Capture`` header, the draft method and target layers the session reads
        (``draft_layers.CaptureSpec``; absent: the server's own layers, as in v1).
        ``place``: the request's place in the target's queue (from :meth:`admit`).
        """
        if endpoint not in protocol.PUBLIC_ENDPOINTS and endpoint != protocol.EP_DISCONNECT:
            self.sessions.get(client_id)
        try:
            if endpoint == protocol.EP_VERIFY:
                answer = self.verify(raw, client_id, decode_session, past, place, keep_branch, prefix,
                                     capture=capture)
                return Reply(wire.encode(answer), protocol.WIRE_CONTENT_TYPE, {})
            return self._dispatch(endpoint, raw, client_id, client_wants_nccl, supervision_encoding,
                                  vocab_digest, place, capture)
        except RequestError:
            raise
        except protocol.ProtocolError as exc:
            raise RequestError(400, f"/{endpoint}: {exc}") from None
        except Exception as exc:
            logger.exception("internal error serving /%s for client %s", endpoint, client_id)
            raise RequestError(500, f"internal error serving /{endpoint}: {type(exc).__name__}: {exc}") from exc

    def _dispatch(self, endpoint: str, raw: bytes, client_id: str, client_wants_nccl: bool,
                  supervision_encoding: Optional[str], vocab_digest: Optional[str], place: Optional[Place],
                  capture: Optional[str] = None) -> Reply:
        if endpoint == protocol.EP_GENERATE:
            use_compact = self._use_compact(supervision_encoding)
            body, used_nccl = self.generate_buffers(raw, client_wants_nccl, client_id=client_id, capture=capture,
                                                    compact_encoding=use_compact, vocab_digest=vocab_digest,
                                                    place=place)
            # Echo the encoding used only to a client that asked: v1 answers stay exactly v1.
            echo = {} if supervision_encoding is None else {
                protocol.SUPERVISION_HEADER: protocol.ENCODING_COMPACT if use_compact else protocol.ENCODING_FULL}
            if used_nccl:
                return Reply(body, protocol.JSON_CONTENT_TYPE, {protocol.NCCL_HEADER: "1", **echo})
            return Reply(body, protocol.WIRE_CONTENT_TYPE, echo)
        if endpoint == protocol.EP_DRAFT_LM_HEAD:
            return Reply(self.draft_lm_head_buffers(client_id, vocab_digest), protocol.WIRE_CONTENT_TYPE, {})
        if endpoint == protocol.EP_INPUT_EMBEDDINGS:
            return Reply(self.input_embeddings_buffers(), protocol.WIRE_CONTENT_TYPE, {})
        json_handlers = {
            protocol.EP_HEALTH: self.handle_health,
            protocol.EP_MODEL_INFO: self.handle_model_info,
            protocol.EP_SET_VOCAB_MAPPING: self.handle_set_vocab_mapping,
            protocol.EP_INIT_NCCL: self.handle_init_nccl,
            protocol.EP_HEARTBEAT: self.handle_heartbeat,
            protocol.EP_DISCONNECT: self.handle_disconnect,
        }
        return Reply([json_handlers[endpoint](raw, client_id=client_id)], protocol.JSON_CONTENT_TYPE, {})

    @property
    def session_ids(self) -> list[str]:
        return self.sessions.ids

    def _mapping(self, client_id: str, digest: Optional[str], what: str) -> VocabMapping:
        """The vocabulary a request is answered with: the one named by ``digest`` (409 if this client never
        sent it), or the session's newest without a digest (409 if there is none)."""
        mapping = self.sessions.get(client_id).mapping(digest)
        if mapping is not None:
            return mapping
        if digest is None:
            raise RequestError(409, f"{what} before set_vocab_mapping: send the draft vocabulary first")
        shown = digest[:40] if digest.isalnum() else "(malformed)"
        raise RequestError(409, f"{what}: this client never sent the draft vocabulary {shown} "
                                f"({protocol.VOCAB_DIGEST_HEADER}); send it with set_vocab_mapping")

    # ------------------------------------------------------------ the endpoints

    def handle_health(self, _raw: bytes = b"", *, client_id: str = protocol.ANONYMOUS_CLIENT) -> bytes:
        return protocol.encode_json({"status": "ok"})

    def handle_model_info(self, _raw: bytes = b"", *, client_id: str = protocol.ANONYMOUS_CLIENT) -> bytes:
        info = dict(self._info)
        # Extra fields for tandem clients (the target's identity); clients of the original design ignore them.
        info["dtype"] = str(getattr(self.target_wrapper, "dtype", torch.float32)).removeprefix("torch.")
        info.update({k: v for k, v in self._identity.items() if k not in info})
        extensions = [protocol.EP_DRAFT_LM_HEAD] if self.compact_supported else []
        info[protocol.EXTENSIONS_FIELD] = extensions + ([protocol.EP_VERIFY] if self.verify_supported else [])
        # Sessions may declare their draft method and layers (X-Tandem-Capture); which methods this server knows.
        info[protocol.DRAFT_METHODS_FIELD] = list(DRAFT_METHODS)
        return protocol.encode_json(info)

    def input_embeddings_buffers(self) -> list:
        """Wire body ``{"weight": [V, H]}`` referencing the embedding's own memory (no copy on CPU)."""
        return wire.encode({protocol.EMBEDDINGS_KEY: self.target_wrapper.get_input_embeddings()})

    def handle_input_embeddings(self, _raw: bytes = b"", *, client_id: str = protocol.ANONYMOUS_CLIENT) -> bytes:
        """Return the target input-embedding weight (used once to seed the draft)."""
        return b"".join(self.input_embeddings_buffers())

    def handle_set_vocab_mapping(self, raw: bytes, *, client_id: str = protocol.ANONYMOUS_CLIENT) -> bytes:
        tensors = decode_tensors(raw, protocol.VOCAB_MAPPING_KEYS, "set_vocab_mapping")
        ids, mask = tensors["selected_token_ids"], tensors["selected_token_mask"]
        check_vocab_mapping(ids, mask, self._vocab_size)
        # clone: the decoded tensors view the request buffer, which the next request may reuse.
        ids = ids.to(torch.long).clone()
        self.sessions.get(client_id).add_mapping(VocabMapping(ids, mask.clone(), vocab_digest(ids)))
        return protocol.encode_json({"status": "ok"})

    def _use_compact(self, supervision_encoding: Optional[str]) -> bool:
        """Whether to answer compactly: the client asked and this target's logits allow it exactly."""
        if supervision_encoding not in (None, *protocol.SUPERVISION_ENCODINGS):
            shown = supervision_encoding[:40] if supervision_encoding.isprintable() else "(unprintable)"
            raise RequestError(400, f"{protocol.SUPERVISION_HEADER} must be one of "
                                    f"{list(protocol.SUPERVISION_ENCODINGS)}, got {shown!r}")
        return supervision_encoding == protocol.ENCODING_COMPACT and self.compact_supported

    def draft_lm_head_buffers(self, client_id: str, vocab_digest: Optional[str] = None) -> list:
        """Wire body ``{"weight": [Vd, H]}`` (target dtype): the ``lm_head`` rows of the client's draft vocabulary."""
        mapping = self._mapping(client_id, vocab_digest, "draft_lm_head")
        if not self.compact_supported:
            raise RequestError(400, "this target's logits are not a bias-free linear map of its final hidden state: "
                                    "no compact supervision")
        return wire.encode({protocol.EMBEDDINGS_KEY: compact.draft_lm_head(self.target_wrapper.model, mapping.ids)})

    def capture_layers(self, capture: Optional[str]) -> Optional[list[int]]:
        """The target layers an ``X-Tandem-Capture`` header declares (None when absent: the server's own); 400
        naming the problem for a malformed header, an unknown method or layers this target cannot capture."""
        if capture is None:
            return None
        try:
            return list(CaptureSpec.parse_header(capture, int(self._info["num_hidden_layers"])).layer_ids)
        except ValueError as exc:
            raise RequestError(400, f"{protocol.CAPTURE_HEADER}: {exc}") from None

    def supervise(self, raw: bytes, client_id: str, compact_encoding: bool = False, vocab_digest: Optional[str] = None,
                  place: Optional[Place] = None, capture: Optional[str] = None) -> dict[str, torch.Tensor]:
        """Decode and check a ``/generate`` body and run ``compute_supervision`` in the client's turn of the
        target (``compact.compute_compact_supervision`` with ``compact_encoding``), capturing the layers
        ``capture`` declares (see :meth:`capture_layers`)."""
        if place is None:
            place = self.queue.reserve(client_id)
        try:
            images_allowed = protocol.IMAGE_KEYS if self._image_tokens[0] is not None else ()  # a VLM target only
            layer_ids = self.capture_layers(capture)
            tensors = decode_tensors(raw, protocol.REQUEST_KEYS, "generate", optional=images_allowed)
            input_ids = tensors["input_ids"]
            if input_ids.dim() == 2:  # anything else is refused, with its reason, just below
                check_batch_shape(*input_ids.shape, self.max_batch_tokens, self.max_seq_len)
            check_generate_inputs(tensors, self._vocab_size)
            images = check_image_inputs(tensors, input_ids, *self._image_tokens)
            mapping = self._mapping(client_id, vocab_digest, "generate")
            start = time.perf_counter()
            seeing = self.target_wrapper.with_images(*images) if images else contextlib.nullcontext()
            with place.turn(), self.generate_lock, seeing:
                supervise = compact.compute_compact_supervision if compact_encoding else compute_supervision
                out = supervise(self.target_wrapper, mapping.ids, mapping.mask, input_ids.long(),
                                tensors["attention_mask"], tensors["loss_mask"], layer_ids)
        finally:
            place.release()
        with self._stats_lock:
            self._stats.batches += 1
            self._stats.supervision_s += time.perf_counter() - start
            self._stats.batches_per_client[client_id] = self._stats.batches_per_client.get(client_id, 0) + 1
        keys = compact.COMPACT_SUPERVISION_KEYS if compact_encoding else protocol.SUPERVISION_KEYS
        return {key: out[key] for key in keys}

    def verify(self, raw: bytes, client_id: str, decode_session: Optional[str] = None, past: Optional[str] = None,
               place: Optional[Place] = None, keep_branch: Optional[str] = None,
               prefix: Optional[str] = None, *, capture: Optional[str] = None) -> dict[str, torch.Tensor]:
        """Speculative decoding's target step for a ``/verify`` body ``{"input_ids": [B, n] long}``.

        Without a decode session the ids are whole sequences (``B`` rows of equal length, nothing kept). With
        one (``decode_session``: its name, ``past``: cached positions the ids follow, "0" to start afresh), the
        client's KV cache is cropped to ``past`` and extended by the ``n`` ids (``B`` = 1). Returns
        ``VERIFY_ANSWER_KEYS``: ``next_token_ids [B, n]`` long (argmax over the full vocabulary of float32 logits),
        ``near_ties [B, n]`` bool and ``aux_hidden_states [B, n, K*H]`` (target dtype: the layers ``capture`` declares,
        see :meth:`capture_layers`); see ``verification.py``.
        The forward runs in the client's turn of the target, within the token budget like ``/generate``.

        A draft tree: the body adds ``tree_parents [n]`` (``decoding/tree.py``), and the next call's ``keep_branch``
        (``X-Tandem-Keep-Branch``) says which of the tree's positions stay cached; a tree is charged its mask
        (``token_budget.tree_tokens``). ``prefix`` (``X-Tandem-Prefix``): the digest of the cached positions the
        client continues after; other ids cached under its names get 409. A target whose layers keep a recurrent
        state verifies chains only (400).
        """
        if place is None:
            place = self.queue.reserve(client_id)
        try:
            if not self.verify_supported:
                raise RequestError(400, "this target cannot decode with a KV cache: no /verify")
            layers = {} if capture is None else {"layer_ids": self.capture_layers(capture)}
            tensors = decode_tensors(raw, protocol.VERIFY_REQUEST_KEYS, "verify", optional=(protocol.VERIFY_TREE_KEY,))
            input_ids = check_verify_inputs(tensors, self._vocab_size)
            tree_parents = check_tree_parents(tensors.get(protocol.VERIFY_TREE_KEY), input_ids)
            batch, new = input_ids.shape
            name, past_length = decode_session_headers(decode_session, past, batch)
            branch, prefix = keep_branch_header(keep_branch, name), prefix_header(prefix, name, past_length)
            check_batch_shape(batch, past_length + new, self.max_batch_tokens, self.max_seq_len, "verify")
            refusal = getattr(self.target_wrapper, "tree_refusal", None) if tree_parents is not None else None
            if refusal:
                raise RequestError(400, f"verify: {refusal}")
            if tree_parents is not None:
                check_tree_cost(past_length, new, self.max_batch_tokens, self._bytes_per_token, self._itemsize)
            start = time.perf_counter()
            with place.turn(), self.generate_lock:
                if name is None:
                    step = self.target_wrapper.greedy_forward(input_ids, self._new_decode_cache(), tree_parents,
                                                              **layers)
                else:
                    step = self._verify_cached(client_id, name, past_length, input_ids, tree_parents, branch,
                                               prefix, layers)
        finally:
            place.release()
        with self._stats_lock:
            self._stats.verify_calls += 1
            self._stats.verify_positions += batch * new
            self._stats.verify_s += time.perf_counter() - start
        return dict(zip(protocol.VERIFY_ANSWER_KEYS, step))

    def _new_decode_cache(self):
        """An empty cache for a ``/verify`` forward: the target's own (a hybrid target records its recurrent states,
        ``recurrent_state.new_decode_cache``), else a ``DynamicCache``."""
        make = getattr(self.target_wrapper, "new_decode_cache", None)
        if make is not None:
            return make()
        from transformers import DynamicCache

        return DynamicCache()

    def _verify_cached(self, client_id: str, name: str, past_length: int, input_ids: torch.Tensor,
                       tree_parents: Optional[list[int]], branch: Optional[KeptBranch], prefix: Optional[str],
                       layers: dict):
        """``/verify`` on the client's kept cache: keep ``branch`` of its last tree, crop to ``past_length`` (its
        ids must have the digest ``prefix``, when given), extend, capturing ``layers`` (``{"layer_ids": ...}`` or
        none: the server's own)."""
        # Checked out, the cache is nobody else's; an exception below leaves it out: freed.
        entry = self.decode_caches.check_out(client_id, name, past_length, input_ids.shape[1], self._new_decode_cache)
        if branch is not None:
            entry.keep_branch(branch)
        entry.crop(past_length, prefix)
        step = self.target_wrapper.greedy_forward(input_ids, entry.cache, tree_parents, **layers)
        ids = input_ids[0].tolist()
        entry.extended(ids, None if tree_parents is None else protocol.tree_digest(past_length, ids, tree_parents))
        self.decode_caches.check_in(client_id, entry)
        return step

    def generate_buffers(
        self, raw: bytes, client_wants_nccl: bool, *, client_id: str = protocol.ANONYMOUS_CLIENT,
        compact_encoding: bool = False, vocab_digest: Optional[str] = None, place: Optional[Place] = None,
        capture: Optional[str] = None,
    ) -> tuple[list, bool]:
        """Like ``handle_generate`` but the body is a list of buffers referencing the tensors (no join)."""
        supervision = self.supervise(raw, client_id, compact_encoding, vocab_digest, place, capture)
        if client_wants_nccl and self.data_plane.queue_send(client_id, supervision):
            return [protocol.encode_nccl_metadata(supervision, list(supervision))], True
        # No group for this client (never set up, or torn down): the wire body, without the header, tells the
        # client to stop expecting the group.
        return wire.encode(supervision), False

    def handle_generate(
        self, raw: bytes, client_wants_nccl: bool, *, client_id: str = protocol.ANONYMOUS_CLIENT
    ) -> tuple[bytes, bool]:
        """Run the target and serialize the supervision.

        Returns ``(body, used_nccl)``. When the client asked for the data plane and has a live group, the
        body is the JSON metadata only and the tensors are queued for :meth:`flush_nccl_send` (sent after
        the HTTP response is flushed, or the client, not yet receiving, would deadlock with us);
        otherwise the body is the wire format of the ``SUPERVISION_KEYS`` tensors.
        """
        body, used_nccl = self.generate_buffers(raw, client_wants_nccl, client_id=client_id)
        return b"".join(body), used_nccl

    def handle_init_nccl(self, raw: bytes, *, client_id: str = protocol.ANONYMOUS_CLIENT) -> bytes:
        """Set up this client's data-plane group on the port it proposes; blocks until the rendezvous ends
        (at most a little under ``nccl_timeout_s``).

        Body ``{"nccl_port": int, "rendezvous_id": str (optional)}``. Answers ``ok``, ``already_initialized``
        (this client has a live group on that port), ``failed`` (with a ``reason`` when the server knows it:
        ``port_in_use`` -- another client's group holds it, answered at once, so that the client can propose
        another --, ``port_not_allowed`` with the ``allowed`` range, ``rendezvous_timeout``) or ``disabled``.
        """
        payload = protocol.decode_json(raw, "init_nccl body") if raw else {}
        port, rendezvous_id = init_nccl_request(payload, self.nccl_port)
        if not self._nccl_enabled:
            return protocol.encode_json({"status": protocol.NCCL_STATUS_DISABLED})
        return protocol.encode_json(self.data_plane.init(client_id, self.sessions.get(client_id), port, rendezvous_id))

    def flush_nccl_send(self) -> None:
        """Send the pending supervision over the data plane after the HTTP flush (no-op if none is pending)."""
        self.data_plane.flush()

    def discard_nccl_send(self) -> None:
        """Forget the pending send: the metadata never reached the client, so nobody will receive."""
        self.data_plane.discard()

    def arm_teardown_fault(self) -> None:
        """Testing only: the next data-plane send (any client's) tears its group down mid-transfer."""
        self.data_plane.arm_teardown_fault()

    def connection_opened(self, client_id: str) -> None:
        self.sessions.connection_opened(client_id)

    def connection_closed(self, client_id: str) -> None:
        """A connection that carried ``client_id``'s requests closed (its port may be taken back; its
        session is evicted once idle)."""
        self.sessions.connection_closed(client_id)

    def handle_heartbeat(self, _raw: bytes = b"", *, client_id: str = protocol.ANONYMOUS_CLIENT) -> bytes:
        return protocol.encode_json({"status": "ok"})

    def handle_disconnect(self, _raw: bytes = b"", *, client_id: str = protocol.ANONYMOUS_CLIENT) -> bytes:
        """End this client's session; the server goes on unless it was told to exit when idle.

        Every client of the original design is "anonymous": while another connection carries anonymous
        requests, an anonymous ``/disconnect`` leaves the shared session (its vocabulary, its group) to the
        others. A session left behind is evicted once idle.
        """
        if client_id == protocol.ANONYMOUS_CLIENT and self.sessions.open_connections(client_id) > 1:
            logger.info("an anonymous client disconnected; other anonymous connections are open, so the shared "
                        "session stays")
            idle = False
        else:
            self.data_plane.drop(client_id, "client disconnected", logging.INFO)
            self.decode_caches.drop(client_id)
            _session, idle = self.sessions.pop(client_id)
            logger.info("client %s disconnected", client_id)
        if idle and self.exit_when_idle:
            logger.info("last client left and --exit-when-idle is set: shutting down")
            self.shutdown_event.set()
        return protocol.encode_json({"status": "ok"})

    # ------------------------------------------------------------ accounting

    def record(self, status: int, bytes_in: int, bytes_out: int) -> None:
        with self._stats_lock:
            self._stats.requests += 1
            self._stats.errors += status >= 400
            self._stats.bytes_in += bytes_in
            self._stats.bytes_out += bytes_out

    def summary(self) -> str:
        with self._stats_lock:
            s = self._stats
            mean_ms = 1000.0 * s.supervision_s / s.batches if s.batches else 0.0
            per_client = ", ".join(f"{client}: {count}" for client, count in sorted(s.batches_per_client.items()))
            return (
                f"served {s.requests} requests ({s.errors} errors, {s.batches} batches), "
                f"{s.bytes_in / 2**20:.1f} MiB in, {s.bytes_out / 2**20:.1f} MiB out, "
                f"supervision {s.supervision_s:.2f} s ({mean_ms:.1f} ms/batch); "
                f"verify {s.verify_calls} calls, {s.verify_positions} positions, {s.verify_s:.2f} s; "
                f"batches per client ({len(s.batches_per_client)}): {per_client or 'none'}"
            )

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            for client_id in self.session_ids:
                self.data_plane.drop(client_id, "server shutting down", logging.INFO)
            logger.info("target server: %s", self.summary())

    def _infer_device(self) -> torch.device:
        """Where the target's outputs live (the data plane's NCCL-or-gloo choice starts from it)."""
        return torch.device(getattr(self.target_wrapper, "device", "cpu"))
