"""--time-limit-min: the schedule is fitted to the steps that fit, and the run ends before the limit."""

import time

from tandem.speculative.training.time_limit import TimeLimit


def clock_at(elapsed_s: float, limit_s: float = 100.0, start_step: int = 0) -> TimeLimit:
    return TimeLimit(limit_s, start_step, started=time.perf_counter() - elapsed_s)


def test_the_schedule_shrinks_to_the_steps_that_fit_at_the_measured_rate():
    clock = clock_at(50.0)  # 10 steps in 50 s: 5 s a step, 50 s left
    assert clock.steps_that_fit(10, evals_left=0) == 19  # 49.99.. s left: 9 more whole steps
    assert clock.fitted_schedule(10, 40, 40, evals_left=0) == 19
    assert clock_at(50.0).fitted_schedule(10, 19, 40, evals_left=0) is None  # fits already


def test_the_schedule_grows_back_when_steps_speed_up_but_never_past_what_was_asked():
    clock = clock_at(50.0, limit_s=200.0)  # 5 s a step over the first 10 steps: 39 fit in the 150 s left
    assert clock.fitted_schedule(10, 100, 100, evals_left=0) == 39
    clock.started -= 30.0  # the next 30 steps took 30 s: 1 s a step since the fitting, 120 s left
    assert clock.seconds_a_step(40) < 1.01
    assert clock.fitted_schedule(40, 39, 200, evals_left=0) == 159
    clock.started -= 15.0  # 30 more steps in 15 s: 0.5 s a step, 105 s left: 280 would fit, 200 were asked for
    assert clock.fitted_schedule(70, 159, 200, evals_left=0) == 200
    assert abs(clock.seconds_a_step(75) - 95.0 / 75) < 0.01  # 5 steps since the fitting: the whole run's rate


def test_live_evaluations_are_priced_apart_from_the_step_rate():
    clock = clock_at(60.0)
    clock.record_eval(10.0)  # 10 of the 60 s were an evaluation: still 5 s a step
    assert clock.steps_that_fit(10, evals_left=0) == 17
    assert clock.steps_that_fit(10, evals_left=2) == 13  # two more evaluations of 10 s each


def test_noise_does_not_shorten_the_schedule_a_step_at_a_time():
    clock = clock_at(50.0)
    assert clock.fitted_schedule(10, 20, 40, evals_left=0) is None  # one step over: within the margin
    assert clock_at(50.0).fitted_schedule(10, 18, 40, evals_left=0) is None  # one step under: within it too


def test_replans_happen_ten_steps_in_then_every_tenth_of_the_schedule():
    clock = TimeLimit(100.0, start_step=5)
    due = [step for step in range(5, 206) if clock.replan_due(step, 200)]
    assert due == [15, 25, 45, 65, 85, 105, 125, 145, 165, 185, 205]


def test_one_more_step_past_the_limit_is_out_of_time():
    clock = clock_at(95.0)
    assert not clock.out_of_time(4.0, final_eval=False)
    assert clock.out_of_time(6.0, final_eval=False)
    clock.record_eval(3.0)
    assert clock.out_of_time(4.0, final_eval=True)


def test_a_run_under_a_limit_shortens_its_schedule_and_ends_in_time(tmp_path, caplog):
    from tandem.speculative.training.trainer import Trainer
    from tests.conftest import build_tiny_tokenizer
    from tests.speculative.tiny_runs import peaked_target, tiny_run_config

    limit_s = 3.0
    trainer = Trainer(tiny_run_config(tmp_path, total_steps=100_000, save_every=0, time_limit_min=limit_s / 60),
                      target=peaked_target(), tokenizer=build_tiny_tokenizer())
    started = time.perf_counter()
    with caplog.at_level("WARNING"):
        trainer.train()
    assert "the schedule now spans" in caplog.text
    assert trainer.config.total_steps < 100_000 and trainer.step <= trainer.config.total_steps
    assert time.perf_counter() - started < limit_s + 10  # the export and the checkpoint come after the limit
