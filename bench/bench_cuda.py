"""The GPU side of the data path: supervision on CUDA, staging to pinned host memory, wire encode from it.

    .venv/bin/python -m bench.bench_cuda            # on a CUDA machine; writes bench/results/bench_cuda.json

Without CUDA it prints a one-row table saying so and writes nothing. With CUDA, for Llama-3.1-8B and
SmolLM2-135M shapes at 2048 tokens (bf16 target, Vd = 32000), interleaved, timed with CUDA events:

- supervision: ``compute_target_distribution`` on shifted bf16 logits ``[1, S, V]`` (argmax, gather,
  fp32 softmax) against the limit, a device-to-device copy of the bytes it must touch (read the logits,
  write the probabilities): the memory-bandwidth floor;
- staging: the answer copied device-to-host into preallocated pinned buffers, one ``copy_(non_blocking)``
  per tensor and one synchronize, against one ``copy_`` of a contiguous device buffer of the same size
  into pinned memory (the PCIe/C2C floor); pageable ``.cpu()`` for comparison;
- wire encode from the pinned buffers: it must reference them (0 tensor bytes copied).

Ratio = limit median / figure median (1.0 = at the floor).
"""

from __future__ import annotations

import torch

from bench import common
from bench.bench_wire import tensor_bytes_copied
from tandem.speculative.remote import wire
from tandem.speculative.target.supervision import compute_target_distribution


def cuda_timed(fn) -> float:
    """Seconds between CUDA events around ``fn`` (the device's own clock, after a synchronize)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def bench_supervision(shape: common.SupervisionShape, runs: int, warmup: int) -> dict:
    device = torch.device("cuda")
    logits = torch.randn(shape.batch, shape.seq, shape.vocab, device=device, dtype=shape.dtype)
    ids = torch.randperm(shape.vocab, device=device)[: shape.draft_vocab].sort().values
    mask = torch.zeros(shape.vocab, dtype=torch.bool, device=device)
    mask[ids] = True
    loss_mask = torch.ones(shape.batch, shape.seq, dtype=torch.long, device=device)
    touched = logits.numel() * logits.element_size() + shape.tokens * shape.draft_vocab * 4
    src, dst = (torch.empty(touched // 2, dtype=torch.uint8, device=device),
                torch.empty(touched // 2, dtype=torch.uint8, device=device))
    cases = {"d2d": lambda: cuda_timed(lambda: dst.copy_(src)),
             "supervision": lambda: cuda_timed(lambda: compute_target_distribution(logits, ids, mask, loss_mask))}
    times = common.interleaved(cases, runs, warmup)
    return common.ratio_row("CUDA supervision (argmax+gather+softmax)", times["supervision"],
                            "device copy of the bytes touched", times["d2d"], touched, shape=shape.name)


def bench_staging(shape: common.SupervisionShape, runs: int, warmup: int) -> list[dict]:
    device = torch.device("cuda")
    answer = {k: v.to(device) for k, v in common.make_supervision(shape, "full").items()}
    pinned = {k: torch.empty(v.shape, dtype=v.dtype, pin_memory=True) for k, v in answer.items()}
    nbytes = sum(v.numel() * v.element_size() for v in answer.values())
    flat = torch.empty(nbytes, dtype=torch.uint8, device=device)
    flat_pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def stage() -> None:
        for key, tensor in answer.items():
            pinned[key].copy_(tensor, non_blocking=True)

    cases = {
        "floor": lambda: cuda_timed(lambda: flat_pinned.copy_(flat, non_blocking=True)),
        "pinned": lambda: cuda_timed(stage),
        "pageable": lambda: cuda_timed(lambda: {k: v.cpu() for k, v in answer.items()}),
        "encode": lambda: wire.encode(pinned),
    }
    times = common.interleaved(cases, runs, warmup)
    extra = {"shape": shape.name}
    copied = tensor_bytes_copied(pinned, wire.encode(pinned))
    return [
        common.ratio_row("D2H staging into pinned buffers", times["pinned"], "one pinned D2H copy", times["floor"],
                         nbytes, target=0.8, **extra),
        common.ratio_row("D2H .cpu() (pageable, new)", times["pageable"], "one pinned D2H copy", times["floor"], nbytes,
                         **extra),
        common.ratio_row("wire encode from pinned", times["encode"], "one pinned D2H copy", times["floor"], nbytes,
                         tensor_bytes_copied=copied, **extra),
    ]


COLUMNS = (
    ("shape", "shape", "s"), ("figure", "figure", "s"), ("MB", "MB", ",.0f"), ("GB/s", "GB_per_s", ".1f"),
    ("limit", "limit", "s"), ("limit GB/s", "limit_GB_per_s", ".1f"), ("ratio", "ratio", ".2f"),
    ("target", "target", ".1f"), ("meets", "meets_target", ""), ("tensor bytes copied", "tensor_bytes_copied", "d"),
)


def main(argv=None) -> list[dict]:
    args = common.settle(common.parser(__doc__.split("\n")[0], runs=11).parse_args(argv))
    if not torch.cuda.is_available():
        print(common.format_table([{"figure": "skipped: no CUDA device on this machine"}], [("figure", "figure", "s")]))
        return []
    rows = []
    for shape in common.bench_shapes(args.quick):
        rows.append(bench_supervision(shape, args.runs, args.warmup))
        rows += bench_staging(shape, args.runs, args.warmup)
    for row in rows:
        row["MB"] = row["bytes"] / 1e6
    device = torch.cuda.get_device_name(0)
    table = f"device: {device}\n\n" + common.format_table(rows, COLUMNS)
    common.publish("bench_cuda", f"GPU data path on {device}", rows, args, table)
    return rows


if __name__ == "__main__":
    main()
