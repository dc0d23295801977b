"""The demo's time budget: measure this machine's rates in a few seconds, then size the run to fit.

A fixed recipe takes 13.5 minutes on a CPU with native bf16 and 38 on one computing in float32: the same work
at five times the cost. Here the demo measures, on the target it has just loaded, what its phases cost a
unit (a token regenerated, a token of supervision computed, a training step, a decoded token), reserves
what the evaluation and the fixed costs need, and gives the rest to data and training: ``data_share`` of it
to regenerating and caching as many shipped prompts as fit (distinct data: a short run memorises), the
remainder to training steps. Data and supervision kept from an earlier run cost nothing and leave the
training more. Every choice and the estimate behind it is logged and written to ``summary.json``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace

import torch

logger = logging.getLogger(__name__)


@dataclass
class Rates:
    """This machine's measured costs for the demo's target, in its dtype."""

    generate_tokens_per_s: float
    """Regeneration: new tokens a second, a batch of prompts decoding together."""
    forward_tokens_per_s: float
    """Supervision: tokens a second through a target forward of one training sample alone, on a thread of its own
    (how the supervision cache is filled through ``serve-target``)."""
    train_step_s: float
    """One training step (TTT unroll, backward, optimizer) on a batch of the demo's shape."""
    decode_token_s: float
    """One plain decoding step: a 1-token target forward on a KV cache."""


@dataclass
class Plan:
    """What the budget allows: prompts to regenerate and train on, training steps, live evaluations, and the
    estimated seconds of each phase."""

    train_prompts: int
    total_steps: int
    live_eval_every: int
    estimates_s: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    rates: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _timed(fn, repeat: int = 1) -> float:
    """Seconds of the fastest of ``repeat`` calls of ``fn`` after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def _timed_in_a_thread(fn) -> float:
    """``_timed(fn)`` run on a thread of its own, as ``tandem serve-target`` runs a request (one thread per
    connection). On a CPU a forward there costs 1.3-1.45x the same forward on the process's main thread (OpenMP's
    teams; docs/experiments.md), and the supervision cache is filled through the server, one sample a request."""
    import threading

    seconds: list[float] = []

    def body() -> None:
        with torch.no_grad():
            seconds.append(_timed(fn, repeat=2))

    worker = threading.Thread(target=body, name="tandem-rate")
    worker.start()
    worker.join()
    return seconds[0]


@torch.no_grad()
def _generation_rate(model, rows: int, prompt_tokens: int, new_tokens: int = 8) -> float:
    """New tokens a second of ``rows`` sequences decoding together on a KV cache after a prompt (the prefill is
    not timed: regeneration's prefill is priced with the supervision's forward rate)."""
    from transformers import DynamicCache

    ids = torch.randint(3, model.config.vocab_size, (rows, prompt_tokens))
    best = float("inf")
    for _ in range(2):  # the first run warms up
        cache = DynamicCache()
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
        started = time.perf_counter()
        for _ in range(new_tokens):
            out = model(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True)
        best = min(best, time.perf_counter() - started)
    return rows * new_tokens / best


def _train_step_s(model, batch: int, seq: int, ttt_steps: int, draft_vocab: int, dtype: torch.dtype) -> float:
    """One TTT step of a draft of the target's shape on random supervision of ``batch x seq`` tokens."""
    from tandem.speculative.drafts.eagle3 import Eagle3DraftConfig, Eagle3DraftModel
    from tandem.speculative.training.eagle3_loss import ttt_loss

    vocab = min(draft_vocab, model.config.vocab_size)
    draft = Eagle3DraftModel(Eagle3DraftConfig.from_target_config(model.config, vocab)).train()
    # Frozen as the trainer freezes it: the embedding's gradient and AdamW update would price a step at 1.75x.
    draft.seed_from_target(model.get_input_embeddings().weight)
    hidden = model.config.hidden_size
    supervision = {"aux_hidden_states": torch.randn(batch, seq, 3 * hidden, dtype=dtype),
                   "target_probs": torch.softmax(torch.randn(batch, seq, vocab), -1),
                   "position_mask": torch.ones(batch, seq, 1, dtype=torch.bool),
                   "input_ids": torch.randint(0, vocab, (batch, seq)), "loss_mask": torch.ones(batch, seq)}
    mask = torch.ones(batch, seq, dtype=torch.long)
    optimizer = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=1e-4)
    autocast = torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)

    def step() -> None:
        with autocast:
            loss = ttt_loss(draft, supervision, mask, ttt_steps=ttt_steps).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return _timed(step)


