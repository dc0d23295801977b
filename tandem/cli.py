"""``tandem``: train EAGLE-3 drafts against a local or remote target, and serve targets.

    tandem demo                                   # the whole story on SmolLM2-135M, a few minutes on CPU
    tandem regenerate --input train --output data/train.jsonl
    tandem train --data data/train.jsonl --output-dir runs/draft --total-steps 400
    tandem train --nproc-per-node 8 --data data/train.jsonl --output-dir runs/draft   # DDP via torchrun
    tandem eval --draft runs/draft/eagle3-draft --limit 20
    tandem export --draft runs/draft/eagle3-draft --format speculators --output runs/draft/eagle3-speculators
    tandem serve-target --model default --port 8001
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from tandem.config_cli import add_config_arguments, config_from_args
from tandem.speculative.remote.errors import RemoteTargetError

logger = logging.getLogger("tandem")


def _resolve_prompts(spec: str):
    from pathlib import Path

    from tandem.speculative.training.data import PROMPT_SPLITS, default_prompt_path

    return default_prompt_path(spec) if spec in PROMPT_SPLITS else Path(spec)


def cmd_regenerate(args) -> int:
    from tandem.models import load_target
    from tandem.speculative.training.regenerate import regenerate_file

    model, tokenizer = load_target(args.model, dtype=args.dtype)
    count = regenerate_file(model, tokenizer, _resolve_prompts(args.input), args.output,
                            max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, limit=args.limit)
    print(f"wrote {count} conversations to {args.output}")
    return 0


def _without_nproc_flag(train_argv: list[str]) -> list[str]:
    kept, skip = [], False
    for arg in train_argv:
        if skip:
            skip = False
        elif arg == "--nproc-per-node":
            skip = True
        elif not arg.startswith("--nproc-per-node="):
            kept.append(arg)
    return kept


def cmd_train(args) -> int:
    from tandem.speculative.training.config import TrainConfig
    from tandem.speculative.training.trainer import train

    if args.nproc_per_node and "TORCHELASTIC_RUN_ID" not in os.environ:  # not yet under torchrun: become it
        from tandem.torchrun import relaunch_with_torchrun

        train_argv = _without_nproc_flag(args.argv[args.argv.index("train") + 1 :])
        return relaunch_with_torchrun(train_argv, args.nproc_per_node, args.log_level)
    base = TrainConfig.from_yaml(args.config) if args.config else None
    if args.target_url:
        args.target_urls = [*(args.target_urls or []), *args.target_url]
    config = config_from_args(TrainConfig, args, base)
    from tandem.speculative.training.methods import trainer_class_for
    from tandem.speculative.training.target_factory import build_target

    trainer = train(config, target_factory=build_target, trainer_class=trainer_class_for(config.method))
    if trainer.dist.is_main:
        print(f"trained {trainer.step} steps; draft exported to {trainer.export_dir}")
    return 0


def _check_draft_target(draft_dir, model, tokenizer, aux_layer_ids, spec: str, allow: bool, what: str) -> None:
    """The target ``model`` must be the one the exported draft records it was trained against."""
    from tandem.speculative.export.eagle3 import read_export_record
    from tandem.speculative.target import identity

    record = read_export_record(draft_dir)
    if record is None or not record.get("target"):
        logger.warning("%s: %s records no target (exported before tandem recorded one): it cannot be checked",
                       what, draft_dir)
        return
    current = identity.target_identity(model, aux_layer_ids, name=spec, tokenizer=tokenizer)
    identity.check_same_target(record["target"], current, what=what, allow=allow)


def _local_eval_target(args):
    """``(Eagle3TargetModel, tokenizer)`` of ``--model``, checked against the target the draft records."""
    from tandem.models import load_target
    from tandem.speculative.export.eagle3 import exported_aux_layer_ids
    from tandem.speculative.target.model import Eagle3TargetModel

    model, tokenizer = load_target(args.model, dtype=args.dtype)
    # The layers the draft was trained on, as its export records them, unless told otherwise.
    target = Eagle3TargetModel(model, args.aux_layer_ids or exported_aux_layer_ids(args.draft))
    _check_draft_target(args.draft, model, tokenizer, target.aux_layer_ids, args.model, args.allow_target_mismatch,
                        f"tandem eval of {args.draft} on {args.model}")
    return target, tokenizer


def _remote_eval_target(args):
    """``(RemoteEagle3TargetModel, tokenizer)`` for ``--target-url``: no target weights here, only the tokenizer
    (``--tokenizer``, default ``--model``); the server must serve the target and aux layers the draft records."""
    from tandem.models import load_tokenizer
    from tandem.speculative.export.eagle3 import exported_aux_layer_ids, read_export_record
    from tandem.speculative.remote.client import RemoteEagle3TargetModel
    from tandem.speculative.target import identity

    if args.aux_layer_ids:
        raise ValueError("--aux-layer-ids does not apply with --target-url: the server captures its own layers")
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    target = RemoteEagle3TargetModel(args.target_url, enable_nccl=False, timeout_s=args.request_timeout_s)
    try:
        what = f"tandem eval of {args.draft} against {args.target_url}"
        served, trained = target.model_info()["aux_layer_ids"], exported_aux_layer_ids(args.draft)
        if list(served) != list(trained):
            identity.check_same_target({"aux_layer_ids": trained}, {"aux_layer_ids": served}, what=what,
                                       fields=("aux_layer_ids",), allow=args.allow_target_mismatch)
        record = read_export_record(args.draft)
        if record and record.get("target"):
            identity.check_same_target(record["target"], identity.identity_of(target, tokenizer=tokenizer), what=what,
                                       allow=args.allow_target_mismatch)
        else:
            logger.warning("%s: %s records no target: it cannot be checked", what, args.draft)
    except BaseException:
        target.close()
        raise
    return target, tokenizer


def _tree_shape(text: str):
    """argparse type of ``--tree``: a ``draft_tree.TreeShape``, or ``auto`` (imported here: ``--help`` stays fast)."""
    from tandem.speculative.decoding.tree import TreeShape

    if text == "auto":
        return text
    try:
        return TreeShape.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _draft_tokens(text: str):
    """argparse type of ``--draft-tokens``: a positive count, or ``auto``."""
    if text == "auto":
        return text
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise argparse.ArgumentTypeError(f"--draft-tokens takes a count >= 1 or auto, got {text!r}")
    return count


def _auto_eval(args, target, draft, prompts: list, calibration: list, stop_ids: set) -> tuple[dict, bool]:
    """``--tree auto`` / ``--draft-tokens auto``: choose the shape on ``calibration``, measure it on ``prompts``,
    record the choice beside the draft; returns the result dict and whether every output equalled greedy."""
    from tandem.speculative.decoding.auto_shape import auto_shape, format_cost_curve
    from tandem.speculative.decoding.evaluation import evaluate_speculative
    from tandem.speculative.decoding.shape_choice import PLAIN, DecodingShape, candidate_shapes
    from tandem.speculative.export import recommendation

    shapes = candidate_shapes()
    if args.tree != "auto":  # --draft-tokens auto alone: chains only
        shapes = [s for s in shapes if s.kind == "chain"]
    choice = auto_shape(target, draft, calibration, args.max_new_tokens, stop_ids, shapes)
    print(format_cost_curve(choice), file=sys.stderr)
    best = choice.best_speculative
    shape = best.shape if best is not None else DecodingShape.chain(1)
    kwargs = {"tree": shape.tree} if shape.kind == "tree" else {"num_draft_tokens": shape.draft_tokens}
    summary = evaluate_speculative(target, draft, prompts, args.max_new_tokens, stop_ids=stop_ids, **kwargs)
    measured = summary.to_dict()
    result = dict(measured)
    if choice.chosen == PLAIN:  # what tandem decodes with: plain decoding, by definition 1.00x
        result.update(acceptance_length=1.0, speedup=1.0, speculative_tokens_per_s=measured["greedy_tokens_per_s"])
    result.update({"shape": str(choice.chosen), "predicted_speedup": round(choice.predicted_speedup, 3),
                   "decoded_shape": str(shape), "decoded_shape_predicted_speedup": round(best.predicted_speedup, 3)
                   if best else None, "decoded_shape_measured_speedup": round(summary.speedup, 3),
                   "shape_choice": choice.to_dict()})
    record = recommendation.recommendation(choice.to_dict(), target.dtype, measured if choice.chosen == shape else None)
    if args.record_shape:
        path = recommendation.write_recommendation(args.draft, record)
        result["recommendation"] = str(path)
    print(recommendation.describe(record), file=sys.stderr)
    return result, summary.outputs_match


def _eval_prompts(args, tokenizer) -> tuple[list, list]:
    """``(evaluated prompts, calibration prompts)``: the first ``--limit`` of ``--prompts``, and for ``auto`` the
    ``--calibration-prompts`` after them (the first ones again when the set has no more, with a warning)."""
    from tandem.speculative.training.data import prompt_ids, read_chat_jsonl

    auto = args.tree == "auto" or args.draft_tokens == "auto"
    wanted = args.limit + args.calibration_prompts if auto else args.limit
    records = read_chat_jsonl(_resolve_prompts(args.prompts), limit=wanted)
    prompts = [prompt_ids(tokenizer, r.messages) for r in records]
    evaluated, calibration = prompts[:args.limit], prompts[args.limit:]
    if auto and not calibration:
        logger.warning("%s has no prompts beyond the %d evaluated: the shape is chosen on evaluated ones, which "
                       "flatters the prediction", args.prompts, args.limit)
        calibration = evaluated[:args.calibration_prompts]
    return evaluated, calibration


def _dflash_eval_target(args, layer_ids: list[int]):
    """``(target, tokenizer)`` for a DFlash draft: ``--model`` here, or ``--target-url``; checked against the target
    (and layers) the draft's export records."""
    from tandem.speculative.export.dflash import read_dflash_record
    from tandem.speculative.target import identity

    record = read_dflash_record(args.draft)
    what = f"tandem eval of {args.draft}"
    if args.target_url:
        from tandem.models import load_tokenizer
        from tandem.speculative.remote.client import RemoteEagle3TargetModel

        tokenizer = load_tokenizer(args.tokenizer or args.model)
        target = RemoteEagle3TargetModel(args.target_url, enable_nccl=False, draft_method="dflash",
                                         aux_layer_ids=layer_ids, timeout_s=args.request_timeout_s)
        current = identity.identity_of(target, tokenizer=tokenizer)
    else:
        from tandem.models import load_target
        from tandem.speculative.target.model import Eagle3TargetModel

        model, tokenizer = load_target(args.model, dtype=args.dtype)
        target = Eagle3TargetModel(model, layer_ids, draft_method="dflash")
        current = identity.target_identity(model, layer_ids, name=args.model, tokenizer=tokenizer)
    if record and record.get("target"):
        identity.check_same_target(record["target"], current, what=what, allow=args.allow_target_mismatch)
    else:
        logger.warning("%s: the draft records no target: it cannot be checked", what)
    return target, tokenizer


