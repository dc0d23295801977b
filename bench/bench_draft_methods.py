"""EAGLE-3 against DFlash on one machine: same regenerated data, same training wall time, same held-out prompts.

    .venv/bin/python -m bench.bench_draft_methods --data runs/demo/train_regenerated.jsonl   # ~20 min, 2 vCPUs
    .venv/bin/python -m bench.bench_draft_methods --quick                                   # tiny random target

Each method trains in-process from its own supervision cache (filled first, not counted) for as many steps as
``--train-seconds`` allow at its step rate, timed on ``--calibration-steps`` real steps of a throwaway run first
(the seconds each run really took are reported). EAGLE-3 trains with the demo's recipe;
DFlash with the demo's DFlash recipe at the reference's block of 16 (so it can decode at 4, 8 and 16). Then every
held-out prompt is decoded back to back: plainly, by EAGLE-3 as a chain of 2 and as the 3,8,24 tree, and by
DFlash at blocks 4, 8 and 16; each speed-up is against the plain decodes of the same moment, and every output is
checked equal to the plain one. A round's cost splits into the target's verification of the round's tokens
(timed alone on a KV cache) and the rest, the draft's. ``round / step`` is the acceptance a method needs to break
even against plain decoding.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from bench import common

COLUMNS = (("method", "method", "s"), ("decoding", "decoding", "s"), ("acceptance", "acceptance_length", ".2f"),
           ("speed-up", "speedup", ".2f"), ("round ms", "round_ms", ".1f"), ("verify ms", "verify_ms", ".1f"),
           ("draft ms", "draft_ms", ".1f"), ("round / step", "breakeven_acceptance", ".2f"),
           ("= greedy", "outputs_match", ""), ("train steps", "train_steps", "d"),
           ("train step s", "train_step_s", ".2f"), ("train s", "train_s", ".0f"))
DFLASH_BLOCKS = (4, 8, 16)
TREE = "3,8,24"


def _load(args):
    """``(model, tokenizer, data path)``: SmolLM2 and ``--data``, or a tiny random target and tiny chat data."""
    from tandem.models import load_target

    if not args.quick:
        if not Path(args.data).is_file():
            raise SystemExit(f"no regenerated data at {args.data}: run `tandem demo` (it leaves OUT/"
                             f"train_regenerated.jsonl) or `tandem regenerate`, then pass --data")
        model, tokenizer = load_target(args.target, dtype=args.dtype)
        return model, tokenizer, Path(args.data)
    from tests.conftest import save_tiny_target, write_chat_data

    directory = save_tiny_target(args.work / "tiny-target")
    model, tokenizer = load_target(str(directory), dtype="float32")
    return model, tokenizer, write_chat_data(args.work / "chat.jsonl", count=16)


def _train_configs(args, data: Path, target_spec: str) -> dict:
    """The two recipes (``demo.DemoConfig``'s EAGLE-3 defaults and its DFlash fields at block 16)."""
    from tandem.demo import DemoConfig
    from tandem.speculative.training.config import TrainConfig

    demo = DemoConfig()
    common_fields = dict(data=str(data), target=target_spec, dtype="float32" if args.quick else args.dtype,
                         batch_size=2 if args.quick else demo.batch_size,
                         max_seq_len=64 if args.quick else demo.max_seq_len, learning_rate=demo.learning_rate,
                         warmup_steps=1 if args.quick else demo.warmup_steps, show_progress=False, eval_every=0)
    eagle3 = TrainConfig(**common_fields, output_dir=str(args.work / "eagle3"),
                         supervision_cache=str(args.work / "cache-eagle3"),
                         draft_vocab_size=120 if args.quick else demo.draft_vocab_size, ttt_steps=demo.ttt_steps,
                         ttt_decay=demo.ttt_decay)
    dflash = TrainConfig(**common_fields, output_dir=str(args.work / "dflash"), method="dflash", eval_tree="",
                         supervision_cache=str(args.work / "cache-dflash"), block_size=max(DFLASH_BLOCKS),
                         draft_layers=1 if args.quick else demo.draft_layers, num_anchors=demo.num_anchors)
    return {"eagle3": eagle3, "dflash": dflash}


def _train(model, tokenizer, config, train_seconds: float, calibration_steps: int) -> dict:
    """Fill the method's cache, time ``calibration_steps`` real steps of a throwaway run, size the run to
    ``train_seconds`` at that rate, train; returns the trainer and the timings."""
    from dataclasses import replace

    from tandem.speculative.target.model import Eagle3TargetModel
    from tandem.speculative.training.methods import trainer_class_for

    target = (Eagle3TargetModel(model, draft_method="dflash", num_draft_layers=config.draft_layers)
              if config.method == "dflash" else Eagle3TargetModel(model))
    trainer_class = trainer_class_for(config.method)
    probe_config = replace(config, total_steps=calibration_steps, save_every=10 ** 9,
                           output_dir=config.output_dir + "-calibration")
    probe = trainer_class(probe_config, target=target, tokenizer=tokenizer)
    started = time.perf_counter()
    probe.fill_supervision_cache()
    cache_s = time.perf_counter() - started
    started = time.perf_counter()
    probe.train()  # the export at its end is counted too: a slight overestimate of a step
    step_s = (time.perf_counter() - started) / calibration_steps
    steps = max(int(train_seconds / step_s), 3)
    config = replace(config, total_steps=steps, save_every=steps)
    trainer = trainer_class(config, target=target, tokenizer=tokenizer)
    started = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - started
    return {"trainer": trainer, "steps": steps, "estimated_step_s": step_s, "train_s": train_s,
            "train_step_s": train_s / steps, "cache_s": cache_s}


@torch.no_grad()
def verify_ms(model, tokenizer, sizes: list[int], runs: int = 9) -> dict[int, float]:
    """Milliseconds of the target's forward over ``n`` new positions for each ``n`` in ``sizes`` (1: a plain
    decoding step), on a KV cache holding a held-out prompt and the first 16 tokens of the target's answer, the
    positions being the answer's next tokens (peaked logits, as in real decoding: ``bench_quality.decode_text``);
    the sizes interleaved, medians of ``runs``."""
    from bench.bench_quality import decode_text
    from tandem.speculative.target.model import Eagle3TargetModel

    target = Eagle3TargetModel(model)
    prompt, answer = decode_text(target, tokenizer, 32, max(sizes))
    session = target.decode_session()
    times: dict[int, list[float]] = {n: [] for n in sizes}
    try:
        session.extend(prompt)
        for run in range(runs + 1):  # the first round warms every shape up
            for n in sizes:
                started = time.perf_counter()
                session.extend(answer[:, :n])
                if run:
                    times[n].append(time.perf_counter() - started)
                session.crop(prompt.shape[1])
    finally:
        session.close()
    return {n: 1e3 * common.median(t) for n, t in times.items()}


def _decoders(trained: dict, dtype: torch.dtype) -> dict:
    """``{(method, decoding): (decode(target, prompt, n, stop) -> DecodeResult, tokens a round verifies)}``."""
    from tandem.speculative.decoding.decode import for_decoding, speculative_decode
    from tandem.speculative.decoding.dflash_decode import dflash_decode, dflash_for_decoding
    from tandem.speculative.decoding.tree import TreeShape

    eagle3 = for_decoding(trained["eagle3"]["trainer"].draft, dtype)
    dflash = dflash_for_decoding(trained["dflash"]["trainer"].draft, dtype)
    tree = TreeShape.parse(TREE)
    decoders = {
        ("eagle3", "chain of 2"): (lambda t, p, n, s: speculative_decode(t, eagle3, p, n, 2, s), 3),
        ("eagle3", f"tree {TREE}"): (lambda t, p, n, s: speculative_decode(t, eagle3, p, n, 2, s, 0.0, tree),
                                      tree.size + 1),
    }
    for block in DFLASH_BLOCKS:
        decoders[("dflash", f"block {block}")] = (
            lambda t, p, n, s, block=block: dflash_decode(t, dflash, p, n, block, s), block)
    return decoders


def _evaluate(model, tokenizer, trained: dict, args) -> list[dict]:
    """Every held-out prompt decoded plainly and by every decoder, back to back; one row per decoder."""
    from tandem.speculative.decoding.decode import greedy_decode
    from tandem.speculative.decoding.evaluation import summarize
    from tandem.speculative.target.model import Eagle3TargetModel
    from tandem.speculative.training.data import default_prompt_path, prompt_ids, read_chat_jsonl

    target = Eagle3TargetModel(model)
    prompts = [prompt_ids(tokenizer, r.messages)
               for r in read_chat_jsonl(default_prompt_path("heldout"), limit=args.prompts)]
    stop = {tokenizer.eos_token_id}
    decoders = _decoders(trained, target.dtype)
    greedy, results = [], {key: [] for key in decoders}
    for index, prompt in enumerate(prompts):
        greedy.append(greedy_decode(target, prompt, args.max_new_tokens, stop))
        for key, (decode, _) in decoders.items():
            results[key].append(decode(target, prompt, args.max_new_tokens, stop))
        print(f"prompt {index + 1}/{len(prompts)} decoded", flush=True)
    step_ms = 1e3 * sum(r.wall_s for r in greedy) / sum(r.target_forwards for r in greedy)
    verify = verify_ms(model, tokenizer, sorted({1, *(n for _, n in decoders.values())}))
    rows = []
    for (method, decoding), (_, verified) in decoders.items():
        summary = summarize(greedy, results[(method, decoding)])
        spec = results[(method, decoding)]
        round_ms = 1e3 * sum(r.wall_s for r in spec) / sum(r.target_forwards for r in spec)
        run = trained[method]
        # The verification's share of a round: its cost against a 1-token forward (timed alone), in the decodes'
        # own step time (which carries the decode loop's overheads as a round does).
        verifying = verify[verified] / verify[1] * step_ms
        rows.append({"method": method, "decoding": decoding, "acceptance_length": summary.acceptance_length,
                     "speedup": summary.speedup, "round_ms": round_ms, "verify_ms": verifying,
                     "draft_ms": round_ms - verifying, "breakeven_acceptance": round_ms / step_ms,
                     "outputs_match": summary.exact_up_to_ties, "train_steps": run["steps"],
                     "train_step_s": run["train_step_s"], "train_s": run["train_s"], "cache_s": run["cache_s"],
                     "verified_tokens": verified, "greedy_step_ms": step_ms, "prompts": summary.prompts,
                     "new_tokens": summary.new_tokens, "diverged": summary.diverged,
                     "verify_vs_step": verify[verified] / verify[1], "plain_step_verify_ms": verify[1]})
    return rows


def main(argv=None) -> int:
    p = common.parser(__doc__.splitlines()[0], runs=1)
    p.add_argument("--data", default="runs/demo/train_regenerated.jsonl",
                   help="regenerated chat JSONL (the demo's OUT/train_regenerated.jsonl)")
    p.add_argument("--target", default="default", help="the target the data was regenerated by (default: SmolLM2)")
    p.add_argument("--dtype", default="auto", help="target dtype (auto: bf16 where native, else float32)")
    p.add_argument("--train-seconds", type=float, default=300.0, help="training wall time of each method")
    p.add_argument("--calibration-steps", type=int, default=8,
                   help="real training steps timed first, to size each run to --train-seconds")
    p.add_argument("--prompts", type=int, default=8, help="held-out prompts decoded")
    p.add_argument("--max-new-tokens", type=int, default=48, help="tokens decoded a prompt")
    p.add_argument("--work", type=Path, default=Path("runs/bench_draft_methods"),
                   help="scratch directory: supervision caches and the two training runs")
    args = common.settle(p.parse_args(argv))
    if args.quick:
        import tempfile

        args.work = Path(tempfile.mkdtemp(prefix="bench_draft_methods_"))
        args.train_seconds, args.prompts, args.max_new_tokens, args.calibration_steps = 2.0, 2, 8, 2
    torch.manual_seed(0)
    model, tokenizer, data = _load(args)
    spec = str(args.work / "tiny-target") if args.quick else args.target
    trained = {}
    for method, config in _train_configs(args, data, spec).items():
        trained[method] = _train(model, tokenizer, config, args.train_seconds, args.calibration_steps)
        print(f"{method}: {trained[method]['steps']} steps in {trained[method]['train_s']:.0f} s "
              f"(estimated {trained[method]['estimated_step_s']:.2f} s a step)", flush=True)
    rows = _evaluate(model, tokenizer, trained, args)
    notes = [f"plain decoding: {rows[0]['greedy_step_ms']:.1f} ms a token; dtype "
             f"{str(next(model.parameters()).dtype).removeprefix('torch.')}; {args.prompts} held-out prompts x "
             f"{args.max_new_tokens} tokens"]
    common.publish("bench_draft_methods", "EAGLE-3 vs DFlash: same data, same training time", rows, args,
                   common.format_table(rows, COLUMNS), notes)
    print(notes[0])
    return 0 if all(r["outputs_match"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