@torch.no_grad()
def measure_rates(model, *, batch_size: int, seq_len: int, ttt_steps: int, draft_vocab: int,
                  regen_rows: int = 16, prompt_tokens: int = 32) -> Rates:
    """The demo's unit costs on ``model`` (in its dtype), a few seconds in all."""
    from transformers import DynamicCache

    from tandem.speculative.decoding.verification import crop_cache

    dtype = next(model.parameters()).dtype
    ids = torch.randint(3, model.config.vocab_size, (batch_size, seq_len))
    forward = _timed_in_a_thread(lambda: model(input_ids=ids[:1], use_cache=False))
    cache = DynamicCache()
    model(input_ids=ids[:1, :prompt_tokens], past_key_values=cache, use_cache=True)
    one = ids[:1, :1]

    def decode_step() -> None:
        model(input_ids=one, past_key_values=cache, use_cache=True)
        crop_cache(cache, prompt_tokens)

    with torch.enable_grad():
        train = _train_step_s(model, batch_size, seq_len, ttt_steps, draft_vocab, dtype)
    return Rates(generate_tokens_per_s=_generation_rate(model, regen_rows, prompt_tokens),
                 forward_tokens_per_s=seq_len / forward, train_step_s=train,
                 decode_token_s=_timed(decode_step, repeat=5))


@dataclass(frozen=True)
class Workload:
    """What the demo will do, in the units ``Rates`` price."""

    budget_s: float
    elapsed_s: float
    prompts_available: int
    prompt_tokens: float
    answer_tokens: int
    batch_size: int
    eval_tokens: int
    """Decoded tokens of the final evaluation, plain and speculative, calibration and baselines included."""
    live_eval_tokens: int
    """Decoded tokens of one live evaluation."""
    data_reused: bool = False
    data_share: float = 0.6
    """Of the time left after the evaluation and the fixed costs, the share for regenerating and caching prompts.
    Distinct prompts beat steps in a short run: 472 prompts with 210 s of training beat 380 with 264 s (the same
    total; held-out step-0 accuracy 0.379 against 0.367: docs/training.md, third round)."""
    fixed_s: float = 30.0
    """Server start, export, plots and the evaluation child's start."""
    max_epochs: float = 12.0
    live_evals: int = 2
    max_live_eval_share: float = 0.1
    """Live evaluations are skipped when they would take more than this share of the training time: each costs
    about 50 s on a 2-vCPU float32 CPU, a quarter of the three minutes of training such a machine gets (the
    final evaluation measures the draft anyway)."""


