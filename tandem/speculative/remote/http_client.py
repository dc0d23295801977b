"""One target server as the client sees it: keep-alive connections, bounded retries, answers read into one buffer.

Connection errors and 5xx are retried with bounded exponential backoff (a 503's ``Retry-After`` honoured),
then raise a :class:`RemoteTargetError` naming the server; a 4xx is the caller's mistake and raises at once
with the server's message. Every request, retries included, ends by its deadline (``request_deadline.py``): a
server that never answers or drips its answer is given up then, the error saying what it did. Request bodies
go out from the tensors' own memory (``wire.encode``); answers are read into one preallocated buffer that
decoded tensors view in place, never past the size the request allows.
"""

from __future__ import annotations

import http.client
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union
from urllib.parse import urlsplit

from tandem.speculative.remote import protocol, wire
from tandem.speculative.remote.answer_checks import JSON_ANSWER_BYTES, AnswerError
from tandem.speculative.remote.errors import RemoteTargetError
from tandem.speculative.remote.request_deadline import DeadlineHTTPConnection, DeadlineHTTPSConnection, ServerTooSlow

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class RetryPolicy:
    """How hard to try before giving up on a server."""

    max_retries: int = 8
    """Retries after the first attempt (connection errors and 5xx only; a 4xx is never retried)."""
    backoff_s: float = 0.5
    """Wait before the first retry; doubled after each failure."""
    max_backoff_s: float = 8.0
    """Cap on one wait. The defaults ride out about 45 s of server downtime (a restart)."""

    def delays(self):
        return (min(self.backoff_s * 2**i, self.max_backoff_s) for i in range(self.max_retries))


def error_message(body: bytes) -> str:
    """The ``error`` field of a JSON error body, or the raw text."""
    try:
        return str(protocol.decode_json(body).get("error", body[:500].decode("utf-8", "replace")))
    except protocol.ProtocolError:
        return bytes(body[:500]).decode("utf-8", "replace")


