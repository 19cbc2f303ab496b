"""Driver hooks: console progress, results file, checkpoints and signals (the side effects).

Each hook gets what it needs in its constructor and the run state in its callbacks; none reaches
back into the driver.
"""
from __future__ import annotations

import logging
import signal
import time
from typing import Any

import numpy as np
from jax.flatten_util import ravel_pytree

from . import checkpoint, dist, status
from .analysis import AttentionProbe
from .driver import RunState, StopRun
from .records import StepRecord
from .report import with_reference
from .results import ResultsWriter

log = logging.getLogger("vitnqs")


class BaseHook:
    """No-op hook methods; subclasses override what they need."""

    def on_run_start(self, state: RunState) -> None:
        pass

    def on_step_end(self, state: RunState, record: StepRecord) -> None:
        pass

    def on_rollback(self, state: RunState) -> None:
        pass

    def on_run_end(self, state: RunState, final: dict) -> None:
        pass


class ProgressHook(BaseHook):
    """A tqdm bar on rank 0 and a log line per step in every rank's log file."""

    def __init__(self, n_iter: int, bar: bool = True) -> None:
        self.n_iter, self.use_bar, self.bar = n_iter, bar, None

    def on_run_start(self, state: RunState) -> None:
        if self.use_bar and dist.is_root():
            from tqdm import tqdm

            self.bar = tqdm(total=self.n_iter, initial=state.step, unit="step",
                            dynamic_ncols=True, mininterval=1.0)

    def on_step_end(self, state: RunState, r: StepRecord) -> None:
        msg = (f"E/N={r.energy:+.6f}±{r.energy_error:.6f} var/N={r.variance:.4g} "
               f"acc={r.acceptance:.3f} minority={r.minority_sign:.4f} {r.seconds:.2f}s/step")
        log.info("step %d %s (sample %.3fs, energy %.3fs, sr %.3fs, cg %d, comm %d B)",
                 r.step, msg, r.t_sample, r.t_energy, r.t_sr, r.cg_iterations, r.bytes_comm)
        if self.bar is not None:
            self.bar.set_postfix_str(msg, refresh=False)
            self.bar.update(1)

    def on_rollback(self, state: RunState) -> None:
        if self.bar is not None:
            self.bar.n = state.step
            self.bar.refresh()

    def on_run_end(self, state: RunState, final: dict) -> None:
        if self.bar is not None:
            self.bar.close()


class ResultsHook(BaseHook):
    """Rank 0 appends each step to results.h5 (made ready by `results.prepare`) and writes /final
    at the end (with the reference energy the reporting layer looked up: `report.with_reference`).

    With a `probe` (`analysis.AttentionProbe`), every rank also measures the attention maps at the
    start of every `every`-th step (the parameters of that step's history row, on the chains it
    starts from) and at the end, and rank 0 appends them to /attention. A resumed or rolled-back
    run measures its first step again, so the rows match an uninterrupted run's bit for bit."""

    def __init__(self, path: str, reference: float | None, n_iter: int,
                 probe: AttentionProbe | None = None, every: int = 0) -> None:
        self.path, self.reference, self.n_iter, self.writer = path, reference, n_iter, None
        self.probe, self.every = (probe, every) if every > 0 else (None, 0)

    def _measure(self, state: RunState, due: bool) -> None:
        if self.probe is None or not due:
            return
        row = self.probe(state.vstate.params, state.vstate.chains)
        log.info("attention maps at step %d: %.3fs", state.step, self.probe.seconds)
        if self.writer:
            self.writer.append_row("attention", {"step": state.step, **row,
                                                 "seconds": self.probe.seconds})

    def _due(self, state: RunState) -> bool:
        return state.step % self.every == 0 and state.step < self.n_iter if self.every else False

    def on_run_start(self, state: RunState) -> None:
        if dist.is_root():
            self.writer = ResultsWriter(self.path)
        self._measure(state, self._due(state))

    def on_step_end(self, state: RunState, record: StepRecord) -> None:
        if self.writer:
            self.writer.append(record)
        self._measure(state, self._due(state))

    def on_rollback(self, state: RunState) -> None:
        if self.writer:
            self.writer.truncate(state.step)
        self._measure(state, self._due(state))

    def on_run_end(self, state: RunState, final: dict) -> None:
        self._measure(state, True)
        if self.writer:
            self.writer.finish(with_reference(final, self.reference) | {"step": state.step})

    def close(self) -> None:
        if self.writer:
            self.writer.close()


