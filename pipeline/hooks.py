"""Driver hooks: console progress, results file, checkpoints and signals (the side effects)."""
from __future__ import annotations

import logging
import signal
import time
from typing import Any

import jax
import numpy as np

from . import checkpoint, dist
from .driver import Driver, RunState, StopRun
from .results import ResultsWriter

log = logging.getLogger("vitnqs")


class BaseHook:
    """No-op hook methods; subclasses override what they need."""

    def on_run_start(self, driver: Driver, state: RunState) -> None:
        pass

    def on_step_end(self, driver: Driver, state: RunState, record: dict) -> None:
        pass

    def on_rollback(self, driver: Driver, state: RunState) -> None:
        pass

    def on_run_end(self, driver: Driver, state: RunState, final: dict) -> None:
        pass


class ProgressHook(BaseHook):
    """A tqdm bar on rank 0 and a log line per step in every rank's log file."""

    def __init__(self, every: int = 1, bar: bool = True) -> None:
        self.every, self.use_bar, self.bar = every, bar, None

    def on_run_start(self, driver: Driver, state: RunState) -> None:
        if self.use_bar and dist.is_root():
            from tqdm import tqdm

            self.bar = tqdm(total=driver.cfg.run.n_iter, initial=state.step, unit="step",
                            dynamic_ncols=True, mininterval=1.0)

    def on_step_end(self, driver: Driver, state: RunState, r: dict) -> None:
        msg = (f"E/N={r['energy']:+.6f}±{r['energy_error']:.6f} var/N={r['variance']:.4g} "
               f"acc={r['acceptance']:.3f} {r['seconds']:.2f}s/step")
        if r["step"] % self.every == 0:
            log.info("step %d %s (sample %.3fs, energy %.3fs, sr %.3fs, cg %d, comm %d B)",
                     r["step"], msg, r["t_sample"], r["t_energy"], r["t_sr"],
                     r["cg_iterations"], r["bytes_comm"])
        if self.bar is not None:
            self.bar.set_postfix_str(msg, refresh=False)
            self.bar.update(1)

    def on_rollback(self, driver: Driver, state: RunState) -> None:
        if self.bar is not None:
            self.bar.n = state.step
            self.bar.refresh()

    def on_run_end(self, driver: Driver, state: RunState, final: dict) -> None:
        if self.bar is not None:
            self.bar.close()


class ResultsHook(BaseHook):
    """Rank 0 appends each step to results.h5 and writes /final at the end."""

    def __init__(self, path: str, attrs: dict[str, Any]) -> None:
        self.path, self.attrs, self.writer = path, attrs, None

    def on_run_start(self, driver: Driver, state: RunState) -> None:
        if dist.is_root():
            self.writer = ResultsWriter(self.path, self.attrs, keep_steps_below=state.step)

    def on_step_end(self, driver: Driver, state: RunState, record: dict) -> None:
        if self.writer:
            self.writer.append(record)

    def on_rollback(self, driver: Driver, state: RunState) -> None:
        if self.writer:
            self.writer.truncate(state.step)

    def on_run_end(self, driver: Driver, state: RunState, final: dict) -> None:
        if self.writer:
            self.writer.finish(final)

    def close(self) -> None:
        if self.writer:
            self.writer.close()


class CheckpointHook(BaseHook):
    """Checkpoints every `every_steps` steps or `every_minutes` minutes and at the end.

    All ranks take part (their chains are gathered); rank 0 writes. The state written is also
    the driver's rollback point.
    """

    def __init__(self, directory: str, every_steps: int, every_minutes: float, keep: int,
                 config_yaml: str, meta: dict[str, Any]) -> None:
        self.directory, self.every_steps, self.every_s = directory, every_steps, every_minutes * 60
        self.keep, self.config_yaml, self.meta = keep, config_yaml, meta
        self.last_time, self.last_step = time.monotonic(), -1

    def save(self, driver: Driver, state: RunState) -> None:
        if state.step == self.last_step:
            return
        flat = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(state.params)])
        dist.assert_same("parameters", flat)  # every rank applied the identical update
        chains = dist.gather_rows(np.asarray(state.chains))
        if dist.is_root():
            snap = checkpoint.Snapshot(state.step, state.params, state.opt_state, chains,
                                       state.lr_scale, self.config_yaml)
            path = checkpoint.write(self.directory, snap, self.meta | {"n_ranks": dist.size()},
                                    self.keep)
            log.info("checkpoint written: %s", path)
        dist.barrier()
        driver.last_good = state
        self.last_time, self.last_step = time.monotonic(), state.step

    def on_run_start(self, driver: Driver, state: RunState) -> None:
        driver.last_good = state
        self.last_step = state.step if checkpoint.list_checkpoints(self.directory) else -1

    def on_step_end(self, driver: Driver, state: RunState, record: dict) -> None:
        due = time.monotonic() - self.last_time >= self.every_s
        if state.step % self.every_steps == 0 or dist.any_flag(due):
            self.save(driver, state)

    def on_run_end(self, driver: Driver, state: RunState, final: dict) -> None:
        self.save(driver, state)


class SignalHook(BaseHook):
    """SIGUSR2 / SIGTERM set a flag (nothing else in the handler); at the next step boundary all
    ranks agree on it, checkpoint together and stop with a request to be requeued."""

    SIGNALS = (signal.SIGUSR2, signal.SIGTERM)

    def __init__(self, checkpoints: CheckpointHook) -> None:
        self.checkpoints, self.received, self.previous = checkpoints, 0, {}

    def _handler(self, signum: int, frame: Any) -> None:
        self.received = signum

    def on_run_start(self, driver: Driver, state: RunState) -> None:
        for s in self.SIGNALS:
            self.previous[s] = signal.signal(s, self._handler)

    def on_step_end(self, driver: Driver, state: RunState, record: dict) -> None:
        if dist.any_flag(bool(self.received)):
            self.checkpoints.save(driver, state)
            name = signal.Signals(self.received).name if self.received else "a signal on another rank"
            raise StopRun(f"received {name}: checkpointed at step {state.step}", state.step,
                          requeue=True)

    def restore(self) -> None:
        for s, h in self.previous.items():
            signal.signal(s, h)


class StepLimitHook(BaseHook):
    """Stops the job (with a checkpoint) after `limit` steps, for work split over several jobs."""

    def __init__(self, checkpoints: CheckpointHook, limit: int) -> None:
        self.checkpoints, self.limit, self.first = checkpoints, limit, 0

    def on_run_start(self, driver: Driver, state: RunState) -> None:
        self.first = state.step

    def on_step_end(self, driver: Driver, state: RunState, record: dict) -> None:
        if state.step - self.first >= self.limit and state.step < driver.cfg.run.n_iter:
            self.checkpoints.save(driver, state)
            raise StopRun(f"run.steps_per_job={self.limit} reached: checkpointed at step "
                          f"{state.step}", state.step)
