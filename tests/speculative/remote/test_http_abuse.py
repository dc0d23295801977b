"""HTTP abuse against a real ``tandem serve-target`` process, with a good client training beside it.

Bodies longer than ``Content-Length``, lying and conflicting lengths, clients that stall or trickle
mid-body (the server answers 408 and the thread is freed), 100 concurrent connections, unknown methods,
missing and wrong tokens: each gets its status and the good client's answers stay bit-exact throughout.
Raw sockets, loopback only; every loop is bounded in count and time.
"""

from __future__ import annotations

import contextlib
import functools
import json
import socket
import threading
import time

import pytest
import torch

from tandem.speculative.remote import protocol, wire
from tandem.speculative.target.supervision import compute_supervision
from tests.speculative.remote import http_utils
from tests.speculative.remote.http_utils import error_of, parse_responses, proc_threads, read_until_closed
from tests.speculative.remote.remote_utils import (
    load_tiny_target,
    save_tiny_target,
    start_tiny_server,
    tiny_batch,
    tiny_vocab_mapping,
)

pytestmark = pytest.mark.timeout(120)

TOKEN = "abuse-token"
BODY_TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    return save_tiny_target(tmp_path_factory.mktemp("abuse") / "target")


@pytest.fixture(scope="module")
def server(target_dir, tmp_path_factory):
    process = start_tiny_server(target_dir, tmp_path_factory.mktemp("abuse_log") / "serve.log", "--max-body-mb", "1",
                                "--body-timeout", str(BODY_TIMEOUT_S), "--idle-timeout", "30", token=TOKEN)
    yield process
    process.stop()


@pytest.fixture(scope="module")
def expected(target_dir):
    """The good client's three batches and their in-process supervision."""
    reference, mapping = load_tiny_target(target_dir), tiny_vocab_mapping()
    batches = [tiny_batch(seed=50 + i) for i in range(3)]
    return mapping, [(batch, compute_supervision(reference, *mapping, *batch)) for batch in batches]


def good_client_running(server, expected):
    return http_utils.good_client_running(server.url, expected, token=TOKEN)


def connect(server, timeout=30.0) -> socket.socket:
    return http_utils.connect(server.port, timeout)


head = functools.partial(http_utils.head, token=TOKEN)


def server_threads(server) -> int:
    return proc_threads(server.proc.pid)


# ---------------------------------------------------------------- lengths


def test_bytes_past_content_length_are_the_next_request_and_garbage_there_is_400(server, expected):
    with good_client_running(server, expected), connect(server) as sock:
        sock.sendall(head("POST", "/heartbeat", 2) + b"{}" + b"NOT A REQUEST LINE AT ALL\r\n\r\n")
        replies = parse_responses(read_until_closed(sock))
    assert [status for status, _, _ in replies] == [200, 400]
    assert json.loads(replies[0][2]) == {"status": "ok"}
    assert replies[1][1]["connection"] == "close" and error_of(replies[1][2])


def test_a_smuggled_second_request_past_content_length_is_just_a_second_request(server, expected):
    """Extra bytes are never read as part of the first body: they parse as the next request (pipelining)."""
    with good_client_running(server, expected), connect(server) as sock:
        sock.sendall(head("POST", "/heartbeat", 2) + b"{}" + head("GET", "/health", token=None,
                                                                  extra="Connection: close\r\n"))
        replies = parse_responses(read_until_closed(sock))
    assert [(s, json.loads(b)) for s, _, b in replies] == [(200, {"status": "ok"}), (200, {"status": "ok"})]


@pytest.mark.parametrize("lengths, fragment", [
    (["2", "50"], "conflicting Content-Length"),  # smuggling: which one frames the body?
    (["1e3"], "invalid Content-Length"),
    (["0x10"], "invalid Content-Length"),
    (["\xb2"], "invalid Content-Length"),  # isdigit() is True for a superscript 2; int() refuses it
    (["-1"], "invalid Content-Length"),
])
def test_lying_or_malformed_content_length_is_400(server, expected, lengths, fragment):
    extra = "".join(f"Content-Length: {value}\r\n" for value in lengths)
    with good_client_running(server, expected), connect(server) as sock:
        sock.sendall(head("POST", "/heartbeat", extra=extra) + b"{}")
        replies = parse_responses(read_until_closed(sock))
    assert len(replies) == 1 and replies[0][0] == 400 and fragment in error_of(replies[0][2])