class CheckpointHook(BaseHook):
    """Checkpoints every `every_steps` steps or `every_minutes` minutes and at the end.

    All ranks take part (their chains are gathered); rank 0 writes.
    """

    def __init__(self, directory: str, every_steps: int, every_minutes: float, keep: int,
                 config_yaml: str, meta: dict[str, Any], clock=time.monotonic) -> None:
        self.directory, self.every_steps, self.every_s = directory, every_steps, every_minutes * 60
        self.keep, self.config_yaml, self.meta, self.clock = keep, config_yaml, meta, clock
        self.last_time, self.last_step = clock(), -1

    def save(self, state: RunState) -> None:
        if state.step == self.last_step:
            return
        dist.assert_same("parameters", np.asarray(ravel_pytree(state.vstate.params)[0]))
        chains = dist.gather_rows(np.asarray(state.vstate.chains))
        if dist.is_root():
            snap = checkpoint.Snapshot(state.step, state.vstate.params, state.sr_state, chains,
                                       state.rollbacks, self.config_yaml, state.energy_floor)
            path = checkpoint.write(self.directory, snap, self.meta | {"n_ranks": dist.size()},
                                    self.keep)
            log.info("checkpoint written: %s", path)
        dist.barrier()
        self.last_time, self.last_step = self.clock(), state.step

    def on_run_start(self, state: RunState) -> None:
        self.last_step = state.step if checkpoint.list_checkpoints(self.directory) else -1

    def on_step_end(self, state: RunState, record: StepRecord) -> None:
        due = self.clock() - self.last_time >= self.every_s
        if state.step % self.every_steps == 0 or dist.any_flag(due):
            self.save(state)

    def on_run_end(self, state: RunState, final: dict) -> None:
        self.save(state)


class SignalHook(BaseHook):
    """SIGUSR2 (SLURM's warning before a time limit, `launcher.signal_delay_s`) and SIGTERM
    (`scancel`, or preemption) set a flag (nothing else in the handler); at the next step
    boundary all ranks agree on it and checkpoint together. SIGUSR2 then stops with a request to
    be requeued, SIGTERM stops for good (status `cancelled`); SIGUSR2 wins when both came."""

    SIGNALS = (signal.SIGUSR2, signal.SIGTERM)

    def __init__(self, checkpoints: CheckpointHook) -> None:
        self.checkpoints, self.received, self.previous = checkpoints, set(), {}

    def _handler(self, signum: int, frame: Any) -> None:
        self.received.add(signum)

    def on_run_start(self, state: RunState) -> None:
        for s in self.SIGNALS:
            self.previous[s] = signal.signal(s, self._handler)

    def on_step_end(self, state: RunState, record: StepRecord) -> None:
        usr2 = dist.any_flag(signal.SIGUSR2 in self.received)
        if usr2 or dist.any_flag(signal.SIGTERM in self.received):
            self.checkpoints.save(state)
            name, outcome = ("SIGUSR2", status.REQUEUED) if usr2 else ("SIGTERM", status.CANCELLED)
            raise StopRun(f"received {name}: checkpointed at step {state.step}", state.step,
                          outcome)

    def restore(self) -> None:
        for s, h in self.previous.items():
            signal.signal(s, h)


class StepLimitHook(BaseHook):
    """Stops the job (with a checkpoint) after `limit` steps, for work split over several jobs."""

    def __init__(self, checkpoints: CheckpointHook, limit: int, n_iter: int) -> None:
        self.checkpoints, self.limit, self.n_iter, self.first = checkpoints, limit, n_iter, 0

    def on_run_start(self, state: RunState) -> None:
        self.first = state.step

    def on_step_end(self, state: RunState, record: StepRecord) -> None:
        if state.step - self.first >= self.limit and state.step < self.n_iter:
            self.checkpoints.save(state)
            raise StopRun(f"run.steps_per_job={self.limit} reached: checkpointed at step "
                          f"{state.step}", state.step)
