"""Remote EAGLE-3 target server: the frozen target behind HTTP (DESIGN 3).

For each training request the server runs ``compute_supervision`` -- the very function the in-process
trainer calls -- and ships the five supervision tensors back, so a remote run is bit-identical to a
co-located one.

The request logic (:class:`TargetModelServer`: routing, auth, limits, sessions, the ``handle_*`` methods)
is separate from the HTTP plumbing (:func:`serve`), so the logic is tested without sockets and the
plumbing with real ones. Every failure a client can cause is a :class:`RequestError` carrying its HTTP
status; it becomes a JSON error body and the server keeps serving.

    tandem serve-target --model default --port 8001            # then: tandem train --target-url http://127.0.0.1:8001
"""

from __future__ import annotations

import argparse
import hmac
import logging
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, NamedTuple, Optional

import torch

from tandem.speculative.eagle import compact
from tandem.speculative.eagle.identity import identity_of
from tandem.speculative.eagle.remote import protocol, wire
from tandem.speculative.eagle.remote.transport import NCCLTransport, TransportError, nccl_enabled, nccl_port_for
from tandem.speculative.eagle.supervision import compute_supervision

logger = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
# An idle keep-alive connection holds a handler thread; drop it after this long (the client reconnects).
DEFAULT_IDLE_TIMEOUT_S = 300.0
# A request's whole body must arrive within this long once its headers have: a client that stalls or
# trickles mid-body gets 408 and its thread back (the idle timeout alone restarts on every byte).
DEFAULT_BODY_TIMEOUT_S = 60.0
# Rendezvous and per-transfer limit of a client's data-plane group.
DEFAULT_NCCL_TIMEOUT_S = 120.0


class RequestError(Exception):
    """A request the server refuses: ``status`` is the HTTP status, the message goes to the client."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class Reply(NamedTuple):
    """A successful answer: the body as a list of buffers (see ``wire.encode``) and extra headers."""

    body: list
    content_type: str
    headers: dict


@dataclass
class _Session:
    """One training client (by its ``X-Tandem-Client`` id) and the draft vocabulary it asked for."""

    selected_token_ids: Optional[torch.Tensor] = None
    selected_token_mask: Optional[torch.Tensor] = None
    last_seen: float = field(default_factory=time.monotonic)
    # Its data-plane group, if /init_nccl set one up; None means the wire format.
    transport: Optional[NCCLTransport] = None
    # One transfer at a time on the group: two interleaved sends would pair with the wrong receives.
    transfer_lock: threading.Lock = field(default_factory=threading.Lock)


class _PendingSend(NamedTuple):
    """Supervision answered with metadata, to be sent over ``transport`` once the answer is flushed."""

    client_id: str
    transport: NCCLTransport
    tensors: dict


@dataclass
class _Stats:
    """Counters for the shutdown summary; guarded by the server's stats lock."""

    requests: int = 0
    errors: int = 0
    batches: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    supervision_s: float = 0.0
    batches_per_client: dict[str, int] = field(default_factory=dict)
    """Supervised batches by client id (the ranks of a data-parallel trainer each have their own)."""


def _decode_tensors(raw: bytes, expected: tuple[str, ...], what: str) -> dict[str, torch.Tensor]:
    """Decode a wire body that must hold exactly the tensors ``expected``; 400 for anything else."""
    try:
        tensors = wire.decode(raw)
    except wire.WireFormatError as exc:
        raise RequestError(400, f"{what}: malformed wire body: {exc}") from None
    missing = [k for k in expected if tensors.get(k) is None]
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise RequestError(400, f"{what}: expected tensors {list(expected)}; missing {missing}, unexpected {unexpected}")
    return tensors