class ServerConnection:
    """Keep-alive HTTP connections to one server: one per concurrent request, reused afterwards."""

    # Where large answers are read into (set by the client; shared by its servers). None: a new buffer each.
    receive_pool: Optional[wire.ReceivePool] = None
    # Called with (server, connection) for every new connection before its first request (set by the client
    # once the run's target identity is known): a server that came back serving another model is caught here.
    on_new_connection: Optional[Callable[["ServerConnection", http.client.HTTPConnection], None]] = None

    def __init__(self, url: str, *, timeout_s: float, token: Optional[str], client_id: str, retry: RetryPolicy):
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"target URL must look like http://host:port, got {url!r}")
        self.url = f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"
        self._scheme, self._host, self._port = parts.scheme, parts.hostname, parts.port
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        # This server's ``ClientDataPlane``, set by the client when the process-group data plane is enabled.
        self.data_plane = None
        self._base_path = parts.path.rstrip("/")
        self._timeout_s = timeout_s
        self._retry = retry
        self._headers = {protocol.CLIENT_ID_HEADER: client_id}
        if token:
            self._headers[protocol.AUTH_HEADER] = protocol.bearer(token)
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    @property
    def timeout_s(self) -> float:
        """The deadline of one request, retries included, in seconds."""
        return self._timeout_s

    def _connection(self, reuse: bool, deadline: float) -> http.client.HTTPConnection:
        with self._lock:
            if reuse and self._idle:
                return self._idle.pop()
        cls = DeadlineHTTPSConnection if self._scheme == "https" else DeadlineHTTPConnection
        conn = cls(self._host, self._port, self._timeout_s)
        conn.clock.start(deadline)  # the identity check below belongs to this request
        if self.on_new_connection is not None:
            try:
                self.on_new_connection(self, conn)
            except BaseException:
                conn.close()
                raise
        return conn

    def _once(self, method: str, endpoint: str, body: Sequence, headers: dict,
              max_bytes: int, deadline: float) -> tuple[int, bytearray, dict]:
        """One request, over by ``deadline`` (``time.monotonic()``); ``(status, body, response headers)``. Raises
        OSError/HTTPException on I/O failure (``ServerTooSlow`` past the deadline), ``AnswerError`` for an
        answer longer than ``max_bytes``.

        A pooled connection the server has meanwhile closed (its idle timeout, a restart) fails at once;
        that is no sign of trouble, so the request is sent again on a fresh connection without backoff.
        """
        with self._lock:
            pooled = bool(self._idle)
        try:
            return self._exchange(self._connection(True, deadline), method, endpoint, body, headers, max_bytes,
                                  deadline=deadline)
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
            if not pooled:
                raise
        return self._exchange(self._connection(False, deadline), method, endpoint, body, headers, max_bytes,
                              deadline=deadline)

    def _exchange(self, conn, method: str, endpoint: str, body: Sequence, headers: dict,
                  max_bytes: int, pool: bool = True, deadline: Optional[float] = None) -> tuple[int, bytearray, dict]:
        """One request on ``conn``: ``(status, body, response headers)``; afterwards ``conn`` goes back to the
        idle pool (unless ``pool`` is False: its caller goes on using it) or is closed when the server said so.
        ``deadline``: when this exchange must be over (None: the one its connection was started with)."""
        if deadline is not None:
            conn.clock.start(deadline)
        try:
            conn.putrequest(method, f"{self._base_path}/{endpoint}", skip_accept_encoding=True)
            for name, value in {**self._headers, **headers, "Content-Length": str(wire.body_size(body))}.items():
                conn.putheader(name, value)
            conn.endheaders()
            for buffer in body:
                conn.send(buffer)
            response = conn.getresponse()
            payload = read_body(response, self.receive_pool, max_bytes)
        except TimeoutError:  # the deadline (each read's timeout is the time left): say what the server did
            connected, received = conn.sock is not None, conn.clock.received
            conn.close()
            raise ServerTooSlow(self._timeout_s, connected, received) from None
        except BaseException:
            conn.close()
            raise
        if response.will_close:
            conn.close()
        elif pool:
            with self._lock:
                self._idle.append(conn)
        return response.status, payload, {k.lower(): v for k, v in response.getheaders()}

    def request(
        self,
        endpoint: str,
        body: Sequence = (),
        *,
        method: str = "POST",
        content_type: str = protocol.WIRE_CONTENT_TYPE,
        retry: Optional[RetryPolicy] = None,
        headers: Optional[dict] = None,
        with_nccl_flag: bool = False,
        max_answer_bytes: int = JSON_ANSWER_BYTES,
    ) -> Union[bytearray, tuple[bytearray, bool]]:
        """Send one request with retries; returns the 200 body or raises ``RemoteTargetError``.

        With ``with_nccl_flag`` returns ``(body, flag)``, the flag True when the server echoed ``X-NeMo-NCCL: 1``
        (the body is then data-plane metadata and the tensors follow over the group). An answer announcing
        more than ``max_answer_bytes`` is refused before it is read (never retried: the server is broken).
        The whole request, retries and their waits included, ends within ``timeout_s``: a server that sends
        nothing or too little by then is given up (``ServerTooSlow``), the error saying what it did.
        """
        headers = {**(headers or {}), "Content-Type": content_type}
        deadline = time.monotonic() + self._timeout_s
        policy = retry or self._retry
        delays = policy.delays()
        attempt = 0
        while True:
            attempt += 1
            retry_after = 0.0
            try:
                status, payload, answer_headers = self._once(method, endpoint, body, headers, max_answer_bytes,
                                                             deadline)
            except AnswerError as exc:
                raise RemoteTargetError(self.url, endpoint, f"refused the answer: {exc}") from None
            except ServerTooSlow as exc:
                raise RemoteTargetError(self.url, endpoint, str(exc) + self._attempts(attempt)) from None
            except (OSError, http.client.HTTPException) as exc:
                failure = f"{type(exc).__name__}: {exc}"
            else:
                if status == 200:
                    return ((payload, answer_headers.get(protocol.NCCL_HEADER.lower()) == "1")
                            if with_nccl_flag else payload)
                if status < 500:
                    raise RemoteTargetError(self.url, endpoint, error_message(payload), status)
                failure = f"HTTP {status}: {error_message(payload)}"
                retry_after = retry_after_s(answer_headers.get("retry-after"))  # a saturated server's 503
            delay = next(delays, None)
            if delay is not None:
                delay = max(delay, min(retry_after, policy.max_backoff_s))
            if delay is not None and time.monotonic() + delay >= deadline:
                delay = None  # no time left for another attempt
                failure += f" (the {self._timeout_s:g} s request deadline leaves no time to retry)"
            if delay is None:
                raise RemoteTargetError(self.url, endpoint, f"gave up after {attempt} attempts; last error: {failure}")
            logger.warning("target server %s /%s failed (%s); retry %d in %.1f s",
                           self.url, endpoint, failure, attempt, delay)
            time.sleep(delay)

    @staticmethod
    def _attempts(attempt: int) -> str:
        return f" (attempt {attempt}; earlier ones failed)" if attempt > 1 else ""

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def retry_after_s(value: Optional[str]) -> float:
    """Seconds of a ``Retry-After: N`` header (0 when absent or not a number of seconds)."""
    try:
        return max(float(value), 0.0) if value is not None else 0.0
    except ValueError:
        return 0.0


def read_body(response: http.client.HTTPResponse, pool: Optional[wire.ReceivePool] = None,
               max_bytes: int = JSON_ANSWER_BYTES) -> bytearray:
    """Read the whole response into one preallocated buffer (decoded tensors will view it in place);
    from ``pool`` when given, so that a large answer lands in memory without page faults.

    ``AnswerError`` for an answer longer than ``max_bytes``: refused before a byte of it is read when its
    ``Content-Length`` says so, else (a chunked or close-delimited answer) after ``max_bytes + 1`` bytes.
    """
    if response.length is None:
        body = response.read(max_bytes + 1)
        if len(body) > max_bytes:
            raise AnswerError(f"the answer runs past {max_bytes} bytes, the most this request can take")
        return bytearray(body)
    if response.length > max_bytes:
        raise AnswerError(f"Content-Length {response.length} exceeds {max_bytes} bytes, the most this request can take")
    body = pool.take(response.length) if pool is not None else bytearray(response.length)
    view, got = memoryview(body), 0
    while got < len(view):
        n = response.readinto(view[got:])
        if not n:
            raise http.client.IncompleteRead(b"", len(view) - got)
        got += n
    return body
