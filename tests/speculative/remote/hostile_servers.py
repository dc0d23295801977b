"""Small real servers on 127.0.0.1 that misbehave on purpose, for the tests of a client that trusts no server.

:class:`SilentServer` accepts connections and never answers. :class:`TamperingProxy` stands in front of a real
``tandem serve-target`` and passes every exchange through, except that for the endpoints it is told it can
rewrite the answer's body, hold the answer back, or drip it a byte at a time. Every thread is a daemon and
every wait is bounded, so a test that fails cannot hang the suite.
"""

from __future__ import annotations

import http.client
import socket
import threading
import time
from typing import Callable, Optional
from urllib.parse import urlsplit

# The longest any misbehaving handler keeps a connection (a test's deadline is far shorter).
HOLD_S = 60.0


class SilentServer:
    """Accepts every connection, reads what comes, and never answers (until ``close`` or ``HOLD_S``)."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.connections = 0
        self._closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._hold, args=(conn,), daemon=True).start()

    def _hold(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(0.2)
            deadline = time.monotonic() + HOLD_S
            while not self._closed.is_set() and time.monotonic() < deadline:
                try:
                    if not conn.recv(65536):
                        return  # the client gave up
                except socket.timeout:
                    continue
                except OSError:
                    return

    def close(self) -> None:
        self._closed.set()
        self.listener.close()


def _read_request(reader) -> Optional[tuple[str, str, list[tuple[str, str]], bytes]]:
    """``(method, path, headers, body)`` of one request on ``reader`` (None at the end of the stream)."""
    line = reader.readline()
    if not line:
        return None
    method, path, _ = line.decode("latin-1").split(" ", 2)
    headers, length = [], 0
    while (raw := reader.readline()) not in (b"\r\n", b""):
        name, _, value = raw.decode("latin-1").partition(":")
        headers.append((name.strip(), value.strip()))
        length = int(value) if name.strip().lower() == "content-length" else length
    return method, path, headers, reader.read(length)


class TamperingProxy:
    """A pass-through proxy to ``upstream`` (a real server's URL) that misbehaves on ``endpoints``.

    Arguments:
        upstream: ``http://127.0.0.1:PORT`` of the real server.
        endpoints: the paths to tamper with (``"/verify"``, ...).
        rewrite: ``body -> body`` applied to those endpoints' 200 answers (lying answers).
        drip_s: send those answers one byte every ``drip_s`` seconds (0: at once).
        silent: hold those requests and never answer.
        delay_s: answer those requests honestly, but only after ``delay_s`` seconds (a slow server).
    """

    def __init__(self, upstream: str, endpoints: tuple[str, ...], *, rewrite: Optional[Callable[[bytes], bytes]] = None,
                 drip_s: float = 0.0, silent: bool = False, delay_s: float = 0.0):
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port)
        self.endpoints, self.rewrite = endpoints, rewrite
        self.drip_s, self.silent, self.delay_s = drip_s, silent, delay_s
        self.tampered = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self._closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        upstream = http.client.HTTPConnection(*self.upstream, timeout=HOLD_S)
        try:
            with conn, conn.makefile("rb") as reader:
                while (request := _read_request(reader)) is not None:
                    if not self._answer(conn, upstream, *request):
                        return
        except OSError:
            return
        finally:
            upstream.close()

    def _answer(self, conn: socket.socket, upstream, method: str, path: str, headers, body: bytes) -> bool:
        """Pass one exchange through (tampered with where told); False once the connection is to end."""
        upstream.request(method, path, body=body, headers={k: v for k, v in headers if k.lower() != "host"})
        response = upstream.getresponse()
        answer = response.read()
        tamper = path.split("?")[0] in self.endpoints
        if tamper:
            self.tampered += 1
            if self.silent:
                self._closed.wait(HOLD_S)
                return False
            time.sleep(self.delay_s)
            if self.rewrite is not None and response.status == 200:
                answer = self.rewrite(answer)
        head = [f"HTTP/1.1 {response.status} {response.reason}"]
        head += [f"{k}: {v}" for k, v in response.getheaders() if k.lower() not in ("content-length", "connection")]
        head.append(f"Content-Length: {len(answer)}")
        data = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + answer
        if tamper and self.drip_s:
            deadline = time.monotonic() + HOLD_S
            for i in range(len(data)):
                if self._closed.is_set() or time.monotonic() > deadline:
                    return False
                conn.sendall(data[i:i + 1])  # an OSError once the client hung up ends the handler
                time.sleep(self.drip_s)
            return True
        conn.sendall(data)
        return True

    def close(self) -> None:
        self._closed.set()
        self.listener.close()