def plan_demo(work: Workload, rates: Rates) -> Plan:
    """The largest run that fits ``work.budget_s`` at ``rates`` (see the module docstring)."""
    evaluate = work.eval_tokens * rates.decode_token_s
    live = work.live_evals * work.live_eval_tokens * rates.decode_token_s
    free = work.budget_s - work.elapsed_s - evaluate - work.fixed_s
    notes = []
    # Priced against the training they would interrupt (the data takes about data_share of the free time).
    if live and live > work.max_live_eval_share * (1 - work.data_share) * free:
        notes.append(f"no live evaluations: {work.live_evals} would take about {live:.0f} s of "
                     f"{(1 - work.data_share) * free:.0f} s of training")
        work = replace(work, live_evals=0)
        live = 0.0
    free -= live
    # Regeneration: the prompt's prefill and the answer's decoding; supervision: one forward over both.
    per_prompt = (work.answer_tokens / rates.generate_tokens_per_s
                  + (2 * work.prompt_tokens + work.answer_tokens) / rates.forward_tokens_per_s)
    if work.data_reused:
        prompts, data = work.prompts_available, 0.0
        notes.append(f"training data and supervision kept from an earlier run: {prompts} prompts, no data cost")
    else:
        prompts = int(min(work.prompts_available, max(work.data_share * free, 0) / per_prompt))
        # When the steps that fit would exceed max_epochs over those prompts, the time is better spent on more
        # distinct data (a short run memorises): the prompts at which the epoch cap and the budget meet.
        balanced = max(free, 0) / (per_prompt + work.max_epochs * rates.train_step_s / work.batch_size)
        if balanced > prompts:
            prompts = int(min(work.prompts_available, balanced))
            notes.append(f"more prompts than the {work.data_share:.0%} data share buys: at most {work.max_epochs:g} "
                         f"epochs over them use the rest of the budget")
        prompts = max(prompts, min(work.prompts_available, 4 * work.batch_size))
        data = prompts * per_prompt
        notes.append(f"{prompts} of {work.prompts_available} prompts regenerated and cached ({per_prompt:.2f} s each)")
    steps_fit = max(free - data, 0) / rates.train_step_s
    cap = work.max_epochs * prompts / work.batch_size
    steps = max(int(min(steps_fit, cap)), 20)
    if cap < steps_fit:
        notes.append(f"training capped at {work.max_epochs:g} epochs ({steps} steps; the budget allowed "
                     f"{int(steps_fit)})")
    estimates = {"data_s": data, "train_s": steps * rates.train_step_s, "evaluate_s": evaluate, "live_eval_s": live,
                 "fixed_s": work.fixed_s, "so_far_s": work.elapsed_s}
    total = sum(estimates.values())
    if total > work.budget_s * 1.02:
        notes.append(f"this machine cannot fit the budget: the smallest run is estimated at {total / 60:.1f} min")
    estimates["total_s"] = total
    return Plan(prompts, steps, max(steps // work.live_evals, 1) if work.live_evals else 0,
                {k: round(v, 1) for k, v in estimates.items()}, notes)


def budget_plan(config, model, tokenizer, elapsed_s: float, reusable_prompts: int = 0) -> Plan:
    """The plan for ``config`` (a ``demo.DemoConfig`` with a ``time_budget_min``) on the loaded target, ``elapsed_s``
    into the demo; ``reusable_prompts``: regenerated prompts an earlier run left for the same settings."""
    from tandem.speculative.training.data import default_prompt_path, read_chat_jsonl, render_ids

    records = read_chat_jsonl(default_prompt_path("train"), limit=config.train_prompts or None)
    lengths = [len(render_ids(tokenizer, r.messages[:1], add_generation_prompt=True)) for r in records]
    prompt_tokens = sum(lengths) / max(len(lengths), 1)
    seq = int(min(config.max_seq_len, prompt_tokens + config.regen_max_new_tokens))
    started = time.perf_counter()
    rates = measure_rates(model, batch_size=config.batch_size, seq_len=seq, ttt_steps=config.ttt_steps,
                          draft_vocab=config.draft_vocab_size)
    measuring = time.perf_counter() - started
    tokens = config.eval_max_new_tokens
    eval_tokens = tokens * (config.untrained_eval_prompts * 2.6 + (config.eval_prompts + config.unseen_prompts) * 2.2
                            + config.calibration_prompts * 5 + 2 * 4 + config.generalisation_prompts * 2)
    # A live evaluation chooses its shape (calibration decodes) and decodes through the server: measured at about
    # 6.4 decoded tokens' time per token it scores (49 s for 4 x 32 tokens at 60 ms, 2-vCPU AMD EPYC, float32).
    live = config.live_eval_prompts * config.live_eval_max_new_tokens * 6.4 if config.live_eval_every else 0
    work = Workload(budget_s=60 * config.time_budget_min, elapsed_s=elapsed_s + measuring,
                    prompts_available=len(records), prompt_tokens=prompt_tokens,
                    answer_tokens=config.regen_max_new_tokens, batch_size=config.batch_size,
                    eval_tokens=int(eval_tokens), live_eval_tokens=int(live),
                    data_reused=reusable_prompts > 0, live_evals=2 if config.live_eval_every else 0)
    if work.data_reused:
        work = Workload(**{**asdict(work), "prompts_available": reusable_prompts})
    plan = plan_demo(work, rates)
    plan.notes.insert(0, f"measured in {measuring:.1f} s: regeneration {rates.generate_tokens_per_s:.0f} tok/s, "
                         f"supervision {rates.forward_tokens_per_s:.0f} tok/s, a training step "
                         f"{rates.train_step_s:.2f} s ({config.batch_size} x {seq} tokens), a decoded token "
                         f"{1e3 * rates.decode_token_s:.1f} ms")
    plan.rates = asdict(rates)
    return plan