def _check_ids(name: str, ids: torch.Tensor, vocab_size: int, what: str) -> None:
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise RequestError(400, f"{what}: {name} must be an integer tensor, got {ids.dtype}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise RequestError(400, f"{what}: {name} must lie in [0, {vocab_size}), got [{int(ids.min())}, {int(ids.max())}]")


def check_generate_inputs(tensors: dict[str, torch.Tensor], vocab_size: int) -> None:
    """400 unless ``input_ids``, ``attention_mask``, ``loss_mask`` are integer/bool ``[B, S]`` with B, S >= 1."""
    what = "generate"
    input_ids = tensors["input_ids"]
    if input_ids.dim() != 2 or input_ids.shape[0] < 1 or input_ids.shape[1] < 1:
        raise RequestError(400, f"{what}: input_ids must be [B, S] with B, S >= 1, got {list(input_ids.shape)}")
    for name in ("attention_mask", "loss_mask"):
        tensor = tensors[name]
        if tensor.shape != input_ids.shape:
            raise RequestError(400, f"{what}: {name} shape {list(tensor.shape)} != input_ids shape {list(input_ids.shape)}")
        if tensor.dtype.is_floating_point:
            raise RequestError(400, f"{what}: {name} must be an integer or bool tensor, got {tensor.dtype}")
    _check_ids("input_ids", input_ids, vocab_size, what)


def check_vocab_mapping(ids: torch.Tensor, mask: torch.Tensor, vocab_size: int) -> None:
    """400 unless ``selected_token_ids [Vd]`` (distinct ids) and ``selected_token_mask [V]`` bool agree."""
    what = "set_vocab_mapping"
    if mask.dtype != torch.bool or mask.shape != (vocab_size,):
        raise RequestError(400, f"{what}: selected_token_mask must be bool [{vocab_size}], got {mask.dtype} {list(mask.shape)}")
    if ids.dim() != 1 or ids.numel() == 0:
        raise RequestError(400, f"{what}: selected_token_ids must be a non-empty 1-D tensor, got {list(ids.shape)}")
    _check_ids("selected_token_ids", ids, vocab_size, what)
    distinct = int(torch.unique(ids).numel())
    if distinct != ids.numel() or int(mask.sum()) != distinct or not bool(mask[ids.long()].all()):
        raise RequestError(400, f"{what}: selected_token_mask is not the indicator of the {ids.numel()} selected_token_ids")


class TargetModelServer:
    """Request-handling logic for the remote target server (HTTP-transport agnostic).

    Arguments:
        target_wrapper: a loaded ``Eagle3TargetModel`` (or anything with its ``generate_batch``,
            ``get_input_embeddings`` and ``model_info``).
        nccl_port: rendezvous port of the data plane for a client that proposes none (clients of tandem and
            of the original design always propose one in ``/init_nccl``).
        host: bind/advertise address (the rendezvous master for the data plane).
        enable_nccl: offer the process-group data plane; off by default here, so the request logic alone
            never opens ports (``tandem serve-target`` turns it on unless ``TANDEM_ENABLE_NCCL=0`` or ``--no-nccl``).
        nccl_timeout_s: rendezvous limit and per-transfer limit of each client's group.
        token: if set, every endpoint but ``/health`` needs ``Authorization: Bearer <token>``.
        max_body_bytes: larger request bodies get 413 before they are read.
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
        exit_when_idle: bool = False,
        enable_nccl: bool = False,
        nccl_timeout_s: float = DEFAULT_NCCL_TIMEOUT_S,
        fault_injection: bool = False,
        identity: Optional[dict] = None,
    ):
        self.target_wrapper = target_wrapper
        self.fault_injection = fault_injection
        self._teardown_armed = threading.Event()
        self.nccl_port = nccl_port
        self.host = host
        self.token = token or None
        self.max_body_bytes = max_body_bytes
        self.exit_when_idle = exit_when_idle
        self._info = dict(target_wrapper.model_info())
        # The target's identity (name, weights digest, ...), computed once here unless the loader gave it.
        self._identity = identity if identity is not None else identity_of(target_wrapper)
        self._vocab_size = int(self._info["vocab_size"])
        # One target forward at a time: the aux-hidden capture hooks are shared state.
        self.generate_lock = threading.Lock()
        self.shutdown_event = threading.Event()
        self._sessions: dict[str, _Session] = {}
        self._sessions_lock = threading.Lock()
        self._stats = _Stats()
        self._stats_lock = threading.Lock()
        self._closed = False
        # Compact supervision only where it is exact: logits a bias-free linear map of the final hidden state.
        self.compact_supported = compact.output_projection(getattr(target_wrapper, "model", None)) is not None
        self._nccl_enabled = bool(enable_nccl)
        self.nccl_timeout_s = float(nccl_timeout_s)
        self._device = self._infer_device()
        # Data-plane port -> the client holding it (or setting it up), under the sessions lock.
        self._nccl_ports: dict[int, str] = {}
        # Open HTTP connections per client id. A client with none left may be dead: its port goes to the
        # next client that asks for it (its group is torn down then, not before: a client of the original
        # design may open a connection per request and still be alive).
        self._connections: dict[str, int] = {}
        # The send queued by generate for flush_nccl_send, per handler thread (each serves one connection).
        self._pending = threading.local()
    # ------------------------------------------------------------ checks before the body is read

    def route(self, method: str, path: str) -> str:
        """The endpoint name for ``method path``; 404 for an unknown path, 405 for a wrong method."""
        endpoint = path.split("?", 1)[0].strip("/")
        allowed = "GET" if endpoint in protocol.GET_ENDPOINTS else "POST" if endpoint in protocol.POST_ENDPOINTS else None
        if allowed is None:
            raise RequestError(404, f"unknown endpoint {path!r}; known: {sorted(protocol.GET_ENDPOINTS | protocol.POST_ENDPOINTS)}")
        if method != allowed:
            raise RequestError(405, f"{path} takes {allowed}, not {method}")
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

    def check_body_size(self, length: int) -> None:
        if length > self.max_body_bytes:
            raise RequestError(413, f"request body of {length} bytes exceeds the limit of {self.max_body_bytes} bytes")

    # ------------------------------------------------------------ dispatch

    def handle(
        self, endpoint: str, raw: bytes, *, client_id: str = protocol.ANONYMOUS_CLIENT, client_wants_nccl: bool = False,
        supervision_encoding: Optional[str] = None,
    ) -> Reply:
        """Answer one routed, authorized request; ``RequestError`` for anything the client got wrong.

        ``supervision_encoding``: the ``X-Tandem-Supervision`` request header (None when absent).
        """
        if endpoint not in protocol.PUBLIC_ENDPOINTS and endpoint != protocol.EP_DISCONNECT:
            self._session(client_id)
        try:
            return self._dispatch(endpoint, raw, client_id, client_wants_nccl, supervision_encoding)
        except RequestError:
            raise
        except protocol.ProtocolError as exc:
            raise RequestError(400, f"/{endpoint}: {exc}") from None
        except Exception as exc:
            logger.exception("internal error serving /%s for client %s", endpoint, client_id)
            raise RequestError(500, f"internal error serving /{endpoint}: {type(exc).__name__}: {exc}") from exc

    def _dispatch(
        self, endpoint: str, raw: bytes, client_id: str, client_wants_nccl: bool, supervision_encoding: Optional[str] = None
    ) -> Reply:
        if endpoint == protocol.EP_GENERATE:
            use_compact = self._use_compact(supervision_encoding)
            body, used_nccl = self.generate_buffers(raw, client_wants_nccl, client_id=client_id, compact_encoding=use_compact)
            # Echo the encoding used only to a client that asked: v1 answers stay exactly v1.
            echo = {} if supervision_encoding is None else {
                protocol.SUPERVISION_HEADER: protocol.ENCODING_COMPACT if use_compact else protocol.ENCODING_FULL}
            if used_nccl:
                return Reply(body, protocol.JSON_CONTENT_TYPE, {protocol.NCCL_HEADER: "1", **echo})
            return Reply(body, protocol.WIRE_CONTENT_TYPE, echo)
        if endpoint == protocol.EP_DRAFT_LM_HEAD:
            return Reply(self.draft_lm_head_buffers(client_id), protocol.WIRE_CONTENT_TYPE, {})
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

    def _session(self, client_id: str) -> _Session:
        with self._sessions_lock:
            session = self._sessions.get(client_id)
            if session is None:
                session = self._sessions[client_id] = _Session()
                logger.info("client %s connected (%d sessions)", client_id, len(self._sessions))
            session.last_seen = time.monotonic()
            return session

    @property
    def session_ids(self) -> list[str]:
        with self._sessions_lock:
            return list(self._sessions)

    # ------------------------------------------------------------ the endpoints

    def handle_health(self, _raw: bytes = b"", *, client_id: str = protocol.ANONYMOUS_CLIENT) -> bytes:
        return protocol.encode_json({"status": "ok"})

    def handle_model_info(self, _raw: bytes = b"", *, client_id: str = protocol.ANONYMOUS_CLIENT) -> bytes:
        info = dict(self._info)
        # Extra fields for tandem clients (the target's identity); clients of the original design ignore them.
        info["dtype"] = str(getattr(self.target_wrapper, "dtype", torch.float32)).removeprefix("torch.")
        info.update({k: v for k, v in self._identity.items() if k not in info})
        return protocol.encode_json(info)

    def input_embeddings_buffers(self) -> list:
        """Wire body ``{"weight": [V, H]}`` referencing the embedding's own memory (no copy on CPU)."""
        return wire.encode({protocol.EMBEDDINGS_KEY: self.target_wrapper.get_input_embeddings()})

    def handle_input_embeddings(self, _raw: bytes = b"", *, client_id: str = protocol.ANONYMOUS_CLIENT) -> bytes:
        """Return the target input-embedding weight (used once to seed the draft)."""
        return b"".join(self.input_embeddings_buffers())

    def handle_set_vocab_mapping(self, raw: bytes, *, client_id: str = protocol.ANONYMOUS_CLIENT) -> bytes:
        tensors = _decode_tensors(raw, protocol.VOCAB_MAPPING_KEYS, "set_vocab_mapping")
        ids, mask = tensors["selected_token_ids"], tensors["selected_token_mask"]
        check_vocab_mapping(ids, mask, self._vocab_size)
        session = self._session(client_id)
        # clone: the decoded tensors view the request buffer, which the next request may reuse.
        session.selected_token_ids = ids.to(torch.long).clone()
        session.selected_token_mask = mask.clone()
        return protocol.encode_json({"status": "ok"})

    def _use_compact(self, supervision_encoding: Optional[str]) -> bool:
        """Whether to answer compactly: the client asked and this target's logits allow it exactly."""
        if supervision_encoding not in (None, *protocol.SUPERVISION_ENCODINGS):
            raise RequestError(400, f"{protocol.SUPERVISION_HEADER} must be one of {list(protocol.SUPERVISION_ENCODINGS)}, "
                                    f"got {supervision_encoding!r}")
        return supervision_encoding == protocol.ENCODING_COMPACT and self.compact_supported

    def draft_lm_head_buffers(self, client_id: str) -> list:
        """Wire body ``{"weight": [Vd, H]}`` (target dtype): the ``lm_head`` rows of the session's draft vocabulary."""
        ids = self._session(client_id).selected_token_ids
        if ids is None:
            raise RequestError(409, "draft_lm_head before set_vocab_mapping: send the draft vocabulary first")
        if not self.compact_supported:
            raise RequestError(400, "this target's logits are not a bias-free linear map of its final hidden state: "
                                    "no compact supervision")
        return wire.encode({protocol.EMBEDDINGS_KEY: compact.draft_lm_head(self.target_wrapper.model, ids)})

    def supervise(self, raw: bytes, client_id: str, compact_encoding: bool = False) -> dict[str, torch.Tensor]:
        """Decode and check a ``/generate`` body and run ``compute_supervision`` under the generate lock
        (``compact.compute_compact_supervision`` with ``compact_encoding``)."""
        tensors = _decode_tensors(raw, protocol.REQUEST_KEYS, "generate")
        check_generate_inputs(tensors, self._vocab_size)
        session = self._session(client_id)
        ids, mask = session.selected_token_ids, session.selected_token_mask
        if ids is None:
            raise RequestError(409, "generate before set_vocab_mapping: send the draft vocabulary first")
        start = time.perf_counter()
        with self.generate_lock:
            supervise = compact.compute_compact_supervision if compact_encoding else compute_supervision
            out = supervise(
                self.target_wrapper, ids, mask, tensors["input_ids"].long(), tensors["attention_mask"], tensors["loss_mask"]
            )
        with self._stats_lock:
            self._stats.batches += 1
            self._stats.supervision_s += time.perf_counter() - start
            self._stats.batches_per_client[client_id] = self._stats.batches_per_client.get(client_id, 0) + 1
        keys = compact.COMPACT_SUPERVISION_KEYS if compact_encoding else protocol.SUPERVISION_KEYS
        return {key: out[key] for key in keys}

    def generate_buffers(
        self, raw: bytes, client_wants_nccl: bool, *, client_id: str = protocol.ANONYMOUS_CLIENT, compact_encoding: bool = False
    ) -> tuple[list, bool]:
        """Like ``handle_generate`` but the body is a list of buffers referencing the tensors (no join)."""
        supervision = self.supervise(raw, client_id, compact_encoding)
        transport = self._live_transport(client_id) if client_wants_nccl else None
        if transport is None:
            # No group for this client (never set up, or torn down): the wire body, without the header,
            # tells the client to stop expecting the group.
            return wire.encode(supervision), False
        self._pending.send = _PendingSend(client_id, transport, supervision)
        return [protocol.encode_nccl_metadata(supervision, list(supervision))], True

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
        """Set up this client's data-plane group on the port it proposes; blocks until the rendezvous ends.

        Body ``{"nccl_port": int, "rendezvous_id": str (optional)}``. Answers ``ok``, ``already_initialized``
        (this client has a live group), ``failed`` (port taken, rendezvous or handshake failed: the client
        uses the wire format; with ``"reason": "port_in_use"`` when another client's group holds the port,
        answered at once, so that the client can propose another) or ``disabled``.
        """
        payload = protocol.decode_json(raw, "init_nccl body") if raw else {}
        port, rendezvous_id = _init_nccl_request(payload, self.nccl_port)
        if not self._nccl_enabled:
            return protocol.encode_json({"status": protocol.NCCL_STATUS_DISABLED})
        session = self._session(client_id)
        if not self._claim_port(port, client_id, session):
            if session.transport is not None:
                return protocol.encode_json({"status": protocol.NCCL_STATUS_ALREADY})
            return protocol.encode_json(
                {"status": protocol.NCCL_STATUS_FAILED, "reason": protocol.NCCL_REASON_PORT_IN_USE}
            )
        transport = NCCLTransport(port, self.host, is_server=True, device=self._device, rendezvous_id=rendezvous_id)
        ok = transport.initialize(timeout_seconds=self.nccl_timeout_s)
        with self._sessions_lock:
            if ok and self._sessions.get(client_id) is session:
                session.transport = transport
                logger.info("client %s: data plane up (%s group on port %d)", client_id, transport.backend, port)
                return protocol.encode_json({"status": protocol.NCCL_STATUS_OK})
            self._nccl_ports.pop(port, None)
        transport.destroy()
        return protocol.encode_json({"status": protocol.NCCL_STATUS_FAILED})

    def _claim_port(self, port: int, client_id: str, session: _Session) -> bool:
        """Reserve ``port`` for ``client_id``; False if it already has a live group or the port is in use.

        A port held by a client with no open connection is taken back (that client is dead or gone; if it
        comes back, its next request gets the wire format).
        """
        with self._sessions_lock:
            if session.transport is not None and session.transport.is_initialized:
                return False
            holder = self._nccl_ports.get(port)
            if holder is not None and holder != client_id and self._connections.get(holder, 0) == 0:
                stale = self._sessions.get(holder)
                if stale is not None and stale.transport is not None:
                    self._nccl_ports[port] = client_id
                    transport, stale.transport = stale.transport, None
                    logger.warning("client %s left without a word; its data-plane port %d goes to %s", holder, port, client_id)
                    transport.destroy()  # never blocks: it only aborts and drops the local group
                    holder = None
            if holder is not None:
                logger.warning("client %s proposed data-plane port %d, which client %s holds", client_id, port, holder)
                return False
            self._nccl_ports[port] = client_id
            return True

    def _live_transport(self, client_id: str) -> Optional[NCCLTransport]:
        with self._sessions_lock:
            session = self._sessions.get(client_id)
            transport = session.transport if session is not None else None
        return transport if transport is not None and transport.is_initialized else None

    def _drop_transport(self, client_id: str, reason: str, level: int = logging.WARNING) -> None:
        """Tear down ``client_id``'s group (if any) and free its port; its session stays."""
        with self._sessions_lock:
            session = self._sessions.get(client_id)
            transport = session.transport if session is not None else None
            if transport is None:
                return
            session.transport = None
            self._nccl_ports.pop(transport.nccl_port, None)
        transport.destroy()
        logger.log(level, "client %s: data plane torn down (%s); the wire format from now on", client_id, reason)

    def flush_nccl_send(self) -> None:
        """Send the pending supervision over the data plane after the HTTP flush (no-op if none is pending).

        A failed or timed-out send tears the client's group down -- the client's receive then fails at once
        (gloo: the sockets close) or by its timeout (NCCL) -- and the client asks for the batch again over
        the wire format. The server goes on serving everyone.
        """
        pending = getattr(self._pending, "send", None)
        self._pending.send = None
        if pending is None:
            return
        with self._sessions_lock:
            session = self._sessions.get(pending.client_id)
        lock = session.transfer_lock if session is not None else threading.Lock()
        try:
            with lock:
                if self._teardown_armed.is_set():
                    self._teardown_armed.clear()
                    logger.warning("fault injection: tearing down client %s's data plane mid-transfer", pending.client_id)
                    pending.transport.inject_teardown_fault()
                pending.transport.send_tensors(pending.tensors, list(pending.tensors))  # the metadata's order
        except TransportError as exc:
            self._drop_transport(pending.client_id, f"send failed: {exc}")

    def arm_teardown_fault(self) -> None:
        """Testing only: the next data-plane send (any client's) tears its group down mid-transfer. The
        client must fall back to HTTP and ask for that batch again. Refused unless ``fault_injection``."""
        if not self.fault_injection:
            raise RuntimeError("fault injection is off (start the server with --enable-fault-injection)")
        self._teardown_armed.set()
        logger.warning("fault injection: armed; the next data-plane send tears its group down mid-transfer")

    def discard_nccl_send(self) -> None:
        """Forget the pending send: the metadata never reached the client, so nobody will receive."""
        self._pending.send = None

    def connection_opened(self, client_id: str) -> None:
        with self._sessions_lock:
            self._connections[client_id] = self._connections.get(client_id, 0) + 1

    def connection_closed(self, client_id: str) -> None:
        """A connection that carried ``client_id``'s requests closed (see ``_claim_port``)."""
        with self._sessions_lock:
            left = self._connections.get(client_id, 1) - 1
            if left > 0:
                self._connections[client_id] = left
            else:
                self._connections.pop(client_id, None)

    def handle_heartbeat(self, _raw: bytes = b"", *, client_id: str = protocol.ANONYMOUS_CLIENT) -> bytes:
        return protocol.encode_json({"status": "ok"})

    def handle_disconnect(self, _raw: bytes = b"", *, client_id: str = protocol.ANONYMOUS_CLIENT) -> bytes:
        """End this client's session; the server goes on unless it was told to exit when idle."""
        self._drop_transport(client_id, "client disconnected", logging.INFO)
        with self._sessions_lock:
            self._sessions.pop(client_id, None)
            idle = not self._sessions
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
                f"batches per client ({len(s.batches_per_client)}): {per_client or 'none'}"
            )

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            for client_id in self.session_ids:
                self._drop_transport(client_id, "server shutting down", logging.INFO)
            logger.info("target server: %s", self.summary())

    def _infer_device(self) -> torch.device:
        """Where the target's outputs live (the data plane's NCCL-or-gloo choice starts from it)."""
        return torch.device(getattr(self.target_wrapper, "device", "cpu"))


