"""An overall deadline for one request to a target server: connect, send, headers and the whole answer.

A socket timeout bounds one read, not a request: a server that accepts the connection and drips its answer
a byte a second, or its headers a line a minute, keeps every single read within any timeout forever. Here
the connection's socket re-arms its timeout before every send and receive with the time left until the
request's deadline (never more than the idle ``read_timeout_s``), and refuses to wait at all once the
deadline has passed, so no server can hold a request past it. The socket also counts the bytes it received,
so that the error can say what the server did (nothing at all, or some bytes too slowly).
"""

from __future__ import annotations

import http.client
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Optional


class DeadlineExceeded(TimeoutError):
    """A request ran past its deadline (a ``TimeoutError``, so an ``OSError`` like any I/O failure)."""


class ServerTooSlow(TimeoutError):
    """No complete answer by the deadline; the message says what the server did meanwhile."""

    def __init__(self, limit_s: float, connected: bool, received: int):
        did = ("did not accept the connection" if not connected else
               "accepted the connection and sent nothing" if received == 0 else
               f"sent {received} bytes of its answer and was still sending (too slow, or dripping)")
        super().__init__(f"no complete answer within the {limit_s:g} s request deadline: the server {did}")
        self.received = received


@dataclass
class RequestClock:
    """The deadline of the request a connection is carrying and what its socket received meanwhile."""

    read_timeout_s: float
    deadline: Optional[float] = None
    """``time.monotonic()`` past which no more I/O is attempted (None: only ``read_timeout_s`` applies)."""
    received: int = 0
    """Bytes received since :meth:`start`."""

    def start(self, deadline: Optional[float]) -> None:
        self.deadline, self.received = deadline, 0

    def timeout(self) -> float:
        """The socket timeout of the next I/O: the time left, at most ``read_timeout_s``; ``DeadlineExceeded``
        when none is left."""
        if self.deadline is None:
            return self.read_timeout_s
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded("the request's deadline has passed")
        return min(left, self.read_timeout_s)


class _Armed:
    """Socket methods that re-arm the timeout from the connection's :class:`RequestClock` before each I/O."""

    clock: Optional[RequestClock] = None

    def _arm(self) -> None:
        if self.clock is not None:
            self.settimeout(self.clock.timeout())

    def recv_into(self, buffer, *args, **kwargs):  # the defaults differ between plain and TLS sockets
        self._arm()
        got = super().recv_into(buffer, *args, **kwargs)
        if self.clock is not None:
            self.clock.received += got
        return got

    def sendall(self, data, *args, **kwargs):  # one timeout for the whole call (plain sockets, Python >= 3.5)
        self._arm()
        return super().sendall(data, *args, **kwargs)


class _DeadlineSocket(_Armed, socket.socket):
    pass


class _DeadlineSSLSocket(_Armed, ssl.SSLSocket):
    pass


def _create_connection(clock: RequestClock):
    def create(address, timeout=None, source_address=None):
        plain = socket.create_connection(address, clock.timeout(), source_address)
        sock = _DeadlineSocket(plain.family, plain.type, plain.proto, fileno=plain.detach())
        sock.clock = clock
        return sock
    return create


class DeadlineHTTPConnection(http.client.HTTPConnection):
    """An ``HTTPConnection`` whose every request ends by ``clock.deadline`` (set it with ``clock.start``)."""

    def __init__(self, host: str, port: Optional[int], read_timeout_s: float):
        super().__init__(host, port, timeout=read_timeout_s)
        self.clock = RequestClock(read_timeout_s)
        self._create_connection = _create_connection(self.clock)


class DeadlineHTTPSConnection(http.client.HTTPSConnection):
    """The HTTPS form of :class:`DeadlineHTTPConnection` (the TLS socket re-arms its timeout the same way)."""

    def __init__(self, host: str, port: Optional[int], read_timeout_s: float):
        context = ssl.create_default_context()
        context.sslsocket_class = _DeadlineSSLSocket
        super().__init__(host, port, timeout=read_timeout_s, context=context)
        self.clock = RequestClock(read_timeout_s)
        self._create_connection = _create_connection(self.clock)

    def connect(self) -> None:
        super().connect()
        self.sock.clock = self.clock
