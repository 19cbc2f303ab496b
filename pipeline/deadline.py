"""Training inside a wall-clock budget: the horizon of the schedules (learning rate, diagonal
shift, phase scale all end at run.n_iter) is re-estimated after every step from the recent step
times, so the schedules end when the time does, under any load.

A step count fixed once from a short calibration overran on a slower machine and left a third of
the budget unused when a passing load inflated the calibration. Here the estimate of the next
step's cost is the larger of the median of the last `window` steps and the mean of the last
three (a load that starts now counts at once, one slow step does not halve the horizon), and a
`reserve` for what follows training (final measurements) is recomputed from the recent sampling
cost and the measured cost of compilation. Compilation steps (the first `skip`) are left out of the estimates.

A fine-tuning phase (run.finetune_steps on the fully projected state, `Driver`) costs several
training steps a step: while training, the horizon keeps room for its steps at `tail_factor`
times a training step (the caller's estimate, e.g. the ratio of symmetry images); once it has
begun, its own measured steps after the first (which compiles and burns in) decide, and the
horizon moves without moving the schedules or the phase's start; it is cut at its start only when
short by at least one of its steps (not by the noise of its estimate). Its first step is reserved
apart (`phase_start_seconds`): it compiles the projected step and the projected sampler, and it
burns the chains in under the projection (run.sampler.n_thermalize sweeps). Reserving too much
costs nothing: once the phase has begun, the time left becomes more fine-tuning steps.
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
GROW = 3  # ... and, for a longer horizon, when the last GROW estimates all agree


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
    tail: int = 0  # fine-tuning steps at the end of the run (run.finetune_steps)
    tail_factor: float = 1.0  # their expected cost in training steps, until they are measured
    burn_in: float = 0.0  # the phase's burn-in sweeps, in units of a training step's sweeps
    steps: list[float] = field(default_factory=list)
    sweeps: list[float] = field(default_factory=list)
    energies: list[float] = field(default_factory=list)
    tail_steps: list[float] = field(default_factory=list)

    def record(self, rec: StepRecord, tail: bool = False) -> None:
        """A training step's times, or (`tail`) a fine-tuning step's."""
        if tail:
            self.tail_steps.append(rec.seconds)
            return
        self.steps.append(rec.seconds)
        self.sweeps.append(rec.t_sample)
        self.energies.append(rec.t_energy)

    def _recent(self, t: list[float], skip: int | None = None) -> list[float]:
        return (t[self.skip if skip is None else skip:] or t)[-self.window:]

    def step_seconds(self) -> float:
        """The expected cost of the next training step (see the module doc)."""
        return _expected(self._recent(self.steps))

    def tail_seconds(self) -> float:
        """The expected cost of the next fine-tuning step: from those done after the first
        (which compiles and burns in), else tail_factor training steps."""
        if len(self.tail_steps) > 1:
            return _expected(self._recent(self.tail_steps, 1))
        return self.tail_factor * self.step_seconds()

    def phase_seconds(self) -> tuple[float, float]:
        """Recent (sampling, local energies) seconds per step: medians over the window."""
        return statistics.median(self._recent(self.sweeps)), statistics.median(self._recent(self.energies))

    def compile_seconds(self) -> float:
        """What the costliest compilation step took beyond a recent step: the allowance for a
        compilation still to come (a measurement of another shape or projection)."""
        return max(max(self.steps[:self.skip], default=0.0) - self.step_seconds(), 0.0)

    def phase_start_seconds(self) -> float:
        """What the fine-tuning phase's first step costs beyond a later one: two compilations
        (its step, and its sampler, which the training compilation measured here does not
        include: creating the chains compiled it) and `burn_in` steps' sampling at tail_factor."""
        return 2 * self.compile_seconds() + self.burn_in * self.tail_factor * self.phase_seconds()[0]

    def reserve_seconds(self) -> float:
        return self.reserve(*self.phase_seconds(), self.compile_seconds())

    def horizon(self, step: int, now: float | None = None) -> int:
        """The total number of steps that fit: `step` done plus those the time left allows, the
        last `tail` of them (all that fit, once the fine-tuning phase has begun) fine-tuning."""
        left = self.end - (time.perf_counter() if now is None else now) - self.reserve_seconds()
        if len(self.steps) <= self.skip and not self.tail_steps:
            # compiling: these steps overstate the later ones, so go on while any time is left
            return step + max(int(left // min(self.steps)), int(left > 0))
        if self.tail_steps or not self.tail:
            cost = self.tail_seconds() if self.tail_steps else self.step_seconds()
            return step + max(int(left // cost), 0)
        left -= self.phase_start_seconds()
        tail_left = left - self.tail * self.tail_seconds()
        if tail_left < -self.tail_seconds():  # short by a phase step: it starts now, shorter
            return step + max(int(left // self.tail_seconds()), 0)
        # a shortfall of less than one phase step still starts the whole phase: its estimate,
        # tail x tail_factor training steps, moves by many training steps with a step's noise,
        # and would otherwise cut the phase at random at its start; its measured steps then decide
        return step + max(int(tail_left // self.step_seconds()), 0) + self.tail


def _expected(t: list[float]) -> float:
    """The larger of the median and the mean of the last three (see the module doc)."""
    return max(statistics.median(t), statistics.fmean(t[-3:]))


def _schedule_target(planned: int, recent: list[int], keep_phase: bool) -> int:
    """Where the schedules should end, given where they do (`planned`) and the last GROW
    horizons: a shrink by more than REBUILD (by any amount with a fine-tuning phase, which it
    would cut) counts at once; a growth only when all the recent horizons agree on more than
    REBUILD. Step times that alternate on a loaded machine swing the horizon by tens of percent
    from one step to the next: the schedules then rest at the lower horizon instead of being
    re-set at every step, and the run's stop (later, if anything) is at their final values."""
    new, low = recent[-1], min(recent)
    if new < planned * (1 - REBUILD) or (keep_phase and new < planned):
        return new
    if low > planned * (1 + REBUILD):
        return low
    return planned


def train(driver, state, deadline: Deadline, first_horizon: int,
          on_step: Callable[[object, StepRecord, int], None] | None = None):
    """Run `driver` from `state` until the deadline's horizon is reached; the driver's schedules
    follow the horizon (`Driver.set_horizon`) as `_schedule_target` says. Returns (state,
    horizon) with state.step == horizon. `first_horizon` holds until the compilation steps are
    done (the run ends there only if no time at all is left: a compilation step says little
    about the steps after it). A blown-up step rolls back as in `Driver.run`."""
    finetune = driver.cfg.run.finetune_steps
    deadline.tail = finetune
    deadline.burn_in = driver.cfg.sampler.n_thermalize / driver.n_per_chain
    horizon = planned = first_horizon  # where the run stops; where the schedules were set for
    driver.set_horizon(schedule_end(planned, finetune))
    proposed: list[int] = []  # the horizons estimated before fine-tuning
    snapshot = state
    while state.step < horizon:
        tail = finetune > 0 and state.step >= driver.switch
        state, rec, snapshot = driver.advance(state, snapshot)
        if rec is None:  # rolled back (`Driver.advance`)
            continue
        deadline.record(rec, tail)
        new = deadline.horizon(state.step)  # while compiling: from the compilation steps
        if new <= state.step:
            horizon = state.step
        elif tail or len(deadline.steps) > deadline.skip:
            # the stop follows every estimate (a stale one stopped runs a step early); the
            # schedules follow `_schedule_target`, and never move once fine-tuning has begun
            # (its start and learning rate stay)
            horizon = new
            if not tail:
                proposed.append(new)
                target = _schedule_target(planned, proposed[-GROW:], finetune > 0)
                if target != planned:
                    planned = target
                    driver.set_horizon(schedule_end(planned, finetune))
        if on_step:
            on_step(state, rec, horizon)
    return state, horizon