# ---------------------------------------------------------------- HTTP plumbing


def _init_nccl_request(payload: dict, default_port: int) -> tuple[int, str]:
    """``(port, rendezvous_id)`` of an ``/init_nccl`` body; ``RequestError`` 400 for bad values."""
    port = payload.get("nccl_port", default_port)
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise RequestError(400, f"init_nccl: nccl_port must be a TCP port (1-65535), got {port!r}")
    rendezvous_id = payload.get("rendezvous_id", "")
    if not isinstance(rendezvous_id, str) or len(rendezvous_id) > 128 or not rendezvous_id.isprintable():
        raise RequestError(400, "init_nccl: rendezvous_id must be a printable string of at most 128 characters")
    return port, rendezvous_id


class _ClientGone(Exception):
    """The peer closed the connection mid-request: there is nobody to answer."""


def _send_buffers(sock: socket.socket, buffers: list) -> int:
    """Write every buffer with as few syscalls as the kernel allows (``sendmsg`` is writev); returns bytes."""
    views = [memoryview(b).cast("B") for b in buffers if memoryview(b).nbytes]
    total = sum(v.nbytes for v in views)
    while views:
        sent = sock.sendmsg(views[:512])
        while views and sent >= views[0].nbytes:
            sent -= views[0].nbytes
            views.pop(0)
        if views and sent:
            views[0] = views[0][sent:]
    return total


