"""What decides whether a draft pays for itself: decode costs and training speed, per dtype, as ratios.

    .venv/bin/python -m bench.bench_quality            # SmolLM2-135M (the demo's target); bench/results/*.json
    .venv/bin/python -m bench.bench_quality --quick    # a tiny random Llama, seconds

Decode (one prompt, KV-cached, as ``decode.speculative_decode`` runs): a verifying target forward of
``k + 1`` tokens against a plain 1-token forward (the limit: what greedy decoding pays per token), and one
draft step against the same. From these, the acceptance length a draft needs for a 1.2x speed-up at draft
length ``k``: ``1.2 * (verify(k+1) + k * draft) / forward(1)``; the same for whole rounds, a chain's and a
draft tree's (``DEPTH,TOP_K,SIZE``: its draft forwards and a verification of ``SIZE + 1`` positions under a
tree mask). The verified tokens are the target's own greedy answer to a held-out prompt, as in real
decoding. Training (a batch of the demo's shape): a step from the supervision cache and a step with
the target in the loop, against the target's forward alone. Each dtype's cases run interleaved.
"""

from __future__ import annotations

import torch

from bench import common
from tandem.speculative.decoding.decode import _draft_chain
from tandem.speculative.decoding.tree import TreeShape, draft_tree

DRAFT_LENGTHS = (1, 2, 3, 4, 5, 6)
TREE_SHAPES = (TreeShape(3, 4, 12), TreeShape(2, 8, 16), TreeShape(3, 8, 24), TreeShape(4, 8, 32))
COLUMNS = (("dtype", "dtype", "s"), ("figure", "figure", "s"), ("ms", "ms", ".1f"), ("limit", "limit", "s"),
           ("limit ms", "limit_ms", ".1f"), ("cost / limit", "cost_ratio", ".2f"),
           ("acceptance for 1.2x", "breakeven_acceptance", ".2f"))


def load(quick: bool, dtype: torch.dtype):
    """``(model, draft, tokenizer)``: SmolLM2-135M and a draft of its shape (4096-token vocabulary), or tiny ones
    (no tokenizer)."""
    from tandem.speculative.drafts.eagle3 import Eagle3DraftConfig, Eagle3DraftModel

    if quick:
        from tests.conftest import build_tiny_llama

        model, tokenizer = build_tiny_llama().to(dtype).eval(), None
        vocab = 200
    else:
        from tandem.models import load_target

        model, tokenizer = load_target("default", dtype=dtype)
        vocab = 4096
    draft = Eagle3DraftModel(Eagle3DraftConfig.from_target_config(model.config, vocab)).to(dtype).eval()
    return model, draft, tokenizer


