"""Attacks on a real ``tandem serve-target`` process (issue 14, items 1-5), each with its fixed outcome.

Every figure is read from the operating system, never assumed: the server's peak memory from
``/proc/PID/status``, its threads and CPU time from ``/proc/PID``, listening addresses from
``/proc/net/tcp``. Raw sockets and real clients, loopback only; every loop is bounded in count and time.
"""

from __future__ import annotations

import http.client
import json
import os
import resource
import socket
import struct
import threading
import time

import numpy as np
import pytest
import torch

from tandem.speculative.remote import protocol, wire
from tandem.speculative.remote.client import RemoteEagle3TargetModel
from tandem.speculative.remote.http_client import RetryPolicy
from tandem.speculative.target.supervision import compute_supervision
from tests.speculative.remote.http_utils import (
    connect,
    error_of,
    good_client_running,
    head,
    listening_addresses,
    parse_responses,
    proc_cpu_seconds,
    proc_memory_kib,
    proc_threads,
    read_until_closed,
)
from tests.speculative.remote.remote_utils import (
    assert_same_supervision,
    load_tiny_target,
    save_tiny_target,
    start_tiny_server,
    tiny_batch,
    tiny_vocab_mapping,
)

pytestmark = pytest.mark.timeout(180)

TOKEN = "hardening-token"
NCCL_TIMEOUT_S = 4.0
MAX_CONNECTIONS = 24
HEADER_TIMEOUT_S = 2.0
MAX_SESSIONS = 8
FLOODERS = 10


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    return save_tiny_target(tmp_path_factory.mktemp("hardening") / "target")


@pytest.fixture(scope="module")
def reference(target_dir):
    return load_tiny_target(target_dir)


@pytest.fixture(scope="module")
def expected(reference):
    """The good client's vocabulary and three batches with their in-process supervision."""
    mapping = tiny_vocab_mapping()
    batches = [tiny_batch(seed=70 + i) for i in range(3)]
    return mapping, [(batch, compute_supervision(reference, *mapping, *batch)) for batch in batches]


@pytest.fixture(scope="module")
def rdv_server(target_dir, tmp_path_factory):
    """Data plane on, its default port range (the port rule's), a short group timeout."""
    process = start_tiny_server(target_dir, tmp_path_factory.mktemp("rdv") / "serve.log", token=TOKEN,
                                nccl_timeout_s=NCCL_TIMEOUT_S, any_nccl_port=False)
    yield process
    process.stop()


@pytest.fixture(scope="module")
def limits_server(target_dir, tmp_path_factory):
    """A budget large enough that a 64 MiB body is read and decoded; a queue of two places."""
    process = start_tiny_server(target_dir, tmp_path_factory.mktemp("limits") / "serve.log", "--max-batch-tokens",
                                "3000000", "--max-queued-requests", "2", "--body-timeout", "3", token=TOKEN)
    yield process
    process.stop()


@pytest.fixture(scope="module")
def http_server(target_dir, tmp_path_factory):
    process = start_tiny_server(
        target_dir, tmp_path_factory.mktemp("http") / "serve.log", "--max-connections", str(MAX_CONNECTIONS),
        "--header-timeout", str(HEADER_TIMEOUT_S), "--idle-timeout", "30", "--max-sessions", str(MAX_SESSIONS),
        "--session-idle-timeout", "1", token=TOKEN)
    yield process
    process.stop()


