"""``--time-limit-min``: keep a training run to a wall-clock budget on a machine whose speed is not known ahead.

Two decisions, both from the steps measured in this run: at a few points of the run (10 steps in, then every
tenth of the schedule) the schedule is fitted to the steps that fit, so the learning rate still ends its cosine
decay when the time does (a run stopped half-way at its peak learning rate trains a worse draft than a shorter
schedule run to its end); and after every step the run ends if one more step, with the final live evaluation
priced as the last one, would end past the limit. Live evaluations are taken out of the step rate and priced
apart, as the last one measured.

The rate is the one since the previous fitting point (the whole run's at the first), and a fitting may lengthen
the schedule again, up to the steps the run asked for: on a shared machine a minute of another job once priced
steps at 0.83 s against 0.38 s, and a schedule that could only shrink kept 326 of the 704 steps that fitted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

# A shorter schedule is adopted only when it saves more than this share of the remaining steps (and more than one
# step): noise in the step time must not shorten the schedule a step at a time.
MARGIN = 0.03
# The fewest steps a rate is measured over: fittings can fall a few steps apart when the schedule changes (they
# come every tenth of it), and 12 steps' rate once moved a 795-step schedule to 770.
RATE_WINDOW = 30


@dataclass
class TimeLimit:
    """The clock of one run: ``limit_s`` seconds from its creation, counting from step ``start_step``."""

    limit_s: float
    start_step: int
    started: float = field(default_factory=time.perf_counter)
    eval_s: float = 0.0
    """Seconds spent in live evaluations so far."""
    last_eval_s: float = 0.0
    mark: tuple[float, int, float] | None = None
    """``(elapsed_s, step, eval_s)`` at the last fitting: the step rate is measured from there."""

    def elapsed_s(self) -> float:
        return time.perf_counter() - self.started

    def record_eval(self, seconds: float) -> None:
        self.eval_s += seconds
        self.last_eval_s = seconds

    def replan_due(self, step: int, total_steps: int) -> bool:
        """Whether ``step`` is one of the points where the schedule is fitted to the time left."""
        done = step - self.start_step
        return done == 10 or (done > 10 and done % max(total_steps // 10, 1) == 0)

    def seconds_a_step(self, step: int) -> float:
        """Training seconds a step since the last fitting when that is ``RATE_WINDOW`` steps back or more, else
        since the start."""
        elapsed = self.elapsed_s()
        if self.mark is not None and step - self.mark[1] >= RATE_WINDOW:
            then, then_step, then_eval = self.mark
            return max(elapsed - then - (self.eval_s - then_eval), 1e-9) / (step - then_step)
        return max(elapsed - self.eval_s, 1e-9) / max(step - self.start_step, 1)

    def steps_that_fit(self, step: int, evals_left: int) -> int:
        """The last step the run can reach in its limit, at the step rate measured (``seconds_a_step``),
        ``evals_left`` live evaluations priced as the last one."""
        left = self.limit_s - self.elapsed_s() - evals_left * self.last_eval_s
        return step + max(int(left / self.seconds_a_step(step)), 0)

    def fitted_schedule(self, step: int, total_steps: int, asked_steps: int, evals_left: int) -> int | None:
        """The new ``total_steps`` when the steps that fit (at most ``asked_steps``, never below ``step + 1``)
        differ from the current one by more than the noise margin, else None; measures the rate from here on."""
        fit = min(self.steps_that_fit(step, evals_left), asked_steps)
        self.mark = (self.elapsed_s(), step, self.eval_s)
        if abs(fit - total_steps) <= max(MARGIN * (total_steps - step), 1.0):
            return None
        return max(fit, step + 1)

    def out_of_time(self, step_time_s: float, final_eval: bool) -> bool:
        """Whether one more step (and the final live evaluation, if any) would end past the limit."""
        ahead = step_time_s + (self.last_eval_s if final_eval else 0.0)
        return self.elapsed_s() + ahead > self.limit_s
