"""Figure 5: bytes on the wire per supervised token, for each supervision encoding.

    .venv/bin/python -m bench.bench_bytes            # writes bench/results/bench_bytes.json

For SmolLM2-135M and Llama-3.1-8B shapes at 2048 tokens (bf16 target, Vd = 32000), the exact ``/generate``
wire bodies: the request (``input_ids``, ``attention_mask``, ``loss_mask``) and the answer in the full
encoding (``target_probs [B,S,Vd]`` fp32) and the compact one (``final_hidden_states [B,S,H]`` in the target
dtype; the client projects it onto the draft vocabulary with the ``lm_head`` rows it fetched once, whose
one-off size is listed too). The ratio is full / compact (the target is at least 3x for Llama-3.1-8B).
Sizes are counted, not timed: one run is exact.
"""

from __future__ import annotations

import torch

from bench import common
from tandem.speculative.remote import wire


def bench_shape(shape: common.SupervisionShape) -> list[dict]:
    ids = torch.zeros(shape.batch, shape.seq, dtype=torch.long)
    request = wire.body_size(wire.encode({"input_ids": ids, "attention_mask": ids, "loss_mask": ids}))
    sizes = {enc: wire.body_size(wire.encode(common.make_supervision(shape, enc))) for enc in ("full", "compact")}
    head = torch.empty(shape.draft_vocab, shape.hidden, dtype=shape.dtype)
    head_bytes = wire.body_size(wire.encode({"weight": head}))
    rows = []
    for encoding, size in sizes.items():
        rows.append({
            "shape": shape.name, "encoding": encoding, "tokens": shape.tokens, "answer_bytes": size,
            "answer_bytes_per_token": size / shape.tokens, "request_bytes_per_token": request / shape.tokens,
            "one_off_bytes": head_bytes if encoding == "compact" else 0,
            "ratio": sizes["full"] / size,
            "target": 3.0 if shape.name.startswith("Llama") and encoding == "compact" else None,
        })
        rows[-1]["meets_target"] = None if rows[-1]["target"] is None else bool(rows[-1]["ratio"] >= rows[-1]["target"])
        rows[-1]["KB_per_token"] = rows[-1]["answer_bytes_per_token"] / 1024
        rows[-1]["one_off_MB"] = rows[-1]["one_off_bytes"] / 1e6
    return rows


COLUMNS = (
    ("shape", "shape", "s"), ("encoding", "encoding", "s"), ("answer KiB/token", "KB_per_token", ",.2f"),
    ("request B/token", "request_bytes_per_token", ".1f"), ("one-off lm_head rows MB", "one_off_MB", ",.1f"),
    ("full / this", "ratio", ".2f"), ("target", "target", ".1f"), ("meets", "meets_target", ""),
)


def main(argv=None) -> list[dict]:
    args = common.settle(common.parser(__doc__.split("\n")[0], runs=1, warmup=0).parse_args(argv))
    rows = [row for shape in common.bench_shapes(args.quick) for row in bench_shape(shape)]
    common.publish("bench_bytes", "bytes on the wire per supervised token", rows, args,
                   common.format_table(rows, COLUMNS))
    return rows


if __name__ == "__main__":
    main()
