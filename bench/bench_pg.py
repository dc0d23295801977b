"""Figure 3: the gloo process-group data plane (``NCCLTransport``) against a raw TCP socket, same bytes.

    .venv/bin/python -m bench.bench_pg            # writes bench/results/bench_pg.json

A server process holds one realistic ``/generate`` answer (full encoding, 2048 tokens, SmolLM2-135M and
Llama-3.1-8B shapes) and serves it two ways on request, over one control socket:

- ``g``: ``NCCLTransport.send_tensors`` over the 2-rank gloo group, received by ``recv_tensors`` (which
  carves the tensors from its receive pool: the previous answer is dropped, so its buffer is reused with
  no page faults, as in a training client that lets go of each batch's supervision);
- ``r``: the limit, ``sendall`` of the same number of bytes on the control socket, read by ``recv_into``
  a preallocated buffer (reused: the floor; and new each time: what returning fresh memory costs).

Ratio = raw median / data-plane median (1.0 = the group costs nothing over the socket; the target is 0.8).
On a CUDA machine the same code runs NCCL only if both ranks hold CUDA tensors; this benchmark is CPU/gloo.
"""

from __future__ import annotations

import multiprocessing as mp
import socket

from bench import common
from bench.bench_http import _recv_exactly
from tandem.speculative.remote import protocol, wire


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(shape: common.SupervisionShape, pg_port: int, ready) -> None:
    import torch

    from tandem.speculative.remote.transport import NCCLTransport

    torch.set_num_threads(1)
    answer = common.make_supervision(shape, "full")
    keys = list(answer)
    payload = common.fill(bytearray(wire.body_size(wire.encode(answer))))
    with socket.create_server(("127.0.0.1", 0)) as listener:
        ready.put((listener.getsockname()[1], protocol.encode_nccl_metadata(answer, keys).decode()))
        conn, _ = listener.accept()
    transport = NCCLTransport(pg_port, "127.0.0.1", is_server=True, backend="gloo")
    if not transport.initialize(timeout_seconds=120):
        raise RuntimeError("data plane rendezvous failed on the server side")
    with conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while command := conn.recv(1):
            if command == b"r":
                conn.sendall(payload)
            else:
                transport.send_tensors(answer, keys)
    transport.destroy()


def bench_shape(shape: common.SupervisionShape, runs: int, warmup: int) -> list[dict]:
    from tandem.speculative.remote.transport import NCCLTransport

    ctx = mp.get_context("spawn")
    ready = ctx.Queue()
    pg_port = _free_port()
    server = ctx.Process(target=_serve, args=(shape, pg_port, ready), daemon=True)
    server.start()
    control_port, metadata_json = ready.get(timeout=120)
    keys, metadata = protocol.decode_nccl_metadata(metadata_json.encode())
    nbytes = wire.body_size(wire.encode(common.make_supervision(shape, "full")))
    tensor_bytes = sum(
        wire.dtype_from_code(m["dtype_code"]).itemsize * _numel(m["shape"]) for m in metadata.values() if m is not None
    )
    control = socket.create_connection(("127.0.0.1", control_port))
    control.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    transport = NCCLTransport(pg_port, "127.0.0.1", is_server=False, backend="gloo")
    if not transport.initialize(timeout_seconds=120):
        raise RuntimeError("data plane rendezvous failed on the client side")
    reused = common.fill(bytearray(nbytes))

    def raw_into(buffer: bytearray) -> None:
        control.sendall(b"r")
        _recv_exactly(control, buffer)

    def data_plane() -> None:
        control.sendall(b"g")
        transport.recv_tensors(metadata, keys)

    try:
        cases = {"raw_reused": lambda: raw_into(reused), "raw_fresh": lambda: raw_into(bytearray(nbytes)),
                 "pg": data_plane}
        times = common.interleaved(cases, runs, warmup)
    finally:
        control.close()
        transport.destroy()
        server.join(30)
    extra = {"shape": shape.name, "tokens": shape.tokens, "tensor_bytes": tensor_bytes}
    return [
        common.ratio_row("gloo data plane", times["pg"], "raw socket, reused buffer", times["raw_reused"], nbytes,
                         target=0.8, **extra),
        common.ratio_row("gloo data plane", times["pg"], "raw socket, new buffer", times["raw_fresh"], nbytes, **extra),
    ]


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def main(argv=None) -> list[dict]:
    return common.run_shape_bench("bench_pg", "gloo process-group data plane vs a raw TCP socket",
                                  __doc__.split("\n")[0], bench_shape, argv)


if __name__ == "__main__":
    main()
