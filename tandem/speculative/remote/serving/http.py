"""The target server's HTTP plumbing: connections, deadlines, framing; the request logic is elsewhere.

Why the standard library's ``http.server`` and not an h11/httptools server: the answer path is zero-copy
(``sendmsg`` of the tensors' own memory, ``wire.encode``) and a request body is read into one buffer that
tensors then view; both are plain blocking socket calls, one thread per connection, which suits a server that
runs one target forward at a time anyway. What the standard library lacks is added here and tested against a
real server (``tests/speculative/remote/test_http_abuse.py``, ``test_server_hardening.py``): bounded
connections (:class:`BoundedHTTPServer`), a deadline and a size bound for the header block
(:class:`_DeadlineReader`), a deadline for the whole body, and strict framing (no chunked bodies, no folded
or conflicting headers; a refused request closes its connection). The limits: docs/security.md.
"""

from __future__ import annotations

import errno
import io
import logging
import selectors
import signal
import socket
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import Callable, Optional

from tandem.speculative.remote import protocol, wire
from tandem.speculative.remote.serving.request_checks import Reply, RequestError, RequestHeaders

logger = logging.getLogger(__name__)

# An idle keep-alive connection holds a handler thread; drop it after this long (the client reconnects).
DEFAULT_IDLE_TIMEOUT_S = 300.0
# A request's whole body must arrive within this long once its headers have: a client that stalls or
# trickles mid-body gets 408 and its thread back.
DEFAULT_BODY_TIMEOUT_S = 60.0
# A request's request line and headers must arrive within this long of its first byte.
DEFAULT_HEADER_TIMEOUT_S = 10.0
# Connections (each with its handler thread) served at once; a data-parallel trainer holds about
# ranks x prefetch depth of them.
DEFAULT_MAX_CONNECTIONS = 256
# The request line and headers of one request; tandem's are a few hundred bytes.
MAX_HEADER_BYTES = 64 * 1024
# Refused connections kept for a graceful close (their 503 read before the close): beyond, closed at once.
_MAX_LINGERING = 64
_LINGER_S = 1.0
_LINGER_BYTES = 256 * 1024


@dataclass(frozen=True)
class HTTPLimits:
    """How long the server waits on a client; see the module constants for why each default."""

    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S


class _ClientGone(Exception):
    """The peer closed the connection mid-request: there is nobody to answer."""


class _DeadlineExpired(Exception):
    """A read did not complete within the current phase's deadline (headers or body)."""


class _HeadersTooLarge(Exception):
    """The request line and headers ran past ``MAX_HEADER_BYTES``."""


class _DeadlineReader(io.RawIOBase):
    """The connection's raw reader, under one deadline and one byte budget for the current phase.

    Python's socket timeout restarts on every ``recv``: a client sending a byte now and then would keep
    a request going forever. Here each ``recv`` gets what is left of the phase's deadline instead.
    """

    def __init__(self, sock: socket.socket, idle_timeout_s: float):
        self._sock = sock
        self._idle_timeout_s = idle_timeout_s
        self._deadline: Optional[float] = None
        self._budget: Optional[int] = None
        self.received = 0  # bytes over the connection's life

    def phase(self, timeout_s: Optional[float] = None, budget: Optional[int] = None) -> None:
        """Start a phase: reads fail past ``timeout_s`` from now (None: per-recv idle timeout) or
        ``budget`` bytes (None: no bound)."""
        self._deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self._budget = budget

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self._deadline is None:
            self._sock.settimeout(self._idle_timeout_s)
        else:
            left = self._deadline - time.monotonic()
            if left <= 0:
                raise _DeadlineExpired
            self._sock.settimeout(left)
        view = memoryview(buffer)
        if self._budget is not None:
            if self._budget <= 0:
                raise _HeadersTooLarge
            view = view[: self._budget]
        try:
            n = self._sock.recv_into(view)
        except TimeoutError:
            if self._deadline is None:
                raise
            raise _DeadlineExpired from None
        if self._budget is not None:
            self._budget -= n
        self.received += n
        return n


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


def _printable(text: str) -> str:
    """``text`` safe for one log line: control characters escaped (a path can hold any of them)."""
    return text.translate(BaseHTTPRequestHandler._control_char_table)