def cmd_eval_dflash(args) -> int:
    """``tandem eval`` of an exported DFlash draft: one row per decode-time block size (``--block-size``)."""

    import torch

    from tandem.speculative.decoding.dflash_decode import evaluate_dflash
    from tandem.speculative.export.dflash import checked_dflash_config, load_dflash_draft
    from tandem.speculative.training.data import prompt_ids, read_chat_jsonl

    config = checked_dflash_config(args.draft)  # before the target loads: a refusal costs nothing
    target, tokenizer = _dflash_eval_target(args, config.target_layer_ids)
    try:
        if args.target_url:  # the head through /draft_lm_head: the whole vocabulary is the "draft" vocabulary
            vocab = target.model_info()["vocab_size"]
            target.set_vocab_mapping(torch.arange(vocab), torch.ones(vocab, dtype=torch.bool))
            head = target.draft_lm_head()
        else:
            head = target.model.get_output_embeddings().weight.detach()
        draft = load_dflash_draft(args.draft, target.get_input_embeddings().cpu(), head.cpu())
        records = read_chat_jsonl(_resolve_prompts(args.prompts), limit=args.limit)
        prompts = [prompt_ids(tokenizer, r.messages) for r in records]
        summaries = evaluate_dflash(target, draft, prompts, args.max_new_tokens, args.block_size,
                                    stop_ids={tokenizer.eos_token_id})
    finally:
        if args.target_url:
            target.close()
    rows = {f"block_{size}": summary.to_dict() for size, summary in summaries.items()}
    print(json.dumps({"method": "dflash", **rows, **({"target_url": args.target_url} if args.target_url else {})},
                     indent=2))
    return 0 if all(s.outputs_match for s in summaries.values()) else 1


