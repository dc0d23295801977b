"""``--time-limit-min``: keep a training run to a wall-clock budget on a machine whose speed is not known ahead.

Two decisions, both from the steps measured so far in this run: at a few points of the run (10 steps in, then
every tenth of the schedule) the schedule is shortened to the steps that fit, so the learning rate still ends its
cosine decay when the time does (a run stopped half-way at its peak learning rate trains a worse draft than a
shorter schedule run to its end); and after every step the run ends if one more step, with the final live
evaluation priced as the last one, would end past the limit. Live evaluations are taken out of the step rate
and priced apart, as the last one measured.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

# A shorter schedule is adopted only when it saves more than this share of the remaining steps (and more than one
# step): noise in the step time must not shorten the schedule a step at a time.
MARGIN = 0.03


@dataclass
class TimeLimit:
    """The clock of one run: ``limit_s`` seconds from its creation, counting from step ``start_step``."""

    limit_s: float
    start_step: int
    started: float = field(default_factory=time.perf_counter)
    eval_s: float = 0.0
    """Seconds spent in live evaluations so far."""
    last_eval_s: float = 0.0

    def elapsed_s(self) -> float:
        return time.perf_counter() - self.started

    def record_eval(self, seconds: float) -> None:
        self.eval_s += seconds
        self.last_eval_s = seconds

    def replan_due(self, step: int, total_steps: int) -> bool:
        """Whether ``step`` is one of the points where the schedule is fitted to the time left."""
        done = step - self.start_step
        return done == 10 or (done > 10 and done % max(total_steps // 10, 1) == 0)

    def steps_that_fit(self, step: int, evals_left: int) -> int:
        """The last step the run can reach in its limit, at the step rate measured so far, ``evals_left`` live
        evaluations priced as the last one."""
        done = max(step - self.start_step, 1)
        per_step = max(self.elapsed_s() - self.eval_s, 1e-9) / done
        left = self.limit_s - self.elapsed_s() - evals_left * self.last_eval_s
        return step + max(int(left / per_step), 0)

    def shorter_schedule(self, step: int, total_steps: int, evals_left: int) -> int | None:
        """The shortened ``total_steps`` when the current one does not fit (never below ``step + 1``), else None."""
        fit = self.steps_that_fit(step, evals_left)
        if fit >= total_steps - max(MARGIN * (total_steps - step), 1.0):
            return None
        return max(fit, step + 1)

    def out_of_time(self, step_time_s: float, final_eval: bool) -> bool:
        """Whether one more step (and the final live evaluation, if any) would end past the limit."""
        ahead = step_time_s + (self.last_eval_s if final_eval else 0.0)
        return self.elapsed_s() + ahead > self.limit_s