def post(port: int, endpoint: str, body: bytes = b"", headers: dict | None = None) -> tuple[int, dict, bytes]:
    """One request on its own connection: ``(status, lower-case headers, body)``."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", f"/{endpoint}", body=body,
                     headers={"Authorization": f"Bearer {TOKEN}", **(headers or {})})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def generate_body(input_ids: torch.Tensor) -> bytes:
    return wire.encode_to_bytes({"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
                                 "loss_mask": torch.ones_like(input_ids)})


# ---------------------------------------------------------------- 1. the rendezvous stays on the bound address


def test_init_nccl_refuses_ports_outside_the_range_and_nothing_listens_there(rdv_server):
    low, high = rdv_server.port + 100, rdv_server.port + 3099
    outside = [81, high + 1] if high + 1 < 65536 else [81, low - 1]
    for port in outside:
        status, _, body = post(rdv_server.port, "init_nccl", json.dumps({"nccl_port": port}).encode(),
                               {"Content-Type": "application/json"})
        answer = json.loads(body)
        assert status == 200 and answer["status"] == "failed" and answer["reason"] == "port_not_allowed"
        assert answer["allowed"] == [low, min(high, 65535)]
        assert listening_addresses(port) == []


def test_the_rendezvous_store_listens_on_the_bound_address_only_and_answers_within_the_group_timeout(rdv_server):
    port = rdv_server.port + 100 + 37
    answer: dict = {}

    def ask():
        started = time.monotonic()
        answer["reply"] = post(rdv_server.port, "init_nccl", json.dumps({"nccl_port": port}).encode(),
                               {"Content-Type": "application/json", "X-Tandem-Client": "lonely"})
        answer["elapsed"] = time.monotonic() - started

    asking = threading.Thread(target=ask, daemon=True)
    asking.start()
    deadline = time.monotonic() + 3
    while not listening_addresses(port) and time.monotonic() < deadline:
        time.sleep(0.02)
    during = listening_addresses(port)
    # A stranger reaching the store mid-rendezvous (it may: the port is open then) is no peer of the group.
    with socket.create_connection(("127.0.0.1", port), timeout=2) as stranger:
        stranger.sendall(b"\x00" * 4096)
        asking.join(NCCL_TIMEOUT_S + 5)
    assert during == ["127.0.0.1"]  # never 0.0.0.0
    status, _, body = answer["reply"]
    assert status == 200 and json.loads(body)["status"] == "failed"
    # Answered before a client whose HTTP timeout equals the group timeout gives up (and asks again).
    assert answer["elapsed"] < NCCL_TIMEOUT_S - 0.25
    assert listening_addresses(port) == []


def test_once_the_group_forms_its_store_stops_listening_and_batches_still_arrive_over_the_group(
        rdv_server, expected, monkeypatch):
    for name in ("TANDEM_NCCL_PORT", "NEMO_EAGLE_NCCL_PORT"):
        monkeypatch.delenv(name, raising=False)
    mapping, cases = expected
    with RemoteEagle3TargetModel(rdv_server.url, token=TOKEN, client_id="grouped", enable_nccl=True,
                                 nccl_timeout_s=NCCL_TIMEOUT_S) as client:
        client.set_vocab_mapping(*mapping)
        assert_same_supervision(client.supervise(*cases[0][0]), cases[0][1])
        port = client._servers[0].data_plane.port
        assert client.transfer_counts["group"] == 1
        assert listening_addresses(port) == []
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2)
        for batch, want in cases[1:]:
            assert_same_supervision(client.supervise(*batch), want)
        assert client.transfer_counts == {"group": 3, "http": 0, "group_failures": 0}


# ---------------------------------------------------------------- 2. small requests, bounded memory


def test_a_40000_token_row_is_413_before_the_forward_and_costs_no_memory(limits_server):
    pid = limits_server.proc.pid
    before = proc_memory_kib(pid)
    body = generate_body(torch.zeros(1, 40000, dtype=torch.uint8))  # 117 KiB
    status, _, answer = post(limits_server.port, "generate", body)
    assert status == 413 and "context window of 512" in error_of(answer)
    # B x S over --max-batch-tokens 3000000: 6000 x 512 uint8 ids (9 MB of body).
    status, _, answer = post(limits_server.port, "generate", generate_body(torch.zeros(6000, 512, dtype=torch.uint8)))
    assert status == 413 and "exceeds this server's budget of 3000000 tokens" in error_of(answer)
    assert proc_memory_kib(pid) - before < 64 * 1024  # the bodies themselves; no forward ran


def scalar_entries_body(size: int) -> bytes:
    """A wire body of ``size`` bytes made of distinct one-byte uint8 scalar entries (24 bytes each)."""
    entry = np.dtype([("key_len", "<u4"), ("key", "S8"), ("flags", "u1"), ("code", "u1"), ("ndim", "u1"),
                      ("nbytes", "<u8"), ("data", "u1")])
    count = (size - 4) // entry.itemsize
    entries = np.zeros(count, dtype=entry)
    entries["key_len"], entries["code"], entries["nbytes"] = 8, wire.DTYPE_TO_CODE[torch.uint8], 1
    entries["key"] = np.char.mod(b"%08d", np.arange(count)).astype("S8")
    return struct.pack("<I", wire.MAGIC) + entries.tobytes()


def test_a_64_mib_body_of_millions_of_entries_costs_a_small_multiple_of_its_size(limits_server):
    pid = limits_server.proc.pid
    body = scalar_entries_body(64 * 2**20 - 64)  # 2.8 million entries
    before = proc_memory_kib(pid)
    status, _, answer = post(limits_server.port, "generate", body)
    grown_mib = (proc_memory_kib(pid) - before) / 1024
    assert status == 400 and "one more than the 3 expected" in error_of(answer)
    assert grown_mib < 3 * 64, f"the server grew by {grown_mib:.0f} MiB for a 64 MiB body"


# ---------------------------------------------------------------- 4. a bounded queue (503 + Retry-After)


def test_a_full_queue_is_503_with_retry_after_and_the_client_retries_through_it(limits_server, expected):
    stalled = []
    for _ in range(2):  # two /generate bodies that never arrive hold both places until the body timeout
        sock = connect(limits_server.port)
        sock.sendall(head("POST", "/generate", 1000, token=TOKEN))
        stalled.append(sock)
    time.sleep(0.3)
    with connect(limits_server.port) as third:
        third.sendall(head("POST", "/generate", 1000, token=TOKEN) + b"x" * 1000)
        (status, headers, body), = parse_responses(read_until_closed(third, limit_s=2))
    assert status == 503 and headers["retry-after"] == "1" and "--max-queued-requests 2" in error_of(body)
    mapping, cases = expected
    with RemoteEagle3TargetModel(limits_server.url, token=TOKEN, client_id="patient", enable_nccl=False,
                                 retry=RetryPolicy(max_retries=10, backoff_s=0.2, max_backoff_s=2.0)) as client:
        client.set_vocab_mapping(*mapping)
        started = time.monotonic()
        assert_same_supervision(client.supervise(*cases[0][0]), cases[0][1])  # 503 first, then served
        waited = time.monotonic() - started
    for sock in stalled:
        assert parse_responses(read_until_closed(sock, limit_s=10))[0][0] == 408
        sock.close()
    assert waited >= 1.0  # it honoured Retry-After at least once
    assert "client=patient status=503" in limits_server.log_tail(300_000)


# ---------------------------------------------------------------- 3. connections, header deadline, framing


def test_a_flood_of_silent_connections_is_capped_and_a_connected_client_keeps_being_served(http_server, expected):
    pid = http_server.proc.pid
    with good_client_running(http_server.url, expected, token=TOKEN):
        threads_before = proc_threads(pid)
        flood = []
        for _ in range(600):
            try:
                flood.append(socket.create_connection(("127.0.0.1", http_server.port), timeout=5))
            except OSError:  # the kernel's backlog is full: refused at the door, which is fine too
                break
        time.sleep(0.5)
        threads_during = proc_threads(pid)
        time.sleep(HEADER_TIMEOUT_S + 2)  # the silent ones that got a thread are dropped at the header deadline
        refused = dropped = still_open = 0
        for sock in flood:
            sock.settimeout(0.05)
            data = b""
            try:
                while chunk := sock.recv(4096):  # a 503 and the end of the stream, or only the end
                    data += chunk
            except TimeoutError:
                still_open += 1
            except OSError:
                pass
            refused += data.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in data
            dropped += data == b""
            sock.close()
    assert threads_during <= threads_before + MAX_CONNECTIONS + 2
    assert still_open == 0 and refused + dropped == len(flood)
    assert refused >= len(flood) // 2
    status, _, _ = post(http_server.port, "heartbeat", b"{}")  # a new client is served again
    assert status == 200


def test_out_of_file_descriptors_the_server_backs_off_instead_of_spinning(http_server):
    pid = http_server.proc.pid
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    in_use = len(os.listdir(f"/proc/{pid}/fd"))
    held = []
    try:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (in_use + 4, hard))
        for _ in range(12):  # more than the server can accept: accept() fails with EMFILE
            sock = connect(http_server.port)
            sock.sendall(head("GET", "/health"))
            held.append(sock)
        time.sleep(0.5)
        cpu = proc_cpu_seconds(pid)
        time.sleep(2.0)
        spent = proc_cpu_seconds(pid) - cpu
    finally:
        for sock in held:
            sock.close()
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
    assert spent < 0.5, f"the server burnt {spent:.2f} s of CPU in 2 s while out of file descriptors"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if post(http_server.port, "heartbeat", b"{}")[0] == 200:
                break
        except OSError:
            time.sleep(0.2)
    else:
        raise AssertionError("the server did not serve again once file descriptors were free")


def test_headers_trickled_a_byte_at_a_time_get_408_at_the_header_deadline(http_server):
    request = head("POST", "/heartbeat", 2, token=TOKEN)
    with connect(http_server.port) as sock:
        started, answer = time.monotonic(), b""
        for byte in request:  # a byte every 0.2 s: never silent long enough for the idle timeout (30 s)
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            sock.settimeout(0.2)
            try:
                answer += sock.recv(65536)
            except TimeoutError:
                pass
            if answer:
                break
        elapsed = time.monotonic() - started
        answer += read_until_closed(sock, limit_s=5)
    (status, _, body), = parse_responses(answer)
    assert status == 408 and "headers not received within" in error_of(body)
    assert HEADER_TIMEOUT_S - 0.3 <= elapsed < HEADER_TIMEOUT_S + 2


def test_a_chunked_body_is_411_and_its_chunk_is_never_parsed_as_a_request(http_server):
    smuggled = head("GET", "/health")
    chunked = f"{len(smuggled):x}\r\n".encode() + smuggled + b"\r\n0\r\n\r\n"
    with connect(http_server.port) as sock:
        sock.sendall(head("POST", "/heartbeat", token=TOKEN, extra="Transfer-Encoding: chunked\r\n") + chunked)
        replies = parse_responses(read_until_closed(sock))
    assert [status for status, _, _ in replies] == [411]
    assert replies[0][1]["connection"] == "close"


def test_every_refused_request_closes_its_connection(http_server):
    """A 404 followed by a pipelined good request: the second is never read, the connection is closed."""
    with connect(http_server.port) as sock:
        sock.sendall(head("POST", "/nope", 2, token=TOKEN) + b"{}" + head("POST", "/heartbeat", 2, token=TOKEN) + b"{}")
        replies = parse_responses(read_until_closed(sock))
    assert [status for status, _, _ in replies] == [404]


# ---------------------------------------------------------------- 4. fairness


def test_a_client_flooding_big_batches_makes_a_small_client_wait_for_one_forward_at_most(http_server, expected):
    mapping, cases = expected
    big = (torch.randint(0, 320, (16, 512)), torch.ones(16, 512, dtype=torch.long),
           torch.ones(16, 512, dtype=torch.long))
    flooder = RemoteEagle3TargetModel(http_server.url, token=TOKEN, client_id="flooder", enable_nccl=False,
                                      timeout_s=120)
    small = RemoteEagle3TargetModel(http_server.url, token=TOKEN, client_id="small", enable_nccl=False, timeout_s=120)
    flooder.set_vocab_mapping(*mapping)
    small.set_vocab_mapping(*mapping)
    done_at: list[float] = []
    stop = threading.Event()

    def flood():
        while not stop.is_set():
            flooder.supervise(*big)
            done_at.append(time.monotonic())

    threads = [threading.Thread(target=flood, daemon=True) for _ in range(FLOODERS)]  # that many always queued
    try:
        for thread in threads:
            thread.start()
        while len(done_at) < FLOODERS:
            time.sleep(0.01)
        overtaken = []
        for batch, _ in cases:
            sent = time.monotonic()
            small.supervise(*batch)
            answered = time.monotonic()
            overtaken.append(sum(sent < t < answered for t in done_at))
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
        flooder.close()
        small.close()
    # Round-robin: the forward running when the small request arrives, then the small one's turn; answers
    # already on their way over the socket add one or two. A plain lock let nine or ten pass (measured).
    assert max(overtaken) <= 3, overtaken


# ---------------------------------------------------------------- 5. sessions


def test_two_clients_sharing_an_id_each_get_supervision_over_their_own_vocabulary(http_server, reference):
    first_mapping, second_mapping = tiny_vocab_mapping(seed=1), tiny_vocab_mapping(draft_size=120, seed=2)
    batch = tiny_batch(seed=5)
    first = RemoteEagle3TargetModel(http_server.url, token=TOKEN, client_id="twin", enable_nccl=False)
    second = RemoteEagle3TargetModel(http_server.url, token=TOKEN, client_id="twin", enable_nccl=False)
    try:
        first.set_vocab_mapping(*first_mapping)
        second.set_vocab_mapping(*second_mapping)  # the same session: once, this silently replaced the first's
        for _ in range(2):
            assert_same_supervision(first.supervise(*batch), compute_supervision(reference, *first_mapping, *batch))
            assert_same_supervision(second.supervise(*batch), compute_supervision(reference, *second_mapping, *batch))
    finally:
        first.close()
        second.close()


def test_one_anonymous_clients_disconnect_leaves_another_anonymous_client_working(http_server):
    """Clients of the original design send no id: they share the anonymous session."""
    vocab = wire.encode_to_bytes(dict(zip(protocol.VOCAB_MAPPING_KEYS, tiny_vocab_mapping())))
    auth = {"Authorization": f"Bearer {TOKEN}"}
    first = http.client.HTTPConnection("127.0.0.1", http_server.port, timeout=30)
    second = http.client.HTTPConnection("127.0.0.1", http_server.port, timeout=30)
    try:
        for conn in (first, second):
            conn.request("POST", "/set_vocab_mapping", body=vocab, headers=auth)
            assert json.loads(conn.getresponse().read()) == {"status": "ok"}
        first.request("POST", "/disconnect", body=b"{}", headers=auth)
        assert first.getresponse().status == 200
        second.request("POST", "/generate", body=generate_body(tiny_batch()[0]), headers=auth)
        response = second.getresponse()
        assert response.status == 200, response.read()
        assert set(wire.decode(bytearray(response.read()))) == set(protocol.SUPERVISION_KEYS)
    finally:
        first.close()
        second.close()


def test_sessions_are_bounded_and_idle_ones_evicted(http_server):
    for index in range(60):
        status, _, _ = post(http_server.port, "heartbeat", b"{}", {"X-Tandem-Client": f"passerby-{index}"})
        assert status == 200
    time.sleep(1.5)  # past --session-idle-timeout 1
    post(http_server.port, "heartbeat", b"{}", {"X-Tandem-Client": "latecomer"})
    log = http_server.log_tail(2_000_000)
    counts = [int(line.rsplit("(", 1)[1].split()[0]) for line in log.splitlines() if "sessions)" in line]
    assert counts and max(counts) <= MAX_SESSIONS
    assert "session evicted (idle)" in log


@pytest.mark.parametrize("client_id", ["abc\r\n forged INFO everything is fine", "x" * 200, "\x1b[31mred", "a b"])
def test_a_malformed_client_id_is_400_and_never_reaches_the_log(http_server, client_id):
    extra = f"X-Tandem-Client: {client_id}\r\n"
    with connect(http_server.port) as sock:
        sock.sendall(head("POST", "/heartbeat", 2, token=TOKEN, extra=extra) + b"{}")
        replies = parse_responses(read_until_closed(sock))
    assert replies[0][0] == 400 and replies[0][1]["connection"] == "close"
    log = http_server.log_tail(2_000_000)
    assert not any(line.lstrip().startswith("forged") for line in log.splitlines())
    assert "\x1b[31m" not in log and "x" * 200 not in log