def cmd_eval(args) -> int:
    from tandem.speculative.decoding.evaluation import evaluate_speculative, teacher_forced_accuracy
    from tandem.speculative.export.dflash import is_dflash_export
    from tandem.speculative.export.eagle3 import load_exported_draft

    if is_dflash_export(args.draft):
        return cmd_eval_dflash(args)
    if args.block_size:
        raise ValueError("--block-size is for DFlash drafts; an EAGLE-3 draft drafts --draft-tokens or a --tree")
    draft = load_exported_draft(args.draft)
    target, tokenizer = _remote_eval_target(args) if args.target_url else _local_eval_target(args)
    try:
        prompts, calibration = _eval_prompts(args, tokenizer)
        stop_ids = {tokenizer.eos_token_id}
        if args.tree == "auto" or args.draft_tokens == "auto":
            result, exact = _auto_eval(args, target, draft, prompts, calibration, stop_ids)
        else:
            summary = evaluate_speculative(target, draft, prompts, args.max_new_tokens, args.draft_tokens,
                                           stop_ids=stop_ids, min_confidence=args.min_confidence, tree=args.tree)
            result, exact = summary.to_dict(), summary.outputs_match
            if args.tree is not None:
                result["tree"] = str(args.tree)
        if args.step0_accuracy:
            result["step0_accuracy"] = teacher_forced_accuracy(target, draft, prompts, args.max_new_tokens, stop_ids)
    finally:
        if args.target_url:
            target.close()
    if args.target_url:
        result["target_url"] = args.target_url
    print(json.dumps(result, indent=2))
    return 0 if exact else 1


