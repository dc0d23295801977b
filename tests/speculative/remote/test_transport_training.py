"""The process-group data plane end to end: a real ``tandem serve-target`` and real clients on loopback,
the group on gloo. Training over the group equals in-process training bit for bit; the environment turns
it off; a taken port, a server killed mid-transfer and a client killed mid-transfer all end on the wire
format (or a fresh group for the next client) within the group timeout, with no batch lost."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tandem.speculative.remote.client import RemoteEagle3TargetModel
from tandem.speculative.remote.http_client import RetryPolicy
from tandem.speculative.remote.launch import TargetServerProcess
from tandem.speculative.remote.transport import NCCLTransport
from tandem.speculative.target.supervision import compute_supervision
from tandem.speculative.training.target_factory import build_target
from tandem.speculative.training.trainer import train
from tests.conftest import REPO_ROOT, build_tiny_tokenizer
from tests.speculative.remote.remote_utils import (
    assert_same_supervision,
    load_tiny_target,
    save_tiny_target,
    start_tiny_server,
    tiny_batch,
    tiny_vocab_mapping,
)
from tests.speculative.remote.test_remote_training import STEPS, assert_same_run, run_config, write_chat_data

pytestmark = pytest.mark.timeout(180)

GROUP_TIMEOUT_S = 5
REPO = REPO_ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("transport_remote")
    write_chat_data(root / "data.jsonl")
    return root


@pytest.fixture(scope="module")
def target_dir(root) -> Path:
    return save_tiny_target(root / "target")


@pytest.fixture(scope="module")
def server(root, target_dir):
    process = start_tiny_server(target_dir, root / "serve.log", nccl_timeout_s=GROUP_TIMEOUT_S)
    yield process
    process.stop()


@pytest.fixture(scope="module")
def expected(target_dir):
    """The in-process supervision of ``tiny_batch(seed=i)`` for i in 0..3."""
    reference, mapping = load_tiny_target(target_dir), tiny_vocab_mapping()
    return [compute_supervision(reference, *mapping, *tiny_batch(seed=i)) for i in range(4)]


def client_for(url: str, **kwargs) -> RemoteEagle3TargetModel:
    client = RemoteEagle3TargetModel(url, nccl_timeout_s=GROUP_TIMEOUT_S, **kwargs)
    client.set_vocab_mapping(*tiny_vocab_mapping())
    return client


def check_batches(client: RemoteEagle3TargetModel, expected, count: int = 2) -> None:
    for i in range(count):
        got = client.generate_batch(*tiny_batch(seed=i))
        assert_same_supervision(got, {k: expected[i][k] for k in got})


def test_remote_training_over_the_group_is_bit_identical_to_in_process(root, target_dir, server):
    reference = train(run_config(root, "in_process", target_dir), tokenizer=build_tiny_tokenizer(),
                      target_factory=build_target)
    client = RemoteEagle3TargetModel(server.url, prefetch_depth=2, nccl_timeout_s=GROUP_TIMEOUT_S)
    trainer = train(run_config(root, "over_group", target_dir), target=client, tokenizer=build_tiny_tokenizer())
    assert trainer.step == STEPS
    assert_same_run(root / "over_group", Path(reference.output_dir))
    counts = client.transfer_counts
    assert counts["group"] >= STEPS and counts["http"] == 0 and counts["group_failures"] == 0, counts
    client.close()
    log = server.log_tail(200_000)
    assert f"client {client.client_id}: data plane up (gloo group" in log
    assert f"client {client.client_id}: data plane torn down (client disconnected)" in log


def test_disabled_by_environment_never_asks_for_the_group(server, expected, monkeypatch):
    monkeypatch.setenv("TANDEM_ENABLE_NCCL", "0")
    with client_for(server.url) as client:
        check_batches(client, expected)
        assert client.transfer_counts == {"group": 0, "http": 2, "group_failures": 0}
    assert f"/init_nccl client={client.client_id}" not in server.log_tail(200_000)


def test_taken_port_falls_back_to_the_wire_format_at_once(server, expected, monkeypatch):
    with socket.socket() as squatter:
        squatter.bind(("0.0.0.0", 0))
        squatter.listen()
        monkeypatch.setenv("TANDEM_NCCL_PORT", str(squatter.getsockname()[1]))
        started = time.monotonic()
        with client_for(server.url) as client:
            check_batches(client, expected)
            assert client.transfer_counts == {"group": 0, "http": 2, "group_failures": 0}
            assert time.monotonic() - started < GROUP_TIMEOUT_S  # a bind error, no wait for the timeout
    assert "not established" in server.log_tail(200_000)


def test_two_jobs_proposing_the_same_port_each_get_a_group(server, expected, monkeypatch):
    # Two independent trainers (each RANK 0) on one server propose the same data-plane port: the server
    # refuses the second at once with "port_in_use", and the second proposes the port 1000 above.
    from tandem.speculative.remote.transport import PORT_RETRY_STRIDE as _PORT_RETRY_STRIDE

    while True:
        base = free_port()
        try:
            with socket.socket() as probe:
                probe.bind(("0.0.0.0", base + _PORT_RETRY_STRIDE))
            break
        except OSError:
            continue
    monkeypatch.setenv("TANDEM_NCCL_PORT", str(base))
    with client_for(server.url) as first, client_for(server.url) as second:
        check_batches(first, expected, count=1)
        check_batches(second, expected)
        check_batches(first, expected)
        assert first.transfer_counts == {"group": 3, "http": 0, "group_failures": 0}
        assert second.transfer_counts == {"group": 2, "http": 0, "group_failures": 0}
    log = server.log_tail(200_000)
    assert f"client {second.client_id} proposed data-plane port {base}, which client {first.client_id} holds" in log
    assert f"client {second.client_id}: data plane up (gloo group on port {base + _PORT_RETRY_STRIDE})" in log


# A server whose sends wait: the test kills it after the metadata went out and before the tensors did.
SLOW_SEND_SERVER = """
import sys, time, logging
from pathlib import Path
from tandem.speculative.remote.server import TargetModelServer, serve
from tandem.speculative.remote.serving.cli import READY_LINE
from tests.speculative.remote.remote_utils import load_tiny_target