class TargetRequestHandler(BaseHTTPRequestHandler):
    """One connection of the target server: parse, check, read, hand to the logic, answer, log.

    ``logic`` (a ``TargetModelServer``) answers the requests and ``limits`` (:class:`HTTPLimits`) bound the
    waits: those of the :class:`BoundedHTTPServer` that accepted the connection, unless a subclass binds its
    own (:func:`_make_request_handler`).
    """

    @property
    def logic(self):
        return self.server.logic

    @property
    def limits(self) -> HTTPLimits:
        return self.server.limits

    protocol_version = "HTTP/1.1"  # keep-alive: one connection carries a client's whole run
    server_version = "tandem-target/1"
    disable_nagle_algorithm = True  # small header writes must not wait for the peer's delayed ACK

    @property
    def timeout(self) -> float:  # read by StreamRequestHandler.setup: socket timeout for writes and between requests
        return self.limits.idle_timeout_s

    def setup(self):
        super().setup()
        self.rfile.close()
        self._reader = _DeadlineReader(self.connection, self.limits.idle_timeout_s)
        self.rfile = io.BufferedReader(self._reader, 64 * 1024)
        self._served = 0

    def handle_one_request(self):
        if self._served:  # between requests of a kept-alive connection: the idle timeout
            self._reader.phase()
            try:
                if not self.rfile.peek(1):
                    self.close_connection = True
                    return
            except OSError:  # idle past the timeout, or the peer reset: close quietly
                self.close_connection = True
                return
        # A request's line and headers have one deadline and one size budget: from its first byte, or for
        # a new connection from the accept (a connection that never speaks holds a thread that long only).
        self._reader.phase(self.limits.header_timeout_s, MAX_HEADER_BYTES)
        self._served += 1
        try:
            super().handle_one_request()
        except _DeadlineExpired:
            self._refuse_headers(408, f"request headers not received within {self.limits.header_timeout_s:g} s")
        except _HeadersTooLarge:
            self._refuse_headers(431, f"request line and headers exceed {MAX_HEADER_BYTES} bytes")

    def _refuse_headers(self, code: int, message: str) -> None:
        self.close_connection = True
        if self._reader.received == 0:
            return  # a new connection that never sent a byte: nobody to answer
        self.request_version = getattr(self, "request_version", None) or "HTTP/1.1"
        self.command = getattr(self, "command", None)
        self.requestline = getattr(self, "requestline", "")
        try:
            self.send_error(code, message)
        except OSError:
            pass

    def do_GET(self):
        self._serve("GET")

    def do_POST(self):
        self._serve("POST")

    def do_PUT(self):
        self._serve("PUT")

    def do_DELETE(self):
        self._serve("DELETE")

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        logger.debug("%s %s", self.address_string(), _printable(format % args))

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
                self.logic.connection_closed(client_id)

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

    def _read_body(self, length: int) -> bytearray:
        # One preallocated buffer, filled in place; wire.decode then views tensors inside it.
        body = bytearray(length)
        view, got = memoryview(body), 0
        self._reader.phase(self.limits.body_timeout_s)  # one deadline for the whole body, not per recv
        try:
            while got < length:
                n = self.rfile.readinto1(view[got:])
                if not n:
                    raise _ClientGone(f"body ended after {got} of {length} bytes")
                got += n
        except _DeadlineExpired:
            raise RequestError(408, f"request body not received within {self.limits.body_timeout_s:g} s: got {got} of "
                                    f"{length} bytes") from None
        finally:
            self._reader.phase()
        return body

    def _serve(self, method: str) -> None:
        start = time.perf_counter()
        self._reader.phase()  # the headers are in
        status, bytes_in, client_id, place = 200, 0, protocol.ANONYMOUS_CLIENT, None
        try:
            headers = RequestHeaders.parse(self.headers)
            length, client_id = headers.content_length, headers.client_id
            if client_id not in self._client_ids:
                self._client_ids.add(client_id)
                self.logic.connection_opened(client_id)
            endpoint = self.logic.route(method, self.path)
            self.logic.authorize(endpoint, self.headers.get(protocol.AUTH_HEADER))
            self.logic.check_body_size(length, endpoint)
            place = self.logic.admit(endpoint, client_id)  # a full queue is refused before the body is read
            raw = self._read_body(length)
            bytes_in = length
            reply = self.logic.handle(endpoint, raw, place=place, **headers.for_logic())
        except RequestError as exc:
            status = exc.status
            reply = Reply([protocol.error_body(exc.status, exc.message)], protocol.JSON_CONTENT_TYPE, exc.headers)
            # A refused request may leave an unread body behind, which must never be parsed as a request.
            self.close_connection = True
        except (_ClientGone, OSError) as exc:
            logger.debug("client %s went away mid-request: %s", client_id, exc)
            self.close_connection = True
            return
        finally:
            if place is not None:
                place.release()
        self._answered = False
        bytes_out = self._answer(status, reply, client_id)
        if status == 200 and self._answered:
            self.logic.flush_nccl_send()  # the data plane's tensors go only after the metadata
        else:
            self.logic.discard_nccl_send()
        self.logic.record(status, bytes_in, bytes_out)
        logger.debug("%s %s client=%s status=%d in=%d out=%d %.1f ms", method, _printable(self.path), client_id,
                     status, bytes_in, bytes_out, 1000 * (time.perf_counter() - start))

    def _answer(self, status: int, reply: Reply, client_id: str) -> int:
        length = wire.body_size(reply.body)
        try:
            self.connection.settimeout(self.limits.idle_timeout_s)
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