def test_content_length_over_the_limit_is_413_before_any_body_is_read(server, expected):
    with good_client_running(server, expected), connect(server) as sock:
        sock.sendall(head("POST", "/generate", 50 << 20))  # claims 50 MiB, sends nothing
        replies = parse_responses(read_until_closed(sock, limit_s=BODY_TIMEOUT_S / 2))
    assert replies[0][0] == 413 and "exceeds the limit" in error_of(replies[0][2])


def test_a_body_shorter_than_content_length_then_eof_frees_the_connection(server, expected):
    with good_client_running(server, expected), connect(server) as sock:
        sock.sendall(head("POST", "/generate", 1000) + b"x" * 10)
        sock.shutdown(socket.SHUT_WR)  # the client is gone mid-body: nobody to answer
        assert read_until_closed(sock, limit_s=BODY_TIMEOUT_S / 2) == b""
    deadline = time.monotonic() + 10
    while "went away mid-request" not in server.log_tail(500_000) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "went away mid-request" in server.log_tail(500_000)


# ---------------------------------------------------------------- slow clients


def test_clients_stalled_mid_body_get_408_and_their_threads_back(server, expected):
    with good_client_running(server, expected):
        before = server_threads(server)
        socks = [connect(server) for _ in range(5)]
        for sock in socks:
            sock.sendall(head("POST", "/generate", 1000) + b"x" * 10)  # then nothing: a lying length
        time.sleep(0.5)
        during = server_threads(server)
        started = time.monotonic()
        replies = [parse_responses(read_until_closed(sock, limit_s=BODY_TIMEOUT_S + 10)) for sock in socks]
        waited = time.monotonic() - started
        for sock in socks:
            sock.close()
        deadline = time.monotonic() + 10
        while server_threads(server) > before and time.monotonic() < deadline:
            time.sleep(0.05)
        after = server_threads(server)
    assert during >= before + len(socks)  # one handler thread per stalled connection...
    assert after <= before  # ...and every one of them freed
    assert waited < BODY_TIMEOUT_S + 5
    for reply in replies:
        assert len(reply) == 1 and reply[0][0] == 408 and "not received within" in error_of(reply[0][2])


def test_a_client_trickling_its_body_gets_408_at_the_body_deadline(server, expected):
    """Each byte resets a per-recv timeout; the body deadline does not move."""
    with good_client_running(server, expected), connect(server) as sock:
        sock.sendall(head("POST", "/generate", 1000))
        started, answer = time.monotonic(), b""
        for _ in range(40):  # a byte every 0.2 s: never silent for long, never done
            try:
                sock.sendall(b"x")
            except OSError:  # the server answered and closed
                break
            sock.settimeout(0.2)
            with contextlib.suppress(TimeoutError):
                answer += sock.recv(65536)
            if answer:
                break
        elapsed = time.monotonic() - started
        answer += read_until_closed(sock, limit_s=5)
    assert parse_responses(answer)[0][0] == 408
    assert BODY_TIMEOUT_S - 0.5 <= elapsed < BODY_TIMEOUT_S + 3


# ---------------------------------------------------------------- load


def test_100_concurrent_connections_are_all_served(server, expected):
    count, errors, statuses = 100, [], []
    barrier = threading.Barrier(count, timeout=60)
    lock = threading.Lock()

    def one(index: int):
        try:
            with connect(server, timeout=60) as sock:
                barrier.wait()  # all 100 connections open at once before anyone asks
                sock.sendall(head("GET", "/health", token=None) + head("POST", "/heartbeat", 2) + b"{}"
                             + head("POST", "/model_info", 0, extra="Connection: close\r\n"))
                got = [s for s, _, _ in parse_responses(read_until_closed(sock, limit_s=60))]
            with lock:
                statuses.append(got)
        except BaseException as exc:
            errors.append((index, exc))

    with good_client_running(server, expected):
        threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(90)
    assert not errors, errors[:3]
    assert statuses == [[200, 200, 200]] * count