def cmd_export(args) -> int:
    import json as _json
    from pathlib import Path

    from tandem.speculative.export import eagle3 as draft_export
    from tandem.speculative.export.engine_conventions import dtype_name, parse_dtype

    source = Path(args.draft)
    draft = draft_export.load_exported_draft(source)
    record = draft_export.read_export_record(source)
    target = (record or {}).get("target") or {}
    stored = _json.loads((source / "config.json").read_text())
    stored_dtype = stored.get("torch_dtype") or (stored.get("transformer_layer_config") or {}).get("torch_dtype")
    dtype = parse_dtype(args.export_dtype or target.get("checkpoint_dtype") or target.get("dtype") or stored_dtype
                        or "float32")
    aux_layer_ids = draft_export.exported_aux_layer_ids(source)
    if args.model:
        from tandem.models import load_target

        model, tokenizer = load_target(args.model)
        _check_draft_target(source, model, tokenizer, aux_layer_ids, args.model, args.allow_target_mismatch,
                            f"tandem export of {source} for {args.model}")
    verifier = args.verifier or args.model or target.get("name") or ""
    out = draft_export.export_draft(draft, args.output, dtype, aux_layer_ids, export_format=args.format, record=record,
                            verifier=verifier, verifier_architectures=target.get("architectures"),
                            speculative_tokens=args.speculative_tokens)
    print(f"exported {source} as {args.format} ({dtype_name(dtype)}) to {out}")
    return 0


def cmd_cache_supervision(args) -> int:
    from tandem.speculative.training.config import TrainConfig
    from tandem.speculative.training.methods import trainer_class_for
    from tandem.speculative.training.target_factory import build_target

    base = TrainConfig.from_yaml(args.config) if args.config else None
    if args.target_url:
        args.target_urls = [*(args.target_urls or []), *args.target_url]
    config = config_from_args(TrainConfig, args, base)
    if not config.supervision_cache:
        raise ValueError("cache-supervision needs --supervision-cache DIR (where the answers go)")
    trainer = trainer_class_for(config.method)(config, target_factory=build_target)
    try:
        reused, computed = trainer.fill_supervision_cache()
    finally:
        if config.target_urls:
            trainer.target.close()
    refused = trainer.supervision_cache.refused
    replaced = f" ({refused} in place of entries that did not verify)" if refused else ""
    print(f"supervision cache {trainer.supervision_cache.directory}: "
          f"{computed} samples computed{replaced}, {reused} already there")
    return 0