def _make_request_handler(server_logic, limits: HTTPLimits | None = None) -> type[TargetRequestHandler]:
    """The original design's handler factory: a :class:`TargetRequestHandler` bound to ``server_logic``, for
    any ``socketserver`` server (``serve`` uses :class:`BoundedHTTPServer`, which needs none)."""
    return type("BoundTargetRequestHandler", (TargetRequestHandler,),
                {"logic": server_logic, "limits": limits or HTTPLimits()})


def _linger_then_close(sock: socket.socket, deadline: float) -> None:
    """Half-close, read what the peer still sends until it closes or ``deadline``, then close: closing with
    unread bytes makes the kernel send a reset, which can destroy our answer before the peer reads it."""
    try:
        sock.shutdown(socket.SHUT_WR)
        drained = 0
        while drained < _LINGER_BYTES:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            sock.settimeout(left)
            chunk = sock.recv(65536)
            if not chunk:
                break
            drained += len(chunk)
    except OSError:
        pass
    finally:
        sock.close()


_SATURATED = (
    "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\nConnection: close\r\n"
)


def _saturated_response(max_connections: int) -> bytes:
    body = protocol.error_body(503, f"the target server is serving its limit of {max_connections} connections "
                                    f"(--max-connections); retry later")
    return (_SATURATED + f"Content-Length: {len(body)}\r\n\r\n").encode("latin-1") + body