def _make_request_handler(
    server_logic: TargetModelServer,
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
):
    """A ``BaseHTTPRequestHandler`` class bound to ``server_logic``: parse, check, read, answer, log."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: one connection carries a client's whole run
        server_version = "tandem-target/1"
        disable_nagle_algorithm = True  # small header writes must not wait for the peer's delayed ACK
        timeout = idle_timeout_s  # socket timeout between requests and while reading headers

        def do_GET(self):
            self._serve("GET")

        def do_POST(self):
            self._serve("POST")

        def do_PUT(self):
            self._serve("PUT")

        def do_DELETE(self):
            self._serve("DELETE")

        def log_message(self, format, *args):  # noqa: A002 - the base class's name
            logger.debug("%s " + format, self.address_string(), *args)

        def log_request(self, code="-", size="-"):
            pass  # _serve logs one line per request, with the client and the byte counts

        def handle(self):
            # One handler per connection: when it ends, tell the logic which clients it carried, so a
            # client that died (all its connections closed) loses its data-plane group and frees the port.
            self._client_ids: set[str] = set()
            try:
                super().handle()
            finally:
                for client_id in self._client_ids:
                    server_logic.connection_closed(client_id)

        def send_error(self, code, message=None, explain=None):
            # Malformed HTTP (bad request line, oversized headers, unknown method) gets JSON too.
            self.close_connection = True
            # A garbled request line leaves the version at HTTP/0.9, which has no status line: answer 1.0.
            if self.request_version == "HTTP/0.9":
                self.request_version = "HTTP/1.0"
            body = protocol.error_body(int(code), message or explain or HTTPStatus(code).phrase)
            self.send_response(code, message)
            self.send_header("Content-Type", protocol.JSON_CONTENT_TYPE)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _content_length(self) -> int:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                raise RequestError(411, "chunked request bodies are not supported: send Content-Length")
            values = self.headers.get_all("Content-Length") or ["0"]
            # Two different lengths let a proxy and this server split the stream differently (request
            # smuggling); isascii: str.isdigit() also takes "\u00b2", which int() then refuses.
            if len(set(values)) > 1:
                raise RequestError(400, f"conflicting Content-Length headers {values}")
            value = values[0].strip()
            if not (value.isascii() and value.isdigit()):
                raise RequestError(400, f"invalid Content-Length {value!r}")
            return int(value)

        def _read_body(self, length: int) -> bytearray:
            # One preallocated buffer, filled in place; wire.decode then views tensors inside it.
            body = bytearray(length)
            view, got = memoryview(body), 0
            deadline = time.monotonic() + body_timeout_s
            try:
                while got < length:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError
                    # One deadline for the whole body; readinto1 makes at most one recv, so a client trickling
                    # a byte at a time cannot keep one readinto (which loops until full) going past it.
                    self.connection.settimeout(left)
                    n = self.rfile.readinto1(view[got:])
                    if not n:
                        raise _ClientGone(f"body ended after {got} of {length} bytes")
                    got += n
            except TimeoutError:
                raise RequestError(408, f"request body not received within {body_timeout_s:g} s: got {got} of "
                                        f"{length} bytes") from None
            finally:
                self.connection.settimeout(self.timeout)
            return body

        def _serve(self, method: str) -> None:
            start = time.perf_counter()
            client_id = self.headers.get(protocol.CLIENT_ID_HEADER) or protocol.ANONYMOUS_CLIENT
            if client_id not in self._client_ids:
                self._client_ids.add(client_id)
                server_logic.connection_opened(client_id)
            status, bytes_in, body_read = 200, 0, False
            try:
                endpoint = server_logic.route(method, self.path)
                server_logic.authorize(endpoint, self.headers.get(protocol.AUTH_HEADER))
                length = self._content_length()
                server_logic.check_body_size(length)
                raw = self._read_body(length)
                bytes_in, body_read = length, True
                wants_nccl = self.headers.get(protocol.NCCL_HEADER) == "1"
                reply = server_logic.handle(endpoint, raw, client_id=client_id, client_wants_nccl=wants_nccl,
                                            supervision_encoding=self.headers.get(protocol.SUPERVISION_HEADER))
            except RequestError as exc:
                status = exc.status
                reply = Reply([protocol.error_body(exc.status, exc.message)], protocol.JSON_CONTENT_TYPE, {})
                # An unread body would be parsed as the next request: close instead of draining it.
                if not body_read and self.headers.get("Content-Length", "0") not in ("", "0"):
                    self.close_connection = True
            except (_ClientGone, OSError) as exc:
                logger.debug("client %s went away mid-request: %s", client_id, exc)
                self.close_connection = True
                return
            self._answered = False
            bytes_out = self._answer(status, reply, client_id)
            if status == 200 and self._answered:
                server_logic.flush_nccl_send()  # the data plane's tensors go only after the metadata
            else:
                server_logic.discard_nccl_send()
            server_logic.record(status, bytes_in, bytes_out)
            logger.debug(
                "%s %s client=%s status=%d in=%d out=%d %.1f ms",
                method, self.path, client_id, status, bytes_in, bytes_out, 1000 * (time.perf_counter() - start),
            )

        def _answer(self, status: int, reply: Reply, client_id: str) -> int:
            length = wire.body_size(reply.body)
            try:
                self.send_response(status)
                self.send_header("Content-Type", reply.content_type)
                self.send_header("Content-Length", str(length))
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                if self.close_connection:
                    self.send_header("Connection", "close")
                self.end_headers()
                sent = _send_buffers(self.connection, reply.body)
                self._answered = True
                return sent
            except OSError as exc:
                # The client left mid-response (crash, timeout, Ctrl-C): its problem, not the server's.
                logger.debug("client %s went away mid-response: %s", client_id, exc)
                self.close_connection = True
                return 0

    return Handler


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # a stuck keep-alive connection must not block shutdown
    allow_reuse_address = True  # a restarted server rebinds its port at once
    request_queue_size = 128  # the ranks of a data-parallel trainer connect at the same moment


def serve(
    server_logic: TargetModelServer,
    host: str,
    port: int,
    *,
    on_ready: Optional[Callable[[str, int], None]] = None,
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
) -> None:
    """Run the blocking HTTP server until stopped (Ctrl-C, SIGTERM, or the last client leaving with
    ``exit_when_idle``); then log the summary.

    Arguments:
        server_logic: the request logic.
        host: bind address (``127.0.0.1`` keeps the server private to the machine).
        port: TCP port; 0 picks a free one, reported to ``on_ready(host, port)`` once it accepts connections.
        idle_timeout_s: a connection silent this long between requests (or within headers) is closed.
        body_timeout_s: a request body not complete this long after its headers gets 408 and is closed.
    """
    httpd = _HTTPServer((host, port), _make_request_handler(server_logic, idle_timeout_s, body_timeout_s))
    bound_host, bound_port = httpd.server_address[:2]
    restore = _stop_on_sigterm(server_logic.shutdown_event)
    loop = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.2}, name="tandem-http", daemon=True)
    loop.start()
    logger.info("target server listening on http://%s:%d", bound_host, bound_port)
    if on_ready is not None:
        on_ready(bound_host, bound_port)
    try:
        while not server_logic.shutdown_event.wait(0.5):
            pass
    except KeyboardInterrupt:
        logger.info("interrupted")
    finally:
        httpd.shutdown()
        httpd.server_close()
        restore()
        server_logic.close()


def _stop_on_sigterm(event: threading.Event) -> Callable[[], None]:
    """Make SIGTERM set ``event`` (a graceful stop with the summary); returns the undo. Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: event.set())
    return lambda: signal.signal(signal.SIGTERM, previous)