class SlowSend(TargetModelServer):
    def flush_nccl_send(self):
        if getattr(self._pending, "send", None) is not None:
            time.sleep(60)
        super().flush_nccl_send()

logging.basicConfig(level=logging.INFO, stream=sys.stderr)
logic = SlowSend(load_tiny_target(Path(sys.argv[1])), nccl_port=0, enable_nccl=True, nccl_timeout_s=float(sys.argv[2]),
                 nccl_port_range=(1024, 65535))
serve(logic, "127.0.0.1", 0, on_ready=lambda h, p: print(READY_LINE.format(host=h, port=p), flush=True))
"""


def start_slow_send_server(target_dir: Path, log_path: Path,
                           group_timeout_s: float = GROUP_TIMEOUT_S) -> TargetServerProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", SLOW_SEND_SERVER, str(target_dir), str(group_timeout_s)],
            stdout=subprocess.PIPE, stderr=log, text=True, bufsize=1, env=env, cwd=REPO,
        )
    return TargetServerProcess(proc, log_path, 90)


def test_server_killed_mid_transfer_client_falls_back_and_the_run_resumes(root, target_dir, expected, monkeypatch):
    # The group must come up for this test to mean anything: a port nobody holds, and a rendezvous timeout a
    # loaded CI machine cannot miss (a kill is seen at once, by the closed socket, not by the timeout).
    monkeypatch.setenv("TANDEM_NCCL_PORT", str(free_port()))
    setup_timeout_s = 60
    slow = start_slow_send_server(target_dir, root / "slow.log", group_timeout_s=setup_timeout_s)
    holder = {"process": slow}
    restarted = threading.Event()

    def restart():
        holder["process"] = start_tiny_server(target_dir, root / "restarted.log", port=slow.port,
                                              nccl_timeout_s=GROUP_TIMEOUT_S)
        restarted.set()

    original_recv = NCCLTransport.recv_tensors
    kills = []

    def kill_then_receive(self, metadata, keys_order):
        if not kills:  # the metadata is here, the tensors are not: the server dies now
            kills.append(time.monotonic())
            slow.kill()
            threading.Thread(target=restart, daemon=True).start()
        return original_recv(self, metadata, keys_order)

    monkeypatch.setattr(NCCLTransport, "recv_tensors", kill_then_receive)
    client = RemoteEagle3TargetModel(
        slow.url, nccl_timeout_s=setup_timeout_s, retry=RetryPolicy(max_retries=60, backoff_s=0.1, max_backoff_s=1.0)
    )
    client.set_vocab_mapping(*tiny_vocab_mapping())
    try:
        check_batches(client, expected, count=4)  # the first is the one in flight when the server died
        assert kills and restarted.is_set(), f"the group never carried a batch; server log:\n{slow.log_tail(20_000)}"
        assert client.transfer_counts == {"group": 0, "http": 4, "group_failures": 1}
        assert "/init_nccl" not in holder["process"].log_tail()  # once lost, the group is not asked for again
    finally:
        client.close()
        holder["process"].stop()


# A client that dies right after the metadata arrives, before it receives: the server is sending to nobody.
DYING_CLIENT = """
import os, sys
from tandem.speculative.remote import transport
from tandem.speculative.remote.client import RemoteEagle3TargetModel
from tests.speculative.remote.remote_utils import tiny_batch, tiny_vocab_mapping

transport.NCCLTransport.recv_tensors = lambda self, metadata, keys_order: os._exit(17)
client = RemoteEagle3TargetModel(sys.argv[1], nccl_timeout_s=float(sys.argv[2]), client_id="doomed")
client.set_vocab_mapping(*tiny_vocab_mapping())
client.generate_batch(*tiny_batch())
"""


def test_client_killed_mid_transfer_server_tears_down_and_serves_the_next_client(server, expected, monkeypatch):
    port = free_port()
    monkeypatch.setenv("TANDEM_NCCL_PORT", str(port))
    doomed = subprocess.run(
        [sys.executable, "-c", DYING_CLIENT, server.url, str(GROUP_TIMEOUT_S)],
        env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert doomed.returncode == 17, doomed.stderr[-3000:]
    # The next client asks for the very same port and gets a working group on it.
    with client_for(server.url) as client:
        check_batches(client, expected)
        assert client.transfer_counts == {"group": 2, "http": 0, "group_failures": 0}
    log = server.log_tail(200_000)
    # Either the send to the dead client failed, or (if its bytes fit in the socket buffers) the server
    # learned of the death when the next client claimed the port; both free the port at once.
    assert "client doomed: data plane torn down (send failed" in log or "client doomed left without a word" in log
    assert server.proc.poll() is None


def test_server_sigterm_with_a_live_group_exits_cleanly(root, target_dir, expected):
    process = start_tiny_server(target_dir, root / "sigterm.log", nccl_timeout_s=GROUP_TIMEOUT_S)
    client = client_for(process.url)
    check_batches(client, expected, count=1)
    assert client.transfer_counts["group"] == 1
    process.proc.send_signal(signal.SIGTERM)
    assert process.proc.wait(30) == 0  # tearing the group down never waits for the idle client
    assert "data plane torn down (server shutting down)" in process.log_tail()
    client.close()
