"""The demo's time budget: the plan fits the budget at the measured rates, and a slower machine gets a smaller run."""

from tandem.demo_budget import Rates, Workload, plan_demo

FAST = Rates(generate_tokens_per_s=400, forward_tokens_per_s=2000, train_step_s=0.26, decode_token_s=0.04)
SLOW = Rates(generate_tokens_per_s=250, forward_tokens_per_s=445, train_step_s=0.9, decode_token_s=0.05)


def workload(**overrides) -> Workload:
    fields = dict(budget_s=900.0, elapsed_s=20.0, prompts_available=472, prompt_tokens=40.0, answer_tokens=96,
                  batch_size=4, eval_tokens=3000, live_eval_tokens=400)
    fields.update(overrides)
    return Workload(**fields)


def test_the_plan_fits_the_budget_and_a_slower_machine_gets_a_smaller_run():
    # More prompts than either machine can regenerate, so the prompt count is the budget's choice.
    fast, slow = plan_demo(workload(prompts_available=5000), FAST), plan_demo(workload(prompts_available=5000), SLOW)
    for plan in (fast, slow):
        assert plan.estimates_s["total_s"] <= 900 * 1.01, plan
    assert slow.train_prompts < fast.train_prompts and slow.total_steps < fast.total_steps
    assert slow.estimates_s["train_s"] == round(slow.total_steps * SLOW.train_step_s, 1)


def test_data_kept_from_an_earlier_run_leaves_the_training_more_steps():
    fresh = plan_demo(workload(), SLOW)
    reused = plan_demo(workload(data_reused=True), SLOW)
    assert reused.estimates_s["data_s"] == 0 and reused.total_steps > fresh.total_steps
    assert reused.train_prompts == 472


def test_a_budget_too_small_says_so():
    plan = plan_demo(workload(budget_s=120.0), SLOW)
    assert plan.total_steps >= 20 and any("cannot fit the budget" in note for note in plan.notes)


def test_a_fast_trainer_buys_more_prompts_rather_than_more_epochs_of_few():
    # Training steps so cheap that the data share's prompts would be trained past the epoch cap.
    cheap = Rates(generate_tokens_per_s=250, forward_tokens_per_s=445, train_step_s=0.05, decode_token_s=0.05)
    plan = plan_demo(workload(), cheap)
    share = plan_demo(workload(data_share=0.45, max_epochs=1e9), cheap)
    assert plan.train_prompts > share.train_prompts
    assert plan.total_steps <= 12 * plan.train_prompts / 4 + 1
    assert plan.estimates_s["total_s"] <= 900 * 1.01


def test_live_evaluations_are_dropped_when_they_would_eat_the_training():
    cheap = plan_demo(workload(live_eval_tokens=50), FAST)
    assert cheap.live_eval_every == cheap.total_steps // 2 and cheap.estimates_s["live_eval_s"] > 0
    dear = plan_demo(workload(live_eval_tokens=2000), FAST)  # 2 x 80 s against ~290 s of training
    assert dear.live_eval_every == 0 and dear.estimates_s["live_eval_s"] == 0
    assert any("no live evaluations" in note for note in dear.notes)
    assert dear.total_steps >= cheap.total_steps  # the time goes to the training
    assert dear.estimates_s["total_s"] <= 900 * 1.01