# ---------------------------------------------------------------- `tandem serve-target`

READY_LINE = "tandem serve-target: listening on http://{host}:{port}"


def add_serve_target_parser(subparsers) -> None:
    """Register ``tandem serve-target`` on the CLI's subparsers."""
    from tandem.models import DTYPE_CHOICES

    p = subparsers.add_parser("serve-target", help="serve a frozen target for remote training (tandem train --target-url)")
    p.add_argument("--model", default="default", help="target: default, an HF directory or a .gguf file (default: default)")
    p.add_argument("--host", default="127.0.0.1",
                   help="bind address; 0.0.0.0 serves every interface, so set --token (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8001, help="TCP port; 0 picks a free one and prints it (default: 8001)")
    p.add_argument("--token", default=None, help=f"require 'Authorization: Bearer TOKEN' (default: ${protocol.TOKEN_ENV} if set)")
    p.add_argument("--aux-layer-ids", type=int, nargs=3, default=None, help="the three captured layers (default: [1, L//2-1, L-4])")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="target dtype; auto = bfloat16 on GPUs and on CPUs with native bf16 matmul, else float32 "
                        "(default: auto)")
    p.add_argument("--device", default=None, help="where the target runs (default: cuda if available, else cpu)")
    p.add_argument("--max-body-mb", type=float, default=DEFAULT_MAX_BODY_BYTES / 2**20,
                   help="request body limit in MiB (default: 64)")
    p.add_argument("--idle-timeout", type=float, default=DEFAULT_IDLE_TIMEOUT_S,
                   help="close a connection silent this many seconds between requests or within headers (default: 300)")
    p.add_argument("--body-timeout", type=float, default=DEFAULT_BODY_TIMEOUT_S,
                   help="answer 408 and close when a request body is not complete this many seconds after its "
                        "headers (default: 60)")
    p.add_argument("--exit-when-idle", action="store_true", help="exit when the last client disconnects")
    p.add_argument("--nccl", action=argparse.BooleanOptionalAction, default=None,
                   help="offer the process-group data plane to clients (default: on unless TANDEM_ENABLE_NCCL=0)")
    p.add_argument("--nccl-timeout", type=float, default=DEFAULT_NCCL_TIMEOUT_S,
                   help="seconds a client's data-plane rendezvous or one transfer may take before the group is torn "
                        "down and that client goes on over HTTP (default: 120)")
    p.add_argument("--enable-fault-injection", action="store_true",
                   help="TESTING ONLY (bench/soak.py): on SIGUSR1, tear down the process-group data plane in the "
                        "middle of the next data-plane send, so the client must fall back to HTTP and ask for that "
                        "batch again. Never use it in production (default: off)")
    p.set_defaults(func=cmd_serve_target)


