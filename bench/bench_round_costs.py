"""What a speculative round costs per dtype: verifying n tokens against one, the draft's step, and the rest.

    .venv/bin/python -m bench.bench_round_costs            # SmolLM2-135M, float32 and bfloat16
    .venv/bin/python -m bench.bench_round_costs --quick    # a tiny random Llama, seconds

Three groups of figures, each against a 1-token target forward measured in the same interleaved run:
the verification curve (``greedy_forward`` of n tokens after a cached held-out prompt, n = 1 .. 33, the
largest tree ``auto`` considers), split into the decoder layers alone and what the verification adds on top
of them (output head, argmax, near-tie flags, aux capture: the float32 re-scoring of a bf16 target lives
there); the draft's step; and the bookkeeping of a round outside the two forwards (the KV-cache crop of a
chain, ``keep_branch`` of a tree, and the Python of a whole real round, as the difference between a round
of ``speculative_decode`` and the sum of its parts).
"""

from __future__ import annotations

import torch

from bench import common
from bench.bench_quality import decode_text, load

SIZES = (1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33)
COLUMNS = (("dtype", "dtype", "s"), ("figure", "figure", "s"), ("ms", "ms", ".2f"), ("limit", "limit", "s"),
           ("limit ms", "limit_ms", ".2f"), ("cost / limit", "cost_ratio", ".2f"))


def _cases(model, draft, tokenizer, dtype: torch.dtype) -> dict:
    """The timed cases on one prompt's cache (each leaves the cache as it found it)."""
    from transformers import DynamicCache

    from tandem.speculative.decoding.decode import _draft_chain
    from tandem.speculative.decoding.verification import select_cache_positions
    from tandem.speculative.drafts.eagle3 import DraftKVCache
    from tandem.speculative.target.model import Eagle3TargetModel

    target = Eagle3TargetModel(model)
    prompt, verified = decode_text(target, tokenizer, 32, max(SIZES))
    context = prompt.shape[1]
    cache = DynamicCache()
    step = target.greedy_forward(prompt, cache)
    draft_cache = DraftKVCache()
    hidden_aux = step.aux_hidden_states
    draft.step(prompt[:, 1:], draft.project_aux(hidden_aux[:, :-1]), torch.arange(context - 1).unsqueeze(0),
               kv_cache=draft_cache)

    def verify(n: int):
        def run() -> None:
            target.greedy_forward(verified[:, :n], cache)
            cache.crop(-n)
        return run

    def layers(n: int):
        def run() -> None:
            target.model.model(input_ids=verified[:, :n], past_key_values=cache, use_cache=True)
            target._capture.captured.clear()
            cache.crop(-n)
        return run

    def keep_branch() -> None:
        target.model.model(input_ids=verified[:, :25], past_key_values=cache, use_cache=True)
        target._capture.captured.clear()
        select_cache_positions(cache, context, torch.tensor([context, context + 1, context + 2]))
        cache.crop(-3)

    def draft_step() -> None:
        _draft_chain(draft, verified[:, :1], hidden_aux[:, -1:], context - 1, draft_cache, 1)
        draft_cache.crop(context - 1)

    cases = {f"verify {n}": verify(n) for n in SIZES}
    cases.update({f"layers {n}": layers(n) for n in (1, 3, 25)})
    cases.update({"keep_branch after 25": keep_branch, "draft step": draft_step})
    return cases


def _round_rows(model, draft, tokenizer, dtype: torch.dtype, name: str, one: float, parts: dict) -> list[dict]:
    """A whole round of real decoding (chain of 2, tree 3,8,24) against the sum of its measured parts."""
    from tandem.speculative.decoding.decode import greedy_decode, speculative_decode
    from tandem.speculative.decoding.tree import TreeShape
    from tandem.speculative.target.model import Eagle3TargetModel

    target = Eagle3TargetModel(model)
    prompt, _ = decode_text(target, tokenizer, 32, 1)
    tokens = 24 if tokenizer is None else 48
    rows = []
    for label, kwargs, sum_of_parts in (
            ("chain 2", {"num_draft_tokens": 2}, parts["verify 3"] + 2 * parts["draft step"]),
            ("tree 3,8,24", {"tree": TreeShape(3, 8, 24)}, parts["verify 25"] + 3 * parts["draft step"])):
        results = [speculative_decode(target, draft, prompt, tokens, **kwargs) for _ in range(3)]
        plain = [greedy_decode(target, prompt, tokens) for _ in range(3)]
        per_round = common.median([r.wall_s / max(r.target_forwards, 1) for r in results])
        per_token = common.median([r.wall_s / max(r.target_forwards, 1) for r in plain])
        rows.append({"dtype": name, "figure": f"real round, {label}", "ms": per_round * 1e3,
                     "limit": "target forward, 1 token", "limit_ms": one * 1e3, "cost_ratio": per_round / one,
                     "sum_of_parts_ms": sum_of_parts * 1e3})
        rows.append({"dtype": name, "figure": f"outside the forwards, {label} (round - parts)",
                     "ms": (per_round - sum_of_parts) * 1e3, "limit": "target forward, 1 token",
                     "limit_ms": one * 1e3, "cost_ratio": (per_round - sum_of_parts) / one})
        rows.append({"dtype": name, "figure": "real plain decoding step", "ms": per_token * 1e3,
                     "limit": "target forward, 1 token", "limit_ms": one * 1e3, "cost_ratio": per_token / one})
    return rows


def dtype_rows(quick: bool, dtype: torch.dtype, runs: int, warmup: int) -> list[dict]:
    model, draft, tokenizer = load(quick, dtype)
    name = str(dtype).removeprefix("torch.")
    with torch.inference_mode():
        medians = {k: common.median(v) for k, v in
                   common.interleaved(_cases(model, draft, tokenizer, dtype), runs, warmup).items()}
    one = medians["verify 1"]

    def row(figure: str, seconds: float) -> dict:
        return {"dtype": name, "figure": figure, "ms": seconds * 1e3, "limit": "target forward, 1 token",
                "limit_ms": one * 1e3, "cost_ratio": seconds / one}

    rows = [row(f"verify {n} tokens", medians[f"verify {n}"]) for n in SIZES]
    for n in (1, 3, 25):
        rows.append(row(f"decoder layers alone, {n} tokens", medians[f"layers {n}"]))
        rows.append(row(f"verification beyond the layers, {n} tokens (head, argmax, ties, aux)",
                        medians[f"verify {n}"] - medians[f"layers {n}"]))
    rows.append(row("keep_branch of 3 after 25 (with the 25-token forward)", medians["keep_branch after 25"]))
    rows.append(row("keep_branch alone (that minus the layers of 25)",
                    medians["keep_branch after 25"] - medians["layers 25"]))
    rows.append(row("draft step (commit 1 token, propose 1)", medians["draft step"]))
    with torch.inference_mode():
        rows += _round_rows(model, draft, tokenizer, dtype, name, one, medians)
    return rows


def main(argv=None) -> list[dict]:
    args = common.settle(common.parser(__doc__.split("\n")[0], runs=9, warmup=2).parse_args(argv))
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        rows += dtype_rows(args.quick, dtype, args.runs, args.warmup)
    table = common.format_table(rows, COLUMNS)
    common.publish("bench_round_costs", "the costs of a speculative round per dtype", rows, args, table)
    return rows


if __name__ == "__main__":
    main()
