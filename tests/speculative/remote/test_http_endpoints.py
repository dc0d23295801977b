"""The remote target over real HTTP: every bad request gets its status and the server keeps serving;
auth, concurrent clients, a client vanishing mid-response, prefetch bounds, retries."""

from __future__ import annotations

import http.client
import json
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from tandem.speculative.remote import protocol, wire
from tandem.speculative.remote.client import RemoteEagle3TargetModel
from tandem.speculative.remote.http_client import RemoteTargetError, RetryPolicy
from tandem.speculative.target.supervision import compute_supervision
from tests.speculative.remote.remote_utils import (
    assert_same_supervision,
    load_tiny_target,
    save_tiny_target,
    start_tiny_server,
    tiny_batch,
    tiny_vocab_mapping,
)
from tests.speculative.remote.test_wire import MALFORMED

pytestmark = pytest.mark.timeout(120)

TOKEN = "test-token"
# The in-process reference captures aux hidden states in shared hooks: one forward at a time.
REFERENCE_LOCK = threading.Lock()


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    return save_tiny_target(tmp_path_factory.mktemp("http") / "target")


@pytest.fixture(scope="module")
def server(target_dir, tmp_path_factory):
    process = start_tiny_server(target_dir, tmp_path_factory.mktemp("http_log") / "serve.log", "--max-body-mb", "1",
                                token=TOKEN)
    yield process
    process.stop()


@pytest.fixture(scope="module")
def reference(target_dir):
    return load_tiny_target(target_dir)


def expected_supervision(reference, mapping, batch):
    with REFERENCE_LOCK:
        return compute_supervision(reference, *mapping, *batch)