class BoundedHTTPServer:
    """Accepts connections on ``address`` and serves each in its own thread, at most ``max_connections``.

    One past the limit is answered 503 (``Retry-After``) from the accept loop and closed gracefully; the
    connections already served are untouched. Accept errors (file descriptors exhausted) are logged and
    backed off from, never spun on.

    Arguments:
        address: ``(host, port)``; port 0 picks a free one (see ``server_address``).
        logic: the request logic the handlers read (``self.logic``), a ``TargetModelServer``.
        limits: the handlers' timeouts (``self.limits``).
        max_connections: connections served at once.
        handler_class: a ``socketserver.BaseRequestHandler`` (called as ``handler(sock, addr, server)``).
    """

    def __init__(self, address: tuple[str, int], logic, limits: "HTTPLimits | None" = None,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS, handler_class=TargetRequestHandler):
        if max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {max_connections}")
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        # create_server sets SO_REUSEADDR: a restarted server rebinds its port at once.
        self.socket = socket.create_server(address, family=family, backlog=128)
        self.socket.setblocking(False)
        self.server_address = self.socket.getsockname()[:2]
        self.handler_class = handler_class
        self.logic = logic
        self.limits = limits or HTTPLimits()
        self.max_connections = max_connections
        self._refusal = _saturated_response(max_connections)
        self._active = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._stopped = threading.Event()
        self._lingering: dict[socket.socket, float] = {}
        self._last_accept_error = 0.0
        self.refused = 0

    @property
    def active_connections(self) -> int:
        with self._lock:
            return self._active

    def serve_forever(self, poll_interval: float = 0.2) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self.socket, selectors.EVENT_READ)
        try:
            while not self._stop.is_set():
                for key, _ in selector.select(poll_interval):
                    if key.fileobj is self.socket:
                        self._accept(selector)
                    else:
                        self._drain(selector, key.fileobj)
                now = time.monotonic()
                for sock in [s for s, deadline in self._lingering.items() if deadline <= now]:
                    self._forget(selector, sock)
        finally:
            for sock in list(self._lingering):
                self._forget(selector, sock)
            selector.close()
            self._stopped.set()

    def _accept(self, selector: selectors.BaseSelector) -> None:
        try:
            conn, address = self.socket.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        except OSError as exc:
            # EMFILE/ENFILE/ENOBUFS/ENOMEM: the connection stays in the backlog; wait for resources instead
            # of spinning on the same error (and say so at most every few seconds).
            if time.monotonic() - self._last_accept_error > 5.0:
                logger.warning("accept failed (%s); backing off", errno.errorcode.get(exc.errno, exc))
                self._last_accept_error = time.monotonic()
            time.sleep(0.1)
            return
        conn.setblocking(True)
        with self._lock:
            admitted = self._active < self.max_connections
            self._active += admitted
        if admitted:
            threading.Thread(target=self._serve_connection, args=(conn, address), name="tandem-http-conn",
                             daemon=True).start()
            return
        self.refused += 1
        try:
            conn.setblocking(False)
            conn.send(self._refusal)  # a few hundred bytes: fits the socket buffer at once
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            conn.close()
            return
        if len(self._lingering) >= _MAX_LINGERING:
            conn.close()
            return
        self._lingering[conn] = time.monotonic() + _LINGER_S
        selector.register(conn, selectors.EVENT_READ)

    def _drain(self, selector: selectors.BaseSelector, sock: socket.socket) -> None:
        try:
            if sock.recv(65536):
                return
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        self._forget(selector, sock)

    def _forget(self, selector: selectors.BaseSelector, sock: socket.socket) -> None:
        self._lingering.pop(sock, None)
        try:
            selector.unregister(sock)
        except (KeyError, ValueError):
            pass
        sock.close()

    def _serve_connection(self, conn: socket.socket, address) -> None:
        try:
            self.handler_class(conn, address, self)
        except Exception:  # noqa: BLE001 - one connection's failure must not end the server
            logger.exception("error serving a connection from %s", address)
        finally:
            _linger_then_close(conn, time.monotonic() + _LINGER_S)
            with self._lock:
                self._active -= 1

    def shutdown(self) -> None:
        """Stop the accept loop (connections being served end with their daemon threads)."""
        self._stop.set()
        self._stopped.wait(10)

    def server_close(self) -> None:
        self.socket.close()


def serve(
    server_logic,
    host: str,
    port: int,
    *,
    on_ready: Optional[Callable[[str, int], None]] = None,
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
) -> None:
    """Run the blocking HTTP server until stopped (Ctrl-C, SIGTERM, or the last client leaving with
    ``exit_when_idle``); then log the summary.

    Arguments:
        server_logic: the request logic (a ``TargetModelServer``).
        host: bind address (``127.0.0.1`` keeps the server private to the machine).
        port: TCP port; 0 picks a free one, reported to ``on_ready(host, port)`` once it accepts connections.
        idle_timeout_s: a connection silent this long between requests is closed.
        body_timeout_s: a request body not complete this long after its headers gets 408 and is closed.
        header_timeout_s: a request whose line and headers are not complete this long after its first byte
            gets 408 and is closed.
        max_connections: connections served at once; one more gets 503 and is closed.
    """
    limits = HTTPLimits(idle_timeout_s, body_timeout_s, header_timeout_s)
    httpd = BoundedHTTPServer((host, port), server_logic, limits, max_connections)
    bound_host, bound_port = httpd.server_address
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
        if httpd.refused:
            logger.info("refused %d connections over the limit of %d", httpd.refused, max_connections)
        server_logic.close()


def _stop_on_sigterm(event: threading.Event) -> Callable[[], None]:
    """Make SIGTERM set ``event`` (a graceful stop with the summary); returns the undo. Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: event.set())
    return lambda: signal.signal(signal.SIGTERM, previous)