def cmd_serve_target(args) -> int:
    import os

    from tandem.models import load_target
    from tandem.speculative.eagle.identity import describe, target_identity
    from tandem.speculative.eagle.target import Eagle3TargetModel

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_target(args.model, dtype=args.dtype, device=device)
    target = Eagle3TargetModel(model, args.aux_layer_ids)
    started = time.perf_counter()
    identity = target_identity(model, target.aux_layer_ids, name=args.model, tokenizer=tokenizer)
    logger.info("serving %s (identity computed in %.1f s)", describe(identity), time.perf_counter() - started)
    token = args.token or os.environ.get(protocol.TOKEN_ENV) or None
    if args.host not in ("127.0.0.1", "localhost", "::1") and token is None:
        logger.warning("serving on %s without a token: anyone who reaches this port can use the target", args.host)
    logic = TargetModelServer(
        target,
        nccl_port=nccl_port_for(args.port),
        host=args.host,
        token=token,
        max_body_bytes=int(args.max_body_mb * 2**20),
        exit_when_idle=args.exit_when_idle,
        enable_nccl=nccl_enabled() if args.nccl is None else args.nccl,
        nccl_timeout_s=args.nccl_timeout,
        fault_injection=args.enable_fault_injection,
        identity=identity,
    )
    if args.enable_fault_injection:  # from outside, at a moment of the tester's choosing (the soak's schedule)
        signal.signal(signal.SIGUSR1, lambda signum, frame: logic.arm_teardown_fault())
        logger.warning("fault injection enabled: SIGUSR1 tears down the next data-plane send mid-transfer")
    # The ready line goes to stdout: launchers (tandem demo, the tests) wait for it to learn the port.
    try:
        serve(logic, args.host, args.port, on_ready=lambda host, port: print(READY_LINE.format(host=host, port=port), flush=True),
              idle_timeout_s=args.idle_timeout, body_timeout_s=args.body_timeout)
    except OSError as exc:
        raise ValueError(f"cannot serve on {args.host}:{args.port}: {exc}") from exc
    return 0