def raw_request(port, method, path, body=b"", headers=None, token=TOKEN):
    """One request on a fresh connection; ``(status, parsed JSON or raw body)``."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    all_headers = {"Content-Length": str(len(body)), protocol.CLIENT_ID_HEADER: "raw-client"}
    if token:
        all_headers["Authorization"] = f"Bearer {token}"
    all_headers.update(headers or {})
    conn.putrequest(method, path, skip_accept_encoding=True)
    for name, value in all_headers.items():
        conn.putheader(name, value)
    conn.endheaders()
    if body:
        conn.send(body)
    response = conn.getresponse()
    payload = response.read()
    conn.close()
    if response.getheader("Content-Type") == protocol.JSON_CONTENT_TYPE:
        payload = json.loads(payload)
    return response.status, payload


def assert_still_serving(server, reference):
    """The server answers a public probe and a full, correct /generate for a fresh client."""
    assert raw_request(server.port, "GET", "/health", token=None) == (200, {"status": "ok"})
    mapping = tiny_vocab_mapping()
    with RemoteEagle3TargetModel(server.url, token=TOKEN) as client:
        client.set_vocab_mapping(*mapping)
        assert_same_supervision(client.supervise(*tiny_batch()), expected_supervision(reference, mapping, tiny_batch()))


def test_remote_client_matches_the_in_process_target(server, reference):
    mapping = tiny_vocab_mapping()
    with RemoteEagle3TargetModel(server.url, token=TOKEN, prefetch_depth=3) as client:
        assert client.model_info() == reference.model_info()
        assert torch.equal(client.get_input_embeddings(), reference.get_input_embeddings())
        client.set_vocab_mapping(*mapping)
        futures = [client.generate_batch_async(*tiny_batch(seed=i)) for i in range(5)]
        for i, future in enumerate(futures):  # each future holds its own batch's answer, in order
            assert_same_supervision(future.result(), expected_supervision(reference, mapping, tiny_batch(seed=i)))


def test_prefetch_never_has_more_than_depth_requests_in_flight(server, reference):
    mapping = tiny_vocab_mapping()
    client = RemoteEagle3TargetModel(server.url, token=TOKEN, prefetch_depth=2)
    client.set_vocab_mapping(*mapping)
    in_flight, peak, lock = [0], [0], threading.Lock()
    original = client._generate_on

    def slow_generate(*args):
        with lock:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
        time.sleep(0.1)
        try:
            return original(*args)
        finally:
            with lock:
                in_flight[0] -= 1

    client._generate_on = slow_generate
    batches = [tiny_batch(seed=i) for i in range(6)]
    results = list(client.prefetch(batches))
    futures = [client.generate_batch_async(*b) for b in batches]  # submitting faster than they finish
    assert peak[0] == 2
    for batch, result, future in zip(batches, results, futures):
        want = expected_supervision(reference, mapping, batch)
        assert_same_supervision(result, want)
        assert_same_supervision(future.result(), want)
    client.close()


def _generate_body() -> bytes:
    input_ids, attention_mask, loss_mask = tiny_batch()
    return wire.encode_to_bytes({"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask})


HTTP_CASES = {
    # DESIGN 3.4: status codes with a JSON error naming the problem.
    "unknown endpoint": ("POST", "/nope", b"", {}, TOKEN, 404, "unknown endpoint"),
    "wrong method": ("GET", "/generate", b"", {}, TOKEN, 405, "takes POST"),
    "missing token": ("POST", "/model_info", b"", {}, None, 401, "missing Authorization"),
    "wrong token": ("POST", "/model_info", b"", {}, "nope", 401, "invalid bearer token"),
    "body over the limit": ("POST", "/generate", b"x" * 16, {"Content-Length": str(2 << 20)}, TOKEN, 413,
                            "exceeds the limit"),
    "bad content length": ("POST", "/generate", b"", {"Content-Length": "-5"}, TOKEN, 400, "Content-Length"),
    "chunked body": ("POST", "/generate", b"", {"Transfer-Encoding": "chunked"}, TOKEN, 411, "chunked"),
    "generate before set_vocab_mapping": ("POST", "/generate", _generate_body(), {}, TOKEN, 409, "set_vocab_mapping"),
    "init_nccl with bad JSON": ("POST", "/init_nccl", b"{oops", {}, TOKEN, 400, "JSON"),
    "generate missing a tensor": (
        "POST", "/generate", wire.encode_to_bytes({"input_ids": torch.zeros(1, 4, dtype=torch.long)}), {}, TOKEN, 400,
        "missing",
    ),
    # DESIGN 3.2: every malformed wire body, as a /generate request.
    **{f"wire: {name}": ("POST", "/generate", body, {}, TOKEN, 400, fragment)
       for name, (body, fragment) in MALFORMED.items()},
}


@pytest.mark.parametrize("name", sorted(HTTP_CASES))
def test_bad_request_gets_its_status_and_json_error_and_the_server_keeps_serving(server, reference, name):
    method, path, body, headers, token, status, fragment = HTTP_CASES[name]
    got_status, payload = raw_request(server.port, method, path, body, headers, token)
    assert got_status == status
    assert payload["status"] == status and fragment in payload["error"]
    assert raw_request(server.port, "GET", "/health", token=None) == (200, {"status": "ok"})


def test_malformed_http_gets_json_400_and_the_server_keeps_serving(server, reference):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"THIS IS NOT HTTP\r\n\r\n")
        reply = b""
        while chunk := sock.recv(65536):  # the server closes the connection after the error
            reply += chunk
    assert reply.startswith(b"HTTP/1.") and b" 400 " in reply.split(b"\r\n")[0]
    assert b'"error"' in reply
    assert_still_serving(server, reference)


def test_init_nccl_answers_disabled(server):
    body = protocol.encode_json({"nccl_port": 1})
    assert raw_request(server.port, "POST", "/init_nccl", body) == (200, {"status": "disabled"})


def test_two_clients_with_different_vocabularies_at_once(server, reference):
    mappings = [tiny_vocab_mapping(200, seed=0), tiny_vocab_mapping(60, seed=1)]
    errors: list[BaseException] = []

    def run(mapping, seed):
        try:
            with RemoteEagle3TargetModel(server.url, token=TOKEN) as client:
                client.set_vocab_mapping(*mapping)
                for i in range(6):
                    batch = tiny_batch(seed=seed + i)
                    assert_same_supervision(client.supervise(*batch), expected_supervision(reference, mapping, batch))
        except BaseException as exc:  # surfaced to the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(m, 10 * k)) for k, m in enumerate(mappings)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    assert all(not t.is_alive() for t in threads)


def test_a_client_vanishing_mid_response_disturbs_nobody(server, reference):
    mapping = tiny_vocab_mapping()
    big = tiny_batch(batch=16, seq=256, seed=3)
    body = wire.encode_to_bytes(dict(zip(("input_ids", "attention_mask", "loss_mask"), big)))
    errors: list[BaseException] = []

    def vanishing_client():
        vocab = wire.encode_to_bytes(dict(zip(("selected_token_ids", "selected_token_mask"), mapping)))
        assert raw_request(server.port, "POST", "/set_vocab_mapping", vocab,
                           {protocol.CLIENT_ID_HEADER: "vanishing"})[0] == 200
        with socket.socket() as sock:
            # A tiny receive window: the server is still writing megabytes when the client resets.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", server.port))
            head = (f"POST /generate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                    f"{protocol.CLIENT_ID_HEADER}: vanishing\r\nContent-Length: {len(body)}\r\n\r\n")
            sock.sendall(head.encode() + body)
            assert sock.recv(1024).startswith(b"HTTP/1.1 200")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST on close

    def steady_client():
        try:
            with RemoteEagle3TargetModel(server.url, token=TOKEN) as client:
                client.set_vocab_mapping(*mapping)
                for i in range(8):
                    batch = tiny_batch(seed=100 + i)
                    assert_same_supervision(client.supervise(*batch), expected_supervision(reference, mapping, batch))
        except BaseException as exc:
            errors.append(exc)

    steady = threading.Thread(target=steady_client)
    steady.start()
    vanishing_client()
    steady.join(60)
    assert not errors, errors
    deadline = time.monotonic() + 10
    while "went away mid-response" not in server.log_tail(200_000) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "went away mid-response" in server.log_tail(200_000)
    assert_still_serving(server, reference)


def test_a_4xx_reaches_the_user_at_once_without_retries(server):
    started = time.monotonic()
    with pytest.raises(RemoteTargetError) as info:
        RemoteEagle3TargetModel(server.url, token="wrong", retry=RetryPolicy(backoff_s=5.0)).model_info()
    assert info.value.status == 401 and "invalid bearer token" in str(info.value) and server.url in str(info.value)
    assert time.monotonic() - started < 4.0  # one 5 s backoff would exceed this
    with RemoteEagle3TargetModel(server.url, token=TOKEN) as client, pytest.raises(RemoteTargetError) as info:
        client.supervise(*tiny_batch())
    assert info.value.status == 409 and "set_vocab_mapping" in str(info.value)


def test_an_unreachable_server_is_retried_then_named_in_the_error():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connections are refused
        client = RemoteEagle3TargetModel(f"http://127.0.0.1:{port}", retry=RetryPolicy(max_retries=3, backoff_s=0.01))
        with pytest.raises(RemoteTargetError, match=rf"127\.0\.0\.1:{port} /model_info: gave up after 4 attempts"):
            client.model_info()


def test_5xx_is_retried_with_backoff_until_the_server_recovers():
    answers = [503, 500, 200]
    seen = []

    class Flaky(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            status = answers[len(seen)]
            seen.append(status)
            body = json.dumps({"num_hidden_layers": 4, "hidden_size": 8, "vocab_size": 16, "aux_layer_ids": [0, 1, 2]}
                              if status == 200 else {"error": "overloaded", "status": status}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        client = RemoteEagle3TargetModel(f"http://127.0.0.1:{httpd.server_address[1]}",
                                         retry=RetryPolicy(backoff_s=0.01))
        assert client.model_info()["vocab_size"] == 16
        assert seen == [503, 500, 200]
        answers[:] = [503] * 10
        seen.clear()
        client._info = None
        client.retry.max_retries = 2
        with pytest.raises(RemoteTargetError, match="gave up after 3 attempts; last error: HTTP 503: overloaded"):
            client.model_info()
    finally:
        httpd.shutdown()
        httpd.server_close()
