"""Raw-socket HTTP helpers and ``/proc`` readings for the tests that attack a real server process.

Everything an attack test asserts about the server is read from the operating system: memory from
``/proc/PID/status``, threads from ``/proc/PID/task``, CPU time from ``/proc/PID/stat``, listening
addresses from ``/proc/net/tcp`` and ``/proc/net/tcp6``.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time

from tandem.speculative.remote.client import RemoteEagle3TargetModel
from tests.speculative.remote.remote_utils import assert_same_supervision


@contextlib.contextmanager
def good_client_running(url: str, expected, token: str | None = None, client_id: str = "good"):
    """A client asking for supervision in a loop while the body runs; checks every answer bit for bit and
    that at least one request completed after the abuse (the server kept serving, not just survived).

    ``expected``: ``(vocabulary mapping, [(batch, its supervision), ...])``.
    """
    mapping, cases = expected
    stop, errors, done = threading.Event(), [], [0]

    def loop():
        try:
            with RemoteEagle3TargetModel(url, token=token, client_id=client_id, timeout_s=60) as client:
                client.set_vocab_mapping(*mapping)
                while not stop.is_set():  # no count cap: a fast machine must still be asking after the abuse
                    batch, want = cases[done[0] % len(cases)]
                    assert_same_supervision(client.supervise(*batch), want)
                    done[0] += 1
        except BaseException as exc:  # surfaced to the test below
            errors.append(exc)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    # Abuse starts once the good client is in steady state (session, vocabulary, data plane if any).
    deadline = time.monotonic() + 60
    while done[0] < 1 and not errors and time.monotonic() < deadline:
        time.sleep(0.02)
    yield
    after_abuse = done[0]
    deadline = time.monotonic() + 60
    while done[0] <= after_abuse and not errors and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    thread.join(60)
    assert not errors, errors
    assert done[0] > after_abuse, "the good client got no answer after the abuse"


def connect(port: int, timeout: float = 30.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def head(method: str, path: str, length=None, token: str | None = None, extra: str = "") -> bytes:
    """A request's line and headers; ``extra`` holds more header lines, each ending in CRLF."""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    if token:
        lines.append(f"Authorization: Bearer {token}")
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode("latin-1")


def read_until_closed(sock: socket.socket, limit_s: float = 30.0) -> bytes:
    """Everything the server sends until it closes the connection (bounded by ``limit_s``)."""
    data, deadline = b"", time.monotonic() + limit_s
    while time.monotonic() < deadline:
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
            chunk = sock.recv(65536)
        except (TimeoutError, ConnectionResetError):
            break
        if not chunk:
            return data
        data += chunk
    raise AssertionError(f"the server did not close the connection within {limit_s} s; got {data[:300]!r}")


def parse_responses(data: bytes) -> list[tuple[int, dict, bytes]]:
    """Consecutive HTTP responses as ``(status, lower-case headers, body)``."""
    out = []
    while data:
        header_block, sep, rest = data.partition(b"\r\n\r\n")
        assert sep, f"incomplete response {data[:200]!r}"
        lines = header_block.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", 0))
        out.append((int(lines[0].split()[1]), headers, rest[:length]))
        data = rest[length:]
    return out


def error_of(body: bytes) -> str:
    return json.loads(body)["error"]


# ---------------------------------------------------------------- /proc


def proc_threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def proc_memory_kib(pid: int, field: str = "VmHWM") -> int:
    """``VmRSS`` (resident now) or ``VmHWM`` (its peak so far) of process ``pid``, in KiB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(f"no {field} in /proc/{pid}/status")


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def listening_addresses(port: int) -> list[str]:
    """The local addresses a TCP socket listens on at ``port`` (``127.0.0.1``, ``0.0.0.0``, ``::`` ...)."""
    found = []
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            address, hex_port = fields[1].split(":")
            if fields[3] != "0A" or int(hex_port, 16) != port:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(address)
            # /proc prints the address as native-endian 32-bit words.
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            found.append(socket.inet_ntop(family, raw))
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