def decode_text(target, tokenizer, context: int, verified: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(prompt [1, S], next_ids [1, verified])``: a held-out prompt with the start of the target's greedy answer,
    and the answer's next tokens. Verifying what the target would say keeps its logits as peaked as in real
    decoding (random ids give flat rows, which send ``greedy_from_hidden`` to its full float32 fallback). Without
    a tokenizer: random ids of ``context`` positions."""
    if tokenizer is None:
        vocab = target.config.vocab_size
        return torch.randint(3, vocab, (1, context)), torch.randint(3, vocab, (1, verified))
    from tandem.speculative.decoding.decode import greedy_decode
    from tandem.speculative.training.data import default_prompt_path, prompt_ids, read_chat_jsonl

    prompt = prompt_ids(tokenizer, read_chat_jsonl(default_prompt_path("heldout"), limit=1)[0].messages)
    answer = torch.tensor([greedy_decode(target, prompt, 16 + verified).tokens])
    return torch.cat([prompt, answer[:, :16]], 1), answer[:, 16:]


def decode_rows(model, draft, dtype: torch.dtype, runs: int, warmup: int, context: int, tokenizer=None) -> list[dict]:
    from transformers import DynamicCache

    from tandem.speculative.drafts.eagle3 import DraftKVCache
    from tandem.speculative.target.model import Eagle3TargetModel

    target = Eagle3TargetModel(model)
    longest = max([k + 1 for k in DRAFT_LENGTHS] + [shape.size + 1 for shape in TREE_SHAPES])
    prompt, next_ids = decode_text(target, tokenizer, context, longest)
    context = prompt.shape[1]
    cache = DynamicCache()
    target.greedy_forward(prompt, cache)
    draft_cache = DraftKVCache()
    hidden = draft.step(prompt, draft.project_aux(torch.randn(1, context, 3 * model.config.hidden_size, dtype=dtype)),
                        torch.arange(context).unsqueeze(0), kv_cache=draft_cache)[:, -1:]

    def forward(n: int):
        def run() -> None:
            # What decoding runs: the greedy tokens and near-tie flags of the float32 logits (greedy_forward).
            target.greedy_forward(next_ids[:, :n], cache)
            cache.crop(-n)  # back to the prompt: every run sees the same context
        return run

    def draft_step() -> None:
        out = draft.step(torch.tensor([[5]]), hidden, torch.tensor([[context]]), kv_cache=draft_cache)
        int(draft.draft_to_target(draft.logits(out)[0, -1].argmax()))  # the host sync decoding pays
        draft_cache.crop(context)

    def tree_forward(shape: TreeShape):
        parents = [-1] + [(i - 1) // shape.top_k for i in range(1, shape.size + 1)]  # any tree of that size costs alike

        def run() -> None:
            target.greedy_forward(next_ids[:, : shape.size + 1], cache, parents)
            cache.crop(-(shape.size + 1))
        return run

    def draft_round(shape: TreeShape | None, k: int = 0):
        # A whole drafting round as decode.py runs it: the committed token read, then a chain or a tree.
        aux = torch.randn(1, 1, 3 * model.config.hidden_size, dtype=dtype)

        def run() -> None:
            if shape is None:
                _draft_chain(draft, torch.tensor([[5]]), aux, context, draft_cache, k)
            else:
                draft_tree(draft, torch.tensor([[5]]), aux, context, draft_cache, 5, shape)
            draft_cache.crop(context)
        return run

    cases = {"forward 1": forward(1), "draft step": draft_step}
    cases.update({f"verify {k + 1}": forward(k + 1) for k in DRAFT_LENGTHS})
    cases.update({f"chain round {k}": draft_round(None, k) for k in (2, 3)})
    for shape in TREE_SHAPES:
        cases[f"tree verify {shape}"] = tree_forward(shape)
        cases[f"tree round {shape}"] = draft_round(shape)
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
    for k in (2, 3):
        chain = common.median(times[f"chain round {k}"])
        rows.append({"dtype": rows[0]["dtype"], "figure": f"chain round k={k} (draft {k} + verify {k + 1})",
                     "ms": chain * 1e3 + common.median(times[f"verify {k + 1}"]) * 1e3,
                     "limit": "target forward, 1 token",
                     "limit_ms": one * 1e3})
    for shape in TREE_SHAPES:
        verify, drafting = common.median(times[f"tree verify {shape}"]), common.median(times[f"tree round {shape}"])
        rows.append({"dtype": rows[0]["dtype"], "figure": f"tree {shape}: verify "
                     f"{shape.size + 1} tokens", "ms": verify * 1e3, "limit": "target forward, 1 token",
                     "limit_ms": one * 1e3, "cost_ratio": verify / one})
        rows.append({"dtype": rows[0]["dtype"], "figure": f"tree {shape}: round "
                     "(draft + verify)", "ms": (verify + drafting) * 1e3, "limit": "target forward, 1 token",
                     "limit_ms": one * 1e3, "cost_ratio": (verify + drafting) / one,
                     "breakeven_acceptance": 1.2 * (verify + drafting) / one})
    for row in rows:
        if row["figure"].startswith("chain round"):
            row["cost_ratio"] = row["ms"] / row["limit_ms"]
            row["breakeven_acceptance"] = 1.2 * row["cost_ratio"]
    return rows


def training_rows(model, dtype: torch.dtype, runs: int, warmup: int, quick: bool) -> list[dict]:
    """A training step from cached supervision and one with the target's forward in it, against that forward."""
    from tandem.speculative.drafts.eagle3 import Eagle3DraftConfig, Eagle3DraftModel
    from tandem.speculative.target.compact import draft_lm_head, expand_supervision
    from tandem.speculative.target.model import Eagle3TargetModel
    from tandem.speculative.training.eagle3_loss import ttt_loss

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
        model, draft, tokenizer = load(args.quick, dtype)
        rows += decode_rows(model, draft, dtype, args.runs, args.warmup, context=32, tokenizer=tokenizer)
        rows += training_rows(model, dtype, max(args.runs // 3, 2), min(args.warmup, 1), args.quick)
    one = {r["dtype"]: r["limit_ms"] for r in rows if r["figure"] == "draft step"}
    notes = [f"bf16 / fp32 cost of a 1-token target forward: {one['bfloat16'] / one['float32']:.2f}"]
    best = min((r for r in rows if r.get("draft_tokens") and r["dtype"] == "bfloat16"),
               key=lambda r: r["breakeven_acceptance"])
    notes.append(f"bf16: cheapest draft length for a 1.2x speed-up is k={best['draft_tokens']} "
                 f"(needs acceptance {best['breakeven_acceptance']:.2f})")
    table = common.format_table(rows, COLUMNS) + "\n" + "\n".join(notes)
    common.publish("bench_quality", "decode costs and training speed per dtype", rows, args, table, notes)
    return rows


if __name__ == "__main__":
    main()
