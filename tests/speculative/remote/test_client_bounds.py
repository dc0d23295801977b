"""The training client against a hostile or broken server (issue 14, item 9).

A real HTTP server on 127.0.0.1 that answers ``/generate`` with lies: a ``Content-Length`` of gigabytes,
an endless chunked body, tensors of the wrong shape or dtype, a ``/model_info`` claiming absurd sizes. The
client must refuse each with an error that names the server, before reading or allocating what it was
not asked for; its memory is read from ``/proc`` of a client subprocess.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading

import pytest
import torch

from tandem.speculative.remote import protocol, wire
from tandem.speculative.remote.answer_checks import AnswerError, check_metadata, supervision_specs
from tandem.speculative.remote.client import RemoteEagle3TargetModel
from tandem.speculative.remote.http_client import RemoteTargetError, RetryPolicy
from tests.conftest import REPO_ROOT
from tests.speculative.remote.remote_utils import tiny_batch, tiny_vocab_mapping

pytestmark = pytest.mark.timeout(120)

REPO = str(REPO_ROOT)
INFO = {"num_hidden_layers": 4, "hidden_size": 64, "vocab_size": 320, "aux_layer_ids": [1, 1, 0], "dtype": "float32"}


def supervision(batch: int = 2, seq: int = 16, draft_vocab: int = 200, **overrides) -> dict:
    """A well-formed full answer for a ``[batch, seq]`` request, with ``overrides`` replacing tensors."""
    answer = {
        "aux_hidden_states": torch.zeros(batch, seq, 3 * 64),
        "target_probs": torch.full((batch, seq, draft_vocab), 1.0 / draft_vocab),
        "position_mask": torch.ones(batch, seq, 1, dtype=torch.bool),
        "input_ids": torch.zeros(batch, seq, dtype=torch.long),
        "loss_mask": torch.ones(batch, seq, dtype=torch.long),
    }
    answer.update(overrides)
    return answer


class HostileServer:
    """A one-thread-per-connection HTTP server whose ``/generate`` answer is ``generate(sock)``."""

    def __init__(self, generate, info: dict = INFO):
        self.generate, self.info = generate, info
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket):
        with conn, conn.makefile("rb") as reader:
            try:
                while True:
                    request_line = reader.readline()
                    if not request_line:
                        return
                    length = 0
                    while (line := reader.readline()) not in (b"\r\n", b""):
                        name, _, value = line.decode("latin-1").partition(":")
                        length = int(value) if name.lower() == "content-length" else length
                    reader.read(length)
                    path = request_line.split()[1].decode()
                    if path == "/generate":
                        self.generate(conn)
                    else:
                        body = json.dumps(self.info if path == "/model_info" else {"status": "ok"}).encode()
                        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                                     + str(len(body)).encode() + b"\r\n\r\n" + body)
            except OSError:
                return

    def close(self):
        self.listener.close()


def answer_with(tensors: dict):
    body = wire.encode_to_bytes(tensors)

    def generate(conn):
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    return generate


def endless(head: bytes, chunk: bytes):
    """An answer that starts with ``head`` and then sends ``chunk`` until the client hangs up (or 20 s)."""
    def generate(conn):
        conn.sendall(head)
        conn.settimeout(20)
        for _ in range(200_000):
            conn.sendall(chunk)
    return generate


CLIENT = """
import json, os, sys, time
from tandem.speculative.remote.client import RemoteEagle3TargetModel, RemoteTargetError, RetryPolicy
from tests.speculative.remote.http_utils import proc_memory_kib
from tests.speculative.remote.remote_utils import tiny_batch, tiny_vocab_mapping

client = RemoteEagle3TargetModel(sys.argv[1], enable_nccl=False, retry=RetryPolicy(max_retries=0), timeout_s=30)
client.set_vocab_mapping(*tiny_vocab_mapping())
batch = tiny_batch()
before, started = proc_memory_kib(os.getpid()), time.monotonic()
try:
    client.generate_batch(*batch)
    error = None
except RemoteTargetError as exc:
    error = str(exc)
print(json.dumps({"error": error, "grown_kib": proc_memory_kib(os.getpid()) - before,
                  "elapsed_s": time.monotonic() - started}))
