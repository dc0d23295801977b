"""Speculative decoding through a target server (``/verify``) against the same decode in-process; bytes a round.

    .venv/bin/python -m bench.bench_verify                         # SmolLM2-135M in the dtype auto picks
    .venv/bin/python -m bench.bench_verify --draft runs/demo/train/eagle3-draft --prompts 4
    .venv/bin/python -m bench.bench_verify --quick                 # a tiny random Llama, seconds

For each held-out prompt, four decodes run back to back (so a noisy machine slows all alike): plain greedy
and speculative decoding with the target in this process, and both again through a ``tandem serve-target``
subprocess on loopback (one ``/verify`` a round, the KV cache kept on the server). The ratios say what the
HTTP round trip costs a decode (limit: the in-process decode) and what speed-up the draft gives on either
path (limit: plain greedy decoding on the same path). Then the cost of one ``--eval-every`` evaluation
(``live_eval.LiveEvaluator``) of those prompts through the server: the first (which also decodes each
prompt's greedy reference once) and a later one. The bytes a round carries are counted from the wire format.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from bench import common

COLUMNS = (("figure", "figure", "s"), ("ms", "ms", ".1f"), ("limit", "limit", "s"), ("limit ms", "limit_ms", ".1f"),
           ("ratio", "ratio", ".2f"))


def _setup(args, directory: Path):
    """``(in-process target, draft, prompts, stop ids, model dir or spec)``."""
    from tandem.models import load_target
    from tandem.speculative.drafts.eagle3 import Eagle3DraftConfig, Eagle3DraftModel
    from tandem.speculative.export.eagle3 import exported_aux_layer_ids, load_exported_draft
    from tandem.speculative.target.model import Eagle3TargetModel
    from tandem.speculative.training.data import default_prompt_path, prompt_ids, read_chat_jsonl

    if args.quick:
        from tests.speculative.remote.remote_utils import save_tiny_target

        spec = str(save_tiny_target(directory / "target"))
    else:
        spec = "default"
    model, tokenizer = load_target(spec, dtype=args.dtype)
    target = Eagle3TargetModel(model, exported_aux_layer_ids(args.draft) if args.draft else None)
    if args.draft:
        draft = load_exported_draft(args.draft)
    else:  # an untrained draft: the costs of a round, whatever it accepts
        torch.manual_seed(0)
        draft = Eagle3DraftModel(Eagle3DraftConfig.from_target_config(model.config, min(4096, model.config.vocab_size)))
        draft.seed_from_target(target.get_input_embeddings(), torch.arange(draft.lm_head.out_features),
                               seed_lm_head=True)
    records = read_chat_jsonl(default_prompt_path("heldout"), limit=args.prompts)
    prompts = [prompt_ids(tokenizer, r.messages) for r in records]
    return target, draft, prompts, {tokenizer.eos_token_id}, spec


def _round_bytes(hidden: int, dtype: torch.dtype, new: int) -> tuple[int, int]:
    """Wire bytes of a ``/verify`` request and answer carrying ``new`` positions (HTTP headers excluded)."""
    from tandem.speculative.remote import protocol, wire

    request = wire.body_size(wire.encode({"input_ids": torch.zeros(1, new, dtype=torch.long)}))
    answer = dict(zip(protocol.VERIFY_ANSWER_KEYS,
                      (torch.zeros(1, new, dtype=torch.long), torch.zeros(1, new, dtype=torch.bool),
                       torch.zeros(1, new, 3 * hidden, dtype=dtype))))
    return request, wire.body_size(wire.encode(answer))


def main(argv=None) -> list[dict]:
    p = common.parser(__doc__.split("\n")[0], runs=1, warmup=0)
    p.add_argument("--draft", default=None, help="an exported draft (default: an untrained one of the target's shape)")
    p.add_argument("--prompts", type=int, default=4, help="held-out prompts decoded (default: 4)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--draft-tokens", type=int, default=4)
    p.add_argument("--dtype", default="auto")
    args = common.settle(p.parse_args(argv))
    if args.quick:
        args.prompts, args.max_new_tokens = min(args.prompts, 2), min(args.max_new_tokens, 12)
    from tandem.speculative.decoding.decode import for_decoding, greedy_decode, speculative_decode
    from tandem.speculative.decoding.live_eval import LiveEvaluator
    from tandem.speculative.remote.client import RemoteEagle3TargetModel
    from tandem.speculative.remote.launch import start_target_server

    with tempfile.TemporaryDirectory() as tmp:
        target, draft, prompts, stop_ids, spec = _setup(args, Path(tmp))
        draft = for_decoding(draft, target.dtype)
        dtype_name = str(target.dtype).removeprefix("torch.")
        server = start_target_server(spec, log_path=Path(tmp) / "serve-target.log",
                                     extra_args=("--dtype", dtype_name, "--no-nccl", "--device", "cpu"))
        try:
            remote = RemoteEagle3TargetModel(server.url, enable_nccl=False)
            n, k = args.max_new_tokens, args.draft_tokens
            cases = {
                "greedy, in-process": lambda p: greedy_decode(target, p, n, stop_ids),
                "greedy, via server": lambda p: greedy_decode(remote, p, n, stop_ids),
                "speculative, in-process": lambda p: speculative_decode(target, draft, p, n, k, stop_ids),
                "speculative, via server": lambda p: speculative_decode(remote, draft, p, n, k, stop_ids),
            }
            for case in cases.values():  # warm-up: first-call costs (allocations, the server's first forward)
                case(prompts[0])
            times = {name: 0.0 for name in cases}
            rounds = tokens = 0
            for prompt in prompts:
                for name, case in cases.items():
                    result = case(prompt)
                    times[name] += result.wall_s
                    if name == "speculative, via server":
                        rounds, tokens = rounds + result.target_forwards - 1, tokens + len(result.tokens) - 1
            evaluator = LiveEvaluator(remote, prompts, n, k, stop_ids=stop_ids)
            started = time.perf_counter()
            evaluator.measure(draft)
            first_eval = time.perf_counter() - started
            started = time.perf_counter()
            measured = evaluator.measure(draft)
            later_eval = time.perf_counter() - started
            remote.close()
        finally:
            server.stop()

    def row(figure, ours, limit):
        return {"figure": figure, "ms": 1000 * times[ours] / len(prompts), "limit": limit,
                "limit_ms": 1000 * times[limit] / len(prompts), "ratio": times[limit] / times[ours]}

    rows = [row("greedy via server", "greedy, via server", "greedy, in-process"),
            row("speculative via server", "speculative, via server", "speculative, in-process"),
            row("speculative, in-process", "speculative, in-process", "greedy, in-process"),
            row("speculative via server", "speculative, via server", "greedy, via server")]
    hidden = target.model.config.hidden_size
    request, answer = _round_bytes(hidden, target.dtype, k + 1)
    notes = [
        f"{spec} in {dtype_name}, {len(prompts)} held-out prompts x {n} new tokens, chains of up to {k} draft tokens; "
        f"ms per prompt; ratio = limit / figure",
        f"a speculative round via the server sends {request} B and receives {answer} B (up to {k + 1} positions: "
        f"ids, near-tie flags and {k + 1} x 3 x {hidden} aux values in {dtype_name}) plus HTTP headers; "
        f"acceptance {tokens / max(rounds, 1):.2f} tokens a round",
        f"one --eval-every evaluation of these prompts via the server: {first_eval:.1f} s the first time (greedy "
        f"references included), {later_eval:.1f} s later ({later_eval / len(prompts):.2f} s a prompt; measured "
        f"acceptance {measured['eval_acceptance_length']:.2f})",
    ]
    table = common.format_table(rows, COLUMNS) + "\n" + "\n".join(notes)
    common.publish("bench_verify", "speculative decoding via /verify vs in-process", rows, args, table, notes)
    return rows


if __name__ == "__main__":
    main()
