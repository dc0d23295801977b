"""What decides whether a draft pays for itself: decode costs and training speed, per dtype, as ratios.

    .venv/bin/python -m bench.bench_quality            # SmolLM2-135M (the demo's target); writes bench/results/bench_quality.json
    .venv/bin/python -m bench.bench_quality --quick    # a tiny random Llama, seconds

Decode (one prompt, KV-cached, as ``decode.speculative_decode`` runs): a verifying target forward of
``k + 1`` tokens against a plain 1-token forward (the limit: what greedy decoding pays per token), and one
draft step against the same. From these, the acceptance length a draft needs for a 1.2x speed-up at draft
length ``k``: ``1.2 * (verify(k+1) + k * draft) / forward(1)`` -- the demo picks its draft length where
this is lowest. Training (a batch of the demo's shape): a step from the supervision cache and a step with
the target in the loop, against the target's forward alone. Each dtype's cases run interleaved.
"""

from __future__ import annotations

import torch

from bench import common

DRAFT_LENGTHS = (1, 2, 3, 4, 5, 6)
COLUMNS = (("dtype", "dtype", "s"), ("figure", "figure", "s"), ("ms", "ms", ".1f"), ("limit", "limit", "s"),
           ("limit ms", "limit_ms", ".1f"), ("cost / limit", "cost_ratio", ".2f"),
           ("acceptance for 1.2x", "breakeven_acceptance", ".2f"))


def load(quick: bool, dtype: torch.dtype):
    """``(model, draft)``: SmolLM2-135M and a draft of its shape (4096-token vocabulary), or tiny ones."""
    from tandem.speculative.eagle.draft import Eagle3DraftConfig, Eagle3DraftModel

    if quick:
        from tests.conftest import build_tiny_llama

        model = build_tiny_llama().to(dtype).eval()
        vocab = 200
    else:
        from tandem.models import load_target

        model, _ = load_target("default", dtype=dtype)
        vocab = 4096
    draft = Eagle3DraftModel(Eagle3DraftConfig.from_target_config(model.config, vocab)).to(dtype).eval()
    return model, draft


def decode_rows(model, draft, dtype: torch.dtype, runs: int, warmup: int, context: int) -> list[dict]:
    from transformers import DynamicCache

    from tandem.speculative.eagle.draft import DraftKVCache
    from tandem.speculative.eagle.target import Eagle3TargetModel

    target = Eagle3TargetModel(model)
    vocab = model.config.vocab_size
    prompt = torch.randint(3, vocab, (1, context))
    cache = DynamicCache()
    target.greedy_forward(prompt, cache)
    draft_cache = DraftKVCache()
    hidden = draft.step(prompt, draft.project_aux(torch.randn(1, context, 3 * model.config.hidden_size, dtype=dtype)),
                        torch.arange(context).unsqueeze(0), kv_cache=draft_cache)[:, -1:]

    def forward(n: int):
        def run() -> None:
            # What decoding runs: the greedy tokens and near-tie flags of the float32 logits (greedy_forward).
            target.greedy_forward(torch.randint(3, vocab, (1, n)), cache)
            cache.crop(-n)  # back to the prompt: every run sees the same context
        return run

    def draft_step() -> None:
        out = draft.step(torch.tensor([[5]]), hidden, torch.tensor([[context]]), kv_cache=draft_cache)
        int(draft.draft_to_target(draft.logits(out)[0, -1].argmax()))  # the host sync decoding pays
        draft_cache.crop(context)

    cases = {"forward 1": forward(1), "draft step": draft_step}
    cases.update({f"verify {k + 1}": forward(k + 1) for k in DRAFT_LENGTHS})
    with torch.inference_mode():
        times = common.interleaved(cases, runs, warmup)
    one, step = common.median(times["forward 1"]), common.median(times["draft step"])
    rows = [{"dtype": str(dtype).removeprefix("torch."), "figure": "draft step", "ms": step * 1e3,
             "limit": "target forward, 1 token", "limit_ms": one * 1e3, "cost_ratio": step / one}]
    for k in DRAFT_LENGTHS:
        verify = common.median(times[f"verify {k + 1}"])
        rows.append({"dtype": rows[0]["dtype"], "figure": f"verify k={k} ({k + 1} tokens)", "ms": verify * 1e3,
                     "limit": "target forward, 1 token", "limit_ms": one * 1e3, "cost_ratio": verify / one,
                     "draft_tokens": k, "breakeven_acceptance": 1.2 * (verify + k * step) / one})
    return rows