# ---------------------------------------------------------------- methods and tokens


@pytest.mark.parametrize("method", ["PATCH", "OPTIONS", "TRACE", "CONNECT", "BREW", "HEAD"])
def test_unknown_methods_get_501(server, expected, method):
    with good_client_running(server, expected), connect(server) as sock:
        sock.sendall(head(method, "/health"))
        replies = parse_responses(read_until_closed(sock))
    assert len(replies) == 1 and replies[0][0] == 501
    if method != "HEAD":  # a HEAD answer has no body
        assert "Unsupported method" in error_of(replies[0][2])


@pytest.mark.parametrize("method, path, status", [("PUT", "/generate", 405), ("DELETE", "/health", 405),
                                                  ("GET", "/../../etc/passwd", 404), ("GET", "*", 404)])
def test_known_methods_on_the_wrong_endpoint_get_405_or_404(server, expected, method, path, status):
    with good_client_running(server, expected), connect(server) as sock:
        sock.sendall(head(method, path, 0, extra="Connection: close\r\n"))
        replies = parse_responses(read_until_closed(sock))
    assert replies[0][0] == status and error_of(replies[0][2])


BAD_AUTH = {
    "none": None,
    "wrong token": f"Bearer {TOKEN}x",
    "token prefix": f"Bearer {TOKEN[:-1]}",
    "empty bearer": "Bearer ",
    "basic scheme": f"Basic {TOKEN}",
    "no scheme": TOKEN,
}


@pytest.mark.parametrize("endpoint", sorted(protocol.POST_ENDPOINTS))
@pytest.mark.parametrize("auth", sorted(BAD_AUTH))
def test_every_private_endpoint_refuses_a_missing_or_wrong_token_with_401(server, endpoint, auth):
    value = BAD_AUTH[auth]
    extra = (f"Authorization: {value}\r\n" if value is not None else "") + "Connection: close\r\n"
    with connect(server) as sock:
        sock.sendall(head("POST", f"/{endpoint}", 2, token=None, extra=extra) + b"{}")
        replies = parse_responses(read_until_closed(sock))
    assert replies[0][0] == 401 and error_of(replies[0][2])


def test_without_a_token_the_server_reads_no_body_and_health_stays_public(server, expected):
    with good_client_running(server, expected):
        with connect(server) as sock:
            sock.sendall(head("POST", "/generate", 900_000, token=None))  # declares a body, sends none
            started = time.monotonic()
            replies = parse_responses(read_until_closed(sock, limit_s=BODY_TIMEOUT_S / 2))
        assert time.monotonic() - started < BODY_TIMEOUT_S / 2  # refused at once, never waiting for a body
        assert replies[0][0] == 401
        with connect(server) as sock:
            sock.sendall(head("GET", "/health", token=None, extra="Connection: close\r\n"))
            replies = [(s, json.loads(b)) for s, _, b in parse_responses(read_until_closed(sock))]
            assert replies == [(200, {"status": "ok"})]


def test_json_past_the_parsers_limits_is_400_over_http(server, expected):
    body = b'{"nccl_port": 1' + b"0" * 5000 + b"}"
    with good_client_running(server, expected), connect(server) as sock:
        sock.sendall(head("POST", "/init_nccl", len(body), extra="Connection: close\r\n") + body)
        replies = parse_responses(read_until_closed(sock))
    assert replies[0][0] == 400 and "JSON" in error_of(replies[0][2])


def test_a_malformed_wire_body_is_400_and_the_good_client_is_undisturbed(server, expected):
    body = wire.encode_to_bytes({"input_ids": torch.zeros(1, 2**10, dtype=torch.long)})
    body = body[:-5]
    with good_client_running(server, expected), connect(server) as sock:
        sock.sendall(head("POST", "/generate", len(body), extra="Connection: close\r\n") + body)
        replies = parse_responses(read_until_closed(sock))
    assert replies[0][0] == 400 and "malformed wire body" in error_of(replies[0][2])
