"""Figure 2: a ``/generate`` answer over loopback HTTP against a raw TCP socket moving the same bytes.

    .venv/bin/python -m bench.bench_http            # writes bench/results/bench_http.json

Two server processes, each serving one answer of realistic shape (full encoding, 2048 tokens, SmolLM2-135M
and Llama-3.1-8B shapes; see ``bench.common``):

- the real HTTP server (``TargetModelServer`` + ``serve``) whose ``supervise`` returns a precomputed answer,
  so only transfer is timed; the client is the real ``RemoteEagle3TargetModel.generate_batch`` (request
  encode, HTTP, ``readinto`` one buffer, ``wire.decode``);
- the limit: a raw socket server that answers a one-byte request with ``sendall`` of the same number of
  bytes, read by ``recv_into`` a preallocated buffer -- reused across messages (the floor), and also a new
  buffer per message (what any API that hands the caller fresh memory pays in page faults).

Ratio = raw median / HTTP median (1.0 = HTTP costs nothing over the socket; the target is 0.8).
"""

from __future__ import annotations

import multiprocessing as mp
import socket
import struct

import torch

from bench import common
from tandem.speculative.remote import protocol, wire

_LEN = struct.Struct("<Q")


class _Target:
    """Just enough of an ``Eagle3TargetModel`` for ``TargetModelServer``'s constructor."""

    def __init__(self, shape: common.SupervisionShape):
        self.shape = shape
        self.dtype = shape.dtype  # /model_info says it; the client checks the answers' hidden states against it

    def model_info(self) -> dict:
        return {"num_hidden_layers": 32, "hidden_size": self.shape.hidden, "vocab_size": self.shape.vocab,
                "aux_layer_ids": [1, 15, 28]}


def _serve_http(shape: common.SupervisionShape, ready) -> None:
    from tandem.speculative.remote.server import TargetModelServer, _decode_tensors
    from tandem.speculative.remote.serving.http import serve

    answer = common.make_supervision(shape, "full")

    class CannedServer(TargetModelServer):
        def supervise(self, raw, client_id, *args, **kwargs):
            _decode_tensors(raw, protocol.REQUEST_KEYS, "generate")  # the request is parsed as for real
            return answer

    torch.set_num_threads(1)
    serve(CannedServer(_Target(shape), nccl_port=0), "127.0.0.1", 0, on_ready=lambda _host, port: ready.put(port))


def _serve_raw(nbytes: int, ready) -> None:
    payload = common.fill(bytearray(nbytes))
    with socket.create_server(("127.0.0.1", 0)) as listener:
        ready.put(listener.getsockname()[1])
        conn, _ = listener.accept()
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while conn.recv(1):
                conn.sendall(payload)


def _recv_exactly(sock: socket.socket, into: bytearray) -> None:
    view, got = memoryview(into), 0
    while got < len(into):
        n = sock.recv_into(view[got:])
        if not n:
            raise ConnectionError(f"raw server closed after {got} of {len(into)} bytes")
        got += n


def bench_shape(shape: common.SupervisionShape, runs: int, warmup: int) -> list[dict]:
    from tandem.speculative.remote.client import RemoteEagle3TargetModel

    nbytes = wire.body_size(wire.encode(common.make_supervision(shape, "full")))
    ctx = mp.get_context("spawn")
    ready = ctx.Queue()
    http_proc = ctx.Process(target=_serve_http, args=(shape, ready), daemon=True)
    raw_proc = ctx.Process(target=_serve_raw, args=(nbytes, ready), daemon=True)
    http_proc.start()
    http_port = ready.get(timeout=120)
    raw_proc.start()
    raw_port = ready.get(timeout=120)
    ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq))
    mask = torch.ones_like(ids)
    # The HTTP body path is the figure: no process-group data plane.
    client = RemoteEagle3TargetModel(f"http://127.0.0.1:{http_port}", prefetch_depth=1, enable_nccl=False)
    # The client checks every answer against the draft vocabulary it sent: send the canned answer's.
    in_draft = torch.zeros(shape.vocab, dtype=torch.bool)
    in_draft[: shape.draft_vocab] = True
    client.set_vocab_mapping(torch.arange(shape.draft_vocab), in_draft)
    raw = socket.create_connection(("127.0.0.1", raw_port))
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    reused = common.fill(bytearray(nbytes))

    def raw_into(buffer: bytearray) -> None:
        raw.sendall(b"x")
        _recv_exactly(raw, buffer)

    try:
        cases = {"raw_reused": lambda: raw_into(reused), "raw_fresh": lambda: raw_into(bytearray(nbytes)),
                 "http": lambda: client.generate_batch(ids, mask, mask)}
        times = common.interleaved(cases, runs, warmup)
    finally:
        raw.close()
        client.close()
        http_proc.terminate()
        raw_proc.join(10)
        http_proc.join(30)
    extra = {"shape": shape.name, "tokens": shape.tokens}
    return [
        common.ratio_row("HTTP /generate", times["http"], "raw socket, reused buffer", times["raw_reused"], nbytes,
                         target=0.8, **extra),
        common.ratio_row("HTTP /generate", times["http"], "raw socket, new buffer", times["raw_fresh"], nbytes,
                         **extra),
    ]


def main(argv=None) -> list[dict]:
    return common.run_shape_bench("bench_http", "/generate over loopback HTTP vs a raw TCP socket",
                                  __doc__.split("\n")[0], bench_shape, argv)


if __name__ == "__main__":
    main()