def training_rows(model, dtype: torch.dtype, runs: int, warmup: int, quick: bool) -> list[dict]:
    """A training step from cached supervision and one with the target's forward in it, against that forward."""
    from tandem.speculative.eagle.compact import draft_lm_head, expand_supervision
    from tandem.speculative.eagle.draft import Eagle3DraftConfig, Eagle3DraftModel
    from tandem.speculative.eagle.target import Eagle3TargetModel
    from tandem.speculative.eagle.trainer import ttt_loss

    batch, seq = (2, 32) if quick else (4, 256)
    vocab_draft = 200 if quick else 4096
    target = Eagle3TargetModel(model)
    selected = torch.arange(vocab_draft)
    mask = torch.zeros(model.config.vocab_size, dtype=torch.bool)
    mask[selected] = True
    target.set_vocab_mapping(selected, mask)
    ids = torch.randint(3, model.config.vocab_size, (batch, seq))
    ones = torch.ones_like(ids)
    draft = Eagle3DraftModel(Eagle3DraftConfig.from_target_config(model.config, vocab_draft)).train()
    head = draft_lm_head(model, selected)
    cached = target.supervise_compact(ids, ones, ones)
    optimizer = torch.optim.AdamW(draft.parameters(), lr=1e-4)
    autocast = torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)

    def draft_step(supervision) -> None:
        with autocast:
            result = ttt_loss(draft, supervision, ones, ttt_steps=4)
        result.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    cases = {
        "target forward": lambda: target.supervise_compact(ids, ones, ones),
        "step from cache": lambda: draft_step(expand_supervision(cached, head)),
        "step, target live": lambda: draft_step(target.supervise(ids, ones, ones)),
    }
    times = common.interleaved(cases, runs, warmup)
    forward = common.median(times["target forward"])
    name = str(dtype).removeprefix("torch.")
    rows = []
    for figure in ("step from cache", "step, target live"):
        t = common.median(times[figure])
        rows.append({"dtype": name, "figure": f"training {figure} ({batch}x{seq}, TTT 4)", "ms": t * 1e3,
                     "limit": "target forward alone", "limit_ms": forward * 1e3, "cost_ratio": t / forward,
                     "tokens_per_s": batch * seq / t})
    return rows


def main(argv=None) -> list[dict]:
    args = common.settle(common.parser(__doc__.split("\n")[0], runs=15, warmup=2).parse_args(argv))
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        model, draft = load(args.quick, dtype)
        rows += decode_rows(model, draft, dtype, args.runs, args.warmup, context=32 if args.quick else 200)
        rows += training_rows(model, dtype, max(args.runs // 3, 2), min(args.warmup, 1), args.quick)
    one = {r["dtype"]: r["limit_ms"] for r in rows if r["figure"] == "draft step"}
    notes = [f"bf16 / fp32 cost of a 1-token target forward: {one['bfloat16'] / one['float32']:.2f}"]
    best = min((r for r in rows if r.get("breakeven_acceptance") and r["dtype"] == "bfloat16"),
               key=lambda r: r["breakeven_acceptance"])
    notes.append(f"bf16: cheapest draft length for a 1.2x speed-up is k={best['draft_tokens']} "
                 f"(needs acceptance {best['breakeven_acceptance']:.2f})")
    table = common.format_table(rows, COLUMNS) + "\n" + "\n".join(notes)
    common.publish("bench_quality", "decode costs and training speed per dtype", rows, args, table, notes)
    return rows


if __name__ == "__main__":
    main()
