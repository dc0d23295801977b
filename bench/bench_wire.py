"""Figure 1: wire format v1 encode and decode of a realistic ``/generate`` answer, against ``memcpy``.

    .venv/bin/python -m bench.bench_wire            # writes bench/results/bench_wire.json

The answer is the full supervision dict (``aux_hidden_states`` bf16, ``target_probs`` fp32, masks, ids) at
2048 tokens for SmolLM2-135M and Llama-3.1-8B shapes (Vd = 32000). Interleaved, per shape:

- ``memcpy``: one copy of the body's bytes between two preallocated, already-touched buffers -- the limit;
- ``encode``: ``wire.encode`` to a list of buffers; it must reference the tensors, so the table also
  counts the tensor bytes it copied (the target is 0);
- ``decode``: ``wire.decode`` of a received body, viewing the tensors in place;
- ``encode + copy + decode``: what a transfer costs outside the kernel: encode, gather the buffers into a
  preallocated receive buffer (the one copy a socket makes), decode. The target is 0.8x memcpy.

Ratio = memcpy median / figure median: 1.0 is memcpy speed, higher is faster.
"""

from __future__ import annotations

import torch

from bench import common
from tandem.speculative.remote import wire


def tensor_bytes_copied(tensors: dict[str, torch.Tensor], buffers: list) -> int:
    """Bytes of tensor data in ``buffers`` that do not sit in the tensors' own memory."""
    own = {t.data_ptr() for t in tensors.values() if t is not None and t.numel()}
    header_sized = 1 << 12  # headers are a few dozen bytes; anything bigger is tensor data
    return sum(memoryview(b).nbytes for b in buffers
               if memoryview(b).nbytes >= header_sized and common.buffer_address(b) not in own)


def gather(buffers: list, into: bytearray) -> None:
    """Copy ``buffers`` back to back into ``into`` (what the kernel does between send and receive)."""
    view, at = memoryview(into), 0
    for b in buffers:
        n = memoryview(b).nbytes
        view[at : at + n] = b
        at += n


def bench_shape(shape: common.SupervisionShape, runs: int, warmup: int) -> list[dict]:
    supervision = common.make_supervision(shape, "full")
    body = bytearray(wire.encode_to_bytes(supervision))
    size = len(body)
    source, target, received = common.fill(bytearray(size)), common.fill(bytearray(size)), common.fill(bytearray(size))
    copied = tensor_bytes_copied(supervision, wire.encode(supervision))

    def memcpy():
        memoryview(target)[:] = source

    def round_trip():
        gather(wire.encode(supervision), received)
        wire.decode(received)

    cases = {"memcpy": memcpy, "encode": lambda: wire.encode(supervision), "decode": lambda: wire.decode(body),
             "round_trip": round_trip}
    times = common.interleaved(cases, runs, warmup)
    limit = ("memcpy", times["memcpy"])
    extra = {"shape": shape.name, "tokens": shape.tokens}
    return [
        common.ratio_row("encode (buffer list)", times["encode"], *limit, size, tensor_bytes_copied=copied, **extra),
        common.ratio_row("decode (views in place)", times["decode"], *limit, size, target=0.8, **extra),
        common.ratio_row("encode + copy + decode", times["round_trip"], *limit, size, target=0.8, **extra),
    ]


COLUMNS = (
    ("shape", "shape", "s"), ("figure", "figure", "s"), ("MB", "bytes", ",.0f"), ("GB/s", "GB_per_s", ".2f"),
    ("memcpy GB/s", "limit_GB_per_s", ".2f"), ("ratio", "ratio", ".2f"), ("target", "target", ".1f"),
    ("meets", "meets_target", ""), ("tensor bytes copied", "tensor_bytes_copied", "d"),
)


def main(argv=None) -> list[dict]:
    columns = [(h, "MB" if k == "bytes" else k, f) for h, k, f in COLUMNS]
    return common.run_shape_bench("bench_wire", "wire v1 encode/decode vs memcpy", __doc__.split("\n")[0],
                                  bench_shape, argv, columns=columns)


if __name__ == "__main__":
    main()
