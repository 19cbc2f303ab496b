"""Training inside a wall-clock budget: the horizon of the schedules (learning rate, diagonal
shift, phase scale all end at run.n_iter) is re-estimated after every step from the recent step
times, so the schedules end when the time does, under any load.

A step count fixed once from a short calibration overran on a slower machine and left a third of
the budget unused when a passing load inflated the calibration. Here the estimate of the next
step's cost is the larger of the median of the last `window` steps and the mean of the last
three (a load that starts now counts at once, one slow step does not halve the horizon), and a
`reserve` for what follows training (final measurements) is recomputed from the recent sampling
cost and the measured cost of compilation. Compilation steps (the first `skip`) are left out of the estimates.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

from .records import StepRecord

WINDOW = 8
SKIP = 2  # the first steps compile
REBUILD = 0.02  # the schedules are re-set when the horizon moves by more than this fraction


def schedule_end(horizon: int, finetune_steps: int) -> int:
    """Where the schedules reach their final values for a run that should end at `horizon`: a
    margin of twice the rebuild threshold (at least 2 steps) before it, so a run that the clock
    stops a little early (a load arriving near the end) still ends at the final learning rate.
    With a fine-tuning phase the schedules are final before it anyway, and moving its start would
    lengthen that phase of expensive projected steps: no margin then."""
    if finetune_steps:
        return horizon
    return max(1, horizon - max(2, math.ceil(2 * REBUILD * horizon)))


@dataclass
class Deadline:
    """When training must end, from `end` (a time.perf_counter() value) minus a reserve."""

    end: float
    reserve: Callable[[float, float, float], float]  # seconds kept after training, from the
    # recent seconds per step of sampling (one sweep of every chain) and of local energies, and
    # from the cost of one compilation (`compile_seconds`)
    window: int = WINDOW
    skip: int = SKIP
    steps: list[float] = field(default_factory=list)
    sweeps: list[float] = field(default_factory=list)
    energies: list[float] = field(default_factory=list)

    def record(self, rec: StepRecord) -> None:
        self.steps.append(rec.seconds)
        self.sweeps.append(rec.t_sample)
        self.energies.append(rec.t_energy)

    def _recent(self, t: list[float]) -> list[float]:
        return (t[self.skip:] or t)[-self.window:]

    def step_seconds(self) -> float:
        """The expected cost of the next step (see the module doc)."""
        t = self._recent(self.steps)
        return max(statistics.median(t), statistics.fmean(t[-3:]))

    def phase_seconds(self) -> tuple[float, float]:
        """Recent (sampling, local energies) seconds per step: medians over the window."""
        return statistics.median(self._recent(self.sweeps)), statistics.median(self._recent(self.energies))

    def compile_seconds(self) -> float:
        """What the costliest compilation step took beyond a recent step: the allowance for a
        compilation still to come (a measurement of another shape or projection)."""
        return max(max(self.steps[:self.skip], default=0.0) - self.step_seconds(), 0.0)

    def reserve_seconds(self) -> float:
        return self.reserve(*self.phase_seconds(), self.compile_seconds())

    def horizon(self, step: int, now: float | None = None) -> int:
        """The total number of steps that fit: `step` done plus those the time left allows."""
        left = self.end - (time.perf_counter() if now is None else now) - self.reserve_seconds()
        return step + max(int(left // self.step_seconds()), 0)


def train(driver, state, deadline: Deadline, first_horizon: int,
          on_step: Callable[[object, StepRecord, int], None] | None = None):
    """Run `driver` from `state` until the deadline's horizon is reached; the driver's schedules
    follow the horizon (`Driver.set_horizon`). Returns (state, horizon) with state.step ==
    horizon. `first_horizon` holds until the compilation steps are done (unless even they leave
    no time: then the run ends there). A blown-up step rolls back as in `Driver.run`."""
    horizon = first_horizon
    driver.set_horizon(schedule_end(horizon, driver.cfg.run.finetune_steps))
    snapshot = state
    while state.step < horizon:
        state, rec, snapshot = driver.advance(state, snapshot)
        if rec is None:  # rolled back (`Driver.advance`)
            continue
        deadline.record(rec)
        new = deadline.horizon(state.step)  # while compiling: from the compilation steps
        if new <= state.step:
            horizon = state.step
        elif len(deadline.steps) > deadline.skip and abs(new - horizon) > REBUILD * horizon:
            horizon = new
            driver.set_horizon(schedule_end(horizon, driver.cfg.run.finetune_steps))
        if on_step:
            on_step(state, rec, horizon)
    return state, horizon