"""


def run_client(url: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CLIENT, url], cwd=REPO, env={**os.environ, "PYTHONPATH": REPO},
                         capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name, generate, fragment", [
    ("a 3 GiB Content-Length", endless(b"HTTP/1.1 200 OK\r\nContent-Length: 3221225472\r\n\r\n", b"\0" * (1 << 20)),
     "Content-Length 3221225472 exceeds"),
    ("an endless chunked body", endless(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                                        b"100000\r\n" + b"\0" * (1 << 20) + b"\r\n"), "the answer runs past"),
])
def test_an_answer_larger_than_asked_for_is_refused_without_reading_it(name, generate, fragment):
    server = HostileServer(generate)
    try:
        result = run_client(server.url)
    finally:
        server.close()
    assert result["error"] is not None and server.url in result["error"] and fragment in result["error"], result
    assert result["grown_kib"] < 64 * 1024, f"{name}: the client grew by {result['grown_kib'] / 1024:.0f} MiB"


@pytest.mark.parametrize("override, fragment", [
    ({"target_probs": torch.zeros(2, 16, 201)}, "'target_probs' has shape [2, 16, 201], expected [2, 16, 200]"),
    ({"aux_hidden_states": torch.zeros(2, 16, 3 * 64, dtype=torch.float64)},
     "'aux_hidden_states' has dtype torch.float64"),
    ({"input_ids": torch.zeros(2, 17, dtype=torch.long)}, "'input_ids' has shape [2, 17]"),
    ({"position_mask": torch.ones(2, 16, 1, dtype=torch.uint8)}, "'position_mask' has dtype torch.uint8"),
    ({"extra": torch.zeros(1)}, "one more than the 5 expected"),
])
def test_returned_tensors_of_the_wrong_shape_or_dtype_are_refused_naming_the_server(override, fragment):
    server = HostileServer(answer_with(supervision(**override)))
    try:
        with RemoteEagle3TargetModel(server.url, enable_nccl=False, retry=RetryPolicy(max_retries=0)) as client:
            client.set_vocab_mapping(*tiny_vocab_mapping())
            with pytest.raises(RemoteTargetError) as info:
                client.generate_batch(*tiny_batch())
    finally:
        server.close()
    assert server.url in str(info.value) and fragment in str(info.value)


def test_a_well_formed_answer_from_the_same_server_is_accepted():
    """The hostile server's plumbing is sound: the same answer, of the right shapes, goes through."""
    server = HostileServer(answer_with(supervision()))
    try:
        with RemoteEagle3TargetModel(server.url, enable_nccl=False, retry=RetryPolicy(max_retries=0)) as client:
            client.set_vocab_mapping(*tiny_vocab_mapping())
            got = client.generate_batch(*tiny_batch())
    finally:
        server.close()
    assert got["target_probs"].shape == (2, 16, 200)


def test_a_model_info_claiming_absurd_sizes_is_refused():
    server = HostileServer(answer_with(supervision()), info={**INFO, "hidden_size": 2**40})
    try:
        with RemoteEagle3TargetModel(server.url, enable_nccl=False, retry=RetryPolicy(max_retries=0)) as client:
            with pytest.raises(RemoteTargetError, match="hidden_size must be an integer in"):
                client.model_info()
    finally:
        server.close()


def test_data_plane_metadata_announcing_more_than_asked_is_refused_before_allocating():
    specs = supervision_specs(2, 16, 64, 200, frozenset({torch.float32}), compact_answer=False)
    metadata = {key: {"dtype_code": wire.DTYPE_TO_CODE[next(iter(spec.dtypes))], "shape": list(spec.shape)}
                for key, spec in specs.items()}
    check_metadata(list(specs), metadata, specs)  # the honest description passes
    metadata["target_probs"] = {"dtype_code": 0, "shape": [2**20, 2**20, 2**10]}
    with pytest.raises(AnswerError, match="'target_probs' has shape"):
        check_metadata(list(specs), metadata, specs)
    with pytest.raises(AnswerError, match="announces"):
        check_metadata(list(reversed(specs)), metadata, specs)
    assert protocol.SUPERVISION_KEYS == list(specs)
