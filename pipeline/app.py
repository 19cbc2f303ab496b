"""One job: validate the config, build the system, resume or start, train, measure, report.

Called by `python -m pipeline` (local launcher, under any MPI launcher) and inside SLURM tasks
by the submitit launcher. Rank 0 holds the run directory (`rundir.owned`) for the whole job.
Returns a process exit status: 0 finished, already finished, stopped after run.steps_per_job or
cancelled by SIGTERM; `status.EXIT_REQUEUE` stopped by SIGUSR2 and checkpointed ("requeue me").
Refusals (`RefusedRun`) raise on every rank alike and change nothing in the run directory; other
errors mark the run failed and raise (aborting every rank of a multi-rank world); a failed write
(disk full) raises `WriteFailed`.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import jax
import jax.numpy as jnp
import yaml
from omegaconf import DictConfig

from . import budget, checkpoint, compile_cache, dist, provenance, rundir, status, warmstart
from .analysis import AttentionProbe
from .backend import CompileCounter
from .config import Config, config_differences, to_yaml, validate
from .driver import Driver, RunState, StopRun
from .errors import CheckpointIncompatible, RefusedRun, WriteFailed
from .hooks import CheckpointHook, ProgressHook, ResultsHook, SignalHook, StepLimitHook
from .report import reference_energy, summary, with_reference
from .results import HISTORY_TABLES, prepare as prepare_results
from .sr import SRState
from .state import VariationalState
from .system import System

log = logging.getLogger("vitnqs")


def _checker(current: Config):
    def check(stored_yaml: str) -> None:
        diff = config_differences(stored_yaml, current)
        if diff:
            raise CheckpointIncompatible(
                "the run directory holds a checkpoint of a different run; differing keys: "
                + "; ".join(diff) + ". Use another hydra.run.dir, or list keys that may change "
                "in run.allow_changed (e.g. run.allow_changed=[optimizer.lr,run.n_iter]).")
    return check


def restore_or_fresh(driver: Driver, ckpt_dir: str) -> RunState:
    """The newest good checkpoint (rank 0 reads, every rank receives), else a fresh state."""
    value = dist.root_decides(lambda: checkpoint.newest_good(
        ckpt_dir, *driver.templates(), _checker(driver.cfg), log=log.warning))
    if value is None:
        dist.print0(f"no checkpoint in {ckpt_dir}: starting at step 0")
        init_from = driver.cfg.run.init_from
        if not init_from:
            return driver.fresh_state()
        params, where, step = dist.root_decides(
            lambda: warmstart.load(init_from, os.path.dirname(ckpt_dir), driver.system))
        dist.print0(f"warm start from {where} (step {step})")
        log.info("warm start from %s (step %d)", where, step)
        return driver.fresh_state(jax.tree_util.tree_map(jnp.asarray, params))
    dist.print0(f"resumed from step {value.step} ({ckpt_dir})")
    log.info("resumed from step %d", value.step)
    sr_state = jax.tree_util.tree_map(jnp.asarray, value.opt_state)
    return RunState(value.step, restore_vstate(driver.system, value), SRState(*sr_state),
                    value.rollbacks, value.energy_floor)


def restore_vstate(system: System, snap: checkpoint.Snapshot) -> VariationalState:
    """The checkpoint's parameters and this rank's share of its chains (global chain order)."""
    n = system.cfg.sampler.n_chains // dist.size()
    r = dist.rank()
    params = jax.tree_util.tree_map(jnp.asarray, snap.params)
    return VariationalState(system, params, jnp.asarray(snap.chains[r * n:(r + 1) * n]))


class _QuietFileHandler(logging.FileHandler):
    """A log file that drops what it cannot write (a full disk) instead of printing a traceback
    per record: the failure itself reaches the user through the error that stops the run."""

    def handleError(self, record: logging.LogRecord) -> None:
        pass


def _setup_logging(run_dir: str) -> None:
    """One log file per rank under <run dir>/logs; rank 0 also logs warnings to stderr."""
    os.makedirs(os.path.join(run_dir, "logs"), exist_ok=True)
    log.handlers.clear()
    log.setLevel(logging.INFO)
    log.propagate = False
    fh = _QuietFileHandler(os.path.join(run_dir, "logs", f"rank{dist.rank()}.log"))
    fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(fh)
    if dist.is_root():
        sh = logging.StreamHandler(sys.stderr)
        sh.setLevel(logging.WARNING)
        sh.addFilter(lambda r: not getattr(r, "file_only", False))  # its one line comes later
        log.addHandler(sh)


def run_job(cfg: DictConfig | Config, run_dir: str, progress_bar: bool = True,
            overrides: list[str] | None = None) -> int:
    """Run (or resume) one VMC job in `run_dir`; see the module doc for the return value.
    `overrides` (the command line's) are recorded in <run dir>/.hydra/ once the run starts."""
    with dist.abort_on_error(), contextlib.ExitStack() as owned:
        c = validate(cfg, dist.size())
        cache = compile_cache.enable(c.run.compile_cache)
        executables = CompileCounter()
        here = dist.ranks_on_this_node()
        dist.root_decides(lambda: budget.check(c, dist.size(), *budget.machine_bytes(here),
                                              platform=jax.default_backend()))
        run_dir = dist.root_decides(lambda: rundir.check(run_dir))
        me = dist.root_decides(lambda: owned.enter_context(rundir.owned(run_dir)))
        _setup_logging(run_dir)
        if dist.is_root() and not me["locked"]:
            log.warning("run directory %s: no flock on this file system, running unlocked", run_dir)
        for line in [*dist.startup_report(), f"compilation cache: {cache or 'none'}"]:
            dist.print0(line)
            log.info(line)
        try:
            code = _train(c, run_dir, progress_bar, me, overrides)
            dist.print0(f"XLA executables: {executables.compiled} compiled, "
                        f"{executables.loaded} loaded from the compilation cache")
            return code
        except StopRun:
            raise
        except RefusedRun as e:  # a refusal with its reason: no traceback, no status change
            log.info("run refused: %s", e)  # rank log only: stderr gets one line
            raise
        except Exception as e:
            log.exception("run failed", extra={"file_only": isinstance(e, OSError)})
            if dist.is_root():
                _record_failure(run_dir, e)
            if isinstance(e, OSError):  # disk full, quota, I/O error: one line, not a traceback
                why = os.strerror(e.errno) if e.errno else str(e).splitlines()[0]
                raise WriteFailed(f"cannot write in {run_dir}: {why}; the run is marked failed, "
                                  "earlier checkpoints and results are intact") from e
            raise


def _record_failure(run_dir: str, e: Exception) -> None:
    try:
        status.write(run_dir, "failed", error=f"{type(e).__name__}: {e}")
    except OSError:  # the disk that failed the run may refuse this too
        log.error("could not record the failure in %s", status.FILE)


def _train(c: Config, run_dir: str, progress_bar: bool, me: dict, overrides: list[str] | None
           ) -> int:
    system = System.build(c)
    config_yaml = to_yaml(c)
    meta = {"versions": provenance.versions(), "code_version": provenance.code_version(),
            "seed": c.run.seed}
    ck = CheckpointHook(os.path.join(run_dir, "checkpoints"), c.checkpoint.every_steps,
                        c.checkpoint.every_minutes, c.checkpoint.keep, config_yaml, meta)
    reference = reference_energy(c, system.hamiltonian) if dist.is_root() else None
    driver = Driver(system)
    results_path = os.path.join(run_dir, "results.h5")
    attrs = {"config": config_yaml, "versions": yaml.safe_dump(meta["versions"]),
             "code_version": meta["code_version"], "n_ranks": dist.size(), "seed": c.run.seed,
             "n_params": driver.n_params, "solver": driver.solver}
    probe = (AttentionProbe(system.model, system.lattice.patch_displacement, c.sampler.n_chains)
             if c.model.layers and c.analysis.every_steps else None)
    results = ResultsHook(results_path, reference, c.run.n_iter, probe, c.analysis.every_steps)
    signals = SignalHook(ck)
    driver.hooks = [ProgressHook(c.run.n_iter, bar=progress_bar), results, ck, signals]
    if c.run.steps_per_job:
        driver.hooks.append(StepLimitHook(ck, c.run.steps_per_job, c.run.n_iter))
    dist.print0(f"{c.model.name}: {driver.n_params} parameters, SR solver {driver.solver} "
                f"({driver.preconditioner.reason}), {c.sampler.n_samples} samples on "
                f"{c.sampler.n_chains} chains over {dist.size()} rank(s), forward passes in chunks of "
                f"{system.chunk} configurations, Jacobian in chunks of "
                f"{system.jacobian_chunk or 'all'} samples; run dir {run_dir}")
    log.info("SR solver %s: %s", driver.solver, driver.preconditioner.reason)
    state = restore_or_fresh(driver, ck.directory)
    finished = dist.root_decides(
        lambda: prepare_results(results_path, attrs, state.step, c.run.n_iter,
                                HISTORY_TABLES | (probe.tables if probe else {})))
    if finished:
        dist.print0(f"already finished at step {state.step} ({results_path} holds /final); "
                    "nothing to do")
        return 0
    if dist.is_root():
        provenance.write_run_record(run_dir, config_yaml, overrides)
        status.write(run_dir, "running", step=state.step, n_ranks=dist.size(), pid=me["pid"],
                     host=me["host"])
    try:
        state, final = driver.run(state)
    except StopRun as stop:
        if dist.is_root():
            n = int(status.read(run_dir).get("requeues", 0)) + int(stop.requeue)
            status.write(run_dir, stop.state, step=stop.step, requeues=n, message=str(stop))
        dist.print0(f"stopped: {stop}")
        return status.EXIT_REQUEUE if stop.requeue else 0
    finally:
        results.close()
        signals.restore()
    if dist.is_root():
        final = with_reference(final, reference)
        status.write(run_dir, "finished", step=state.step, **{k: final[k] for k in (
            "energy_per_site", "energy_error", "relative_error")})
        dist.print0(summary(c, final))
    return 0