def cmd_demo(args) -> int:
    from tandem.demo import DemoConfig, run_demo

    config = config_from_args(DemoConfig, args)
    if config.method == "dflash":
        from tandem.demo_dflash import run_dflash_demo

        return run_dflash_demo(config)
    if config.method != "eagle3":
        raise ValueError(f"--method must be eagle3 or dflash, got {config.method!r}")
    return run_demo(config)


def build_parser() -> argparse.ArgumentParser:
    from tandem.demo import DemoConfig
    from tandem.models import DTYPE_CHOICES
    from tandem.speculative.training.config import TrainConfig

    parser = argparse.ArgumentParser(prog="tandem", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default: INFO)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="regenerate data, train a draft on SmolLM2-135M, measure real speculative decoding")
    add_config_arguments(p, DemoConfig)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("regenerate", help="rewrite the assistant turns of chat JSONL with the target's own answers")
    p.add_argument("--model", default="default", help="target: default, an HF directory or a .gguf file")
    p.add_argument("--input", default="train", help="chat JSONL, or 'train' / 'heldout' for the shipped prompt set")
    p.add_argument("--output", required=True, help="where to write the regenerated messages JSONL")
    p.add_argument("--max-new-tokens", type=int, default=256, help="answer length limit (default: 256)")
    p.add_argument("--batch-size", type=int, default=64,
                   help="conversations generated together; more rows are faster until memory runs out (default: 64)")
    p.add_argument("--limit", type=int, default=None, help="only the first N conversations")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="target dtype; auto = bfloat16 where the hardware multiplies it natively (default: auto)")
    p.set_defaults(func=cmd_regenerate)

    p = sub.add_parser("train", help="train an EAGLE-3 draft (target in-process, or remote with --target-urls)")
    p.add_argument("--config", default=None, help="a YAML file of TrainConfig fields; flags override it")
    add_config_arguments(p, TrainConfig)
    p.add_argument("--target-url", action="append", default=None, metavar="URL",
                   help="a remote target server (tandem serve-target); repeat for several: each data-parallel "
                        "rank gets its own share of them (round-robin by rank), one rank uses them all")
    p.add_argument("--nproc-per-node", type=int, default=None, metavar="N",
                   help="data parallel on this node: re-launch as `torchrun --standalone --nproc-per-node N "
                        "-m tandem.train` with the other flags (default: one process)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("cache-supervision",
                       help="fill a supervision cache ahead of training: each sample's target answer, computed once",
                       description="Compute the target's answer for every sample of --data that the cache under "
                                   "--supervision-cache lacks (in-process, or from --target-url servers), so that "
                                   "`tandem train --supervision-cache DIR` with the same flags reads it instead of "
                                   "running the target. Takes the same flags as `tandem train`.")
    p.add_argument("--config", default=None, help="a YAML file of TrainConfig fields; flags override it")
    add_config_arguments(p, TrainConfig)
    p.add_argument("--target-url", action="append", default=None, metavar="URL",
                   help="a remote target server (tandem serve-target); repeat for several")
    p.set_defaults(func=cmd_cache_supervision)

    p = sub.add_parser("eval", help="measure a draft by real speculative decoding: acceptance length and speed-up")
    p.add_argument("--draft", required=True, help="an exported EAGLE-3 directory (config.json + model.safetensors)")
    p.add_argument("--model", default="default", help="the target the draft was trained for")
    p.add_argument("--target-url", default=None, metavar="URL",
                   help="decode against this running target server (tandem serve-target, through its /verify) "
                        "instead of loading --model here: no target weights on this machine, only the tokenizer; "
                        "plain and speculative decoding both go through the server, so the speed-up is a ratio of "
                        "two remote decodes (token: $TANDEM_TOKEN)")
    p.add_argument("--tokenizer", default=None,
                   help="with --target-url: the tokenizer that renders the prompts (default: --model)")
    p.add_argument("--request-timeout-s", type=float, default=300.0, metavar="SECONDS",
                   help="with --target-url: the most one request to the server may take, from connecting to the "
                        "answer's last byte, retries included; a server that sends nothing or drips its answer "
                        "is given up then (default: 300)")
    p.add_argument("--prompts", default="heldout", help="chat JSONL, or a shipped set: 'heldout', 'train' or 'unseen' "
                        "(default: heldout)")
    p.add_argument("--limit", type=int, default=20, help="number of prompts (default: 20)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per prompt (default: 64)")
    p.add_argument("--draft-tokens", type=_draft_tokens, default=4,
                   help="most tokens the draft proposes per round, or auto: the chain length that pays most on this "
                        "machine, measured (see --tree auto) (default: 4)")
    p.add_argument("--min-confidence", type=float, default=0.0,
                   help="dynamic draft length: stop a round's chain once the draft's probability of its next token "
                        "is below this (the output is unchanged; 0 always drafts --draft-tokens) (default: 0)")
    p.add_argument("--tree", type=_tree_shape, default=None, metavar="DEPTH,TOP_K,SIZE",
                   help="draft a tree instead of a chain (EAGLE-2 style): DEPTH draft forwards, each expanding the "
                        "TOP_K best-scored nodes into TOP_K children, and the SIZE best nodes verified in one target "
                        "forward (e.g. 3,8,24); the output is unchanged; --draft-tokens and --min-confidence then "
                        "do not apply. auto: measure this machine's cost of verifying n tokens against one and the "
                        "draft's acceptance of every chain and tree on --calibration-prompts, and decode with the "
                        "shape of most tokens a second, or plainly when none beats plain decoding; the choice, its "
                        "cost curve and the SGLang / vLLM flags are printed and recorded in DRAFT/decoding_shape.json")
    p.add_argument("--calibration-prompts", type=int, default=4,
                   help="with auto: prompts the shape is chosen on, those after the --limit evaluated ones in "
                        "--prompts (default: 4)")
    p.add_argument("--record-shape", action=argparse.BooleanOptionalAction, default=True,
                   help="with auto: write the chosen shape and the machine it was measured on to "
                        "DRAFT/decoding_shape.json (default: on)")
    p.add_argument("--aux-layer-ids", type=int, nargs=3, default=None,
                   help="the layers the draft was trained on (default: those its export records)")
    p.add_argument("--block-size", type=int, nargs="+", default=None,
                   help="DFlash drafts: the decode-time block sizes to measure, each at most the trained one "
                        "(default: the trained block)")
    p.add_argument("--allow-target-mismatch", action="store_true",
                   help="evaluate on a target other than the one the draft was trained against, on purpose")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="target dtype, and the draft's for decoding (default: auto; with --target-url the server's)")
    p.add_argument("--step0-accuracy", action="store_true",
                   help="also report how often the draft's first proposal is the target's greedy next token, "
                        "teacher-forced on the target's continuations of the same prompts; compare "
                        "--prompts train with --prompts heldout to see whether a draft memorised its data")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="write an exported draft again in another format or dtype (sglang | speculators)")
    p.add_argument("--draft", required=True, help="an exported EAGLE-3 directory (either format)")
    p.add_argument("--output", required=True, help="where to write the draft")
    p.add_argument("--format", default="sglang", choices=["sglang", "speculators"],
                   help="sglang: LlamaForCausalLMEagle3, loaded by SGLang and vLLM; speculators: vLLM's native "
                        "format (vllm-project/speculators) (default: sglang)")
    p.add_argument("--export-dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="weights dtype (default: the target checkpoint's, as recorded at training, else the dtype the "
                        "target ran in; else the draft's own)")
    p.add_argument("--verifier", default=None,
                   help="speculators format: the target's name or path (default: the one recorded at training)")
    p.add_argument("--speculative-tokens", type=int, default=3,
                   help="speculators format: tokens proposed per step when vLLM is not told (default: 3)")
    p.add_argument("--model", default=None,
                   help="the target the draft will be served with: checked against the one it was trained against")
    p.add_argument("--allow-target-mismatch", action="store_true",
                   help="export for a --model other than the target the draft was trained against, on purpose")
    p.set_defaults(func=cmd_export)

    from tandem.speculative.remote.serving.cli import add_serve_target_parser

    add_serve_target_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    # Under torchrun every rank logs to the same terminal: say which rank speaks.
    rank = f"[rank {os.environ['RANK']}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.INFO),
                        format=f"%(asctime)s %(levelname)s {rank}%(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RemoteTargetError) as error:
        logger.error("%s", error)
        return 2
    except KeyboardInterrupt:
        logger.warning("interrupted; the last checkpoint is kept (resume with --resume)")
        return 130


if __name__ == "__main__":
    sys.exit(main())
