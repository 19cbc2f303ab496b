"""One job: validate the config, build the system, resume or start, train, measure, report.

Called by `python -m pipeline` (local launcher, under any MPI launcher) and inside SLURM tasks
by the submitit launcher. Returns a process exit status: 0 finished (or stopped after
run.steps_per_job), `status.EXIT_REQUEUE` stopped by a signal and checkpointed ("requeue me");
errors raise (and abort every rank of a multi-rank world).
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import yaml
from omegaconf import DictConfig

from . import checkpoint, dist, provenance, status
from .config import Config, config_differences, to_yaml, validate
from .driver import Driver, RunState, StopRun
from .errors import CheckpointIncompatible, RefusedRun, ResultsError
from .hooks import CheckpointHook, ProgressHook, ResultsHook, SignalHook, StepLimitHook
from .report import reference_energy, summary, with_reference
from .results import read_final
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
    found: tuple[str, Any] = ("none", None)
    if dist.is_root():
        try:
            snap = checkpoint.newest_good(ckpt_dir, *driver.templates(), _checker(driver.cfg),
                                          log=log.warning)
            found = ("ok", snap)
        except checkpoint.CheckpointError as e:
            found = ("error", str(e))
    kind, value = dist.bcast_object(found)
    if kind == "error":
        raise CheckpointIncompatible(value)
    if value is None:
        return driver.fresh_state()
    n = driver.cfg.sampler.n_chains // dist.size()
    r = dist.rank()
    params, sr_state = jax.tree_util.tree_map(jnp.asarray, (value.params, value.opt_state))
    dist.print0(f"resumed from step {value.step} ({ckpt_dir})")
    log.info("resumed from step %d", value.step)
    vstate = VariationalState(driver.system, params, jnp.asarray(value.chains[r * n:(r + 1) * n]))
    return RunState(value.step, vstate, SRState(*sr_state), value.rollbacks)


def _setup_logging(run_dir: str) -> None:
    """One log file per rank under <run dir>/logs; rank 0 also logs warnings to stderr."""
    os.makedirs(os.path.join(run_dir, "logs"), exist_ok=True)
    log.handlers.clear()
    log.setLevel(logging.INFO)
    log.propagate = False
    fh = logging.FileHandler(os.path.join(run_dir, "logs", f"rank{dist.rank()}.log"))
    fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(fh)
    if dist.is_root():
        sh = logging.StreamHandler(sys.stderr)
        sh.setLevel(logging.WARNING)
        log.addHandler(sh)


def run_job(cfg: DictConfig | Config, run_dir: str, progress_bar: bool = True) -> int:
    """Run (or resume) one VMC job in `run_dir`; see the module doc for the return value."""
    with dist.abort_on_error():
        c = validate(cfg, dist.size())
        run_dir = os.path.abspath(dist.bcast_object(run_dir))
        status.ensure_writable(run_dir, "run directory")
        _setup_logging(run_dir)
        for line in dist.startup_report():
            dist.print0(line)
            log.info(line)
        try:
            return _train(c, run_dir, progress_bar)
        except StopRun:
            raise
        except Exception as e:
            if dist.is_root():
                status.write(run_dir, "failed", error=f"{type(e).__name__}: {e}")
            if isinstance(e, RefusedRun):  # a refusal with its reason: no traceback needed
                log.info("run refused: %s", e)  # rank log only: stderr gets one line
            else:
                log.exception("run failed")
            raise


def _train(c: Config, run_dir: str, progress_bar: bool) -> int:
    system = System.build(c)
    config_yaml = to_yaml(c)
    meta = {"versions": provenance.versions(), "code_version": provenance.code_version(),
            "seed": c.run.seed}
    ck = CheckpointHook(os.path.join(run_dir, "checkpoints"), c.checkpoint.every_steps,
                        c.checkpoint.every_minutes, c.checkpoint.keep, config_yaml, meta)
    reference = reference_energy(c, system.hamiltonian) if dist.is_root() else None
    driver = Driver(system)
    results = ResultsHook(os.path.join(run_dir, "results.h5"), {
        "config": config_yaml, "versions": yaml.safe_dump(meta["versions"]),
        "code_version": meta["code_version"], "n_ranks": dist.size(), "seed": c.run.seed,
        "n_params": driver.n_params, "solver": driver.solver}, reference)
    signals = SignalHook(ck)
    driver.hooks = [ProgressHook(c.run.n_iter, bar=progress_bar), results, ck, signals]
    if c.run.steps_per_job:
        driver.hooks.append(StepLimitHook(ck, c.run.steps_per_job, c.run.n_iter))
    dist.print0(f"{c.model.name}: {driver.n_params} parameters, SR solver {driver.solver} "
                f"({driver.preconditioner.reason}), {c.sampler.n_samples} samples on "
                f"{c.sampler.n_chains} chains over {dist.size()} rank(s); run dir {run_dir}")
    log.info("SR solver %s: %s", driver.solver, driver.preconditioner.reason)
    state = restore_or_fresh(driver, ck.directory)
    problem = results_problem(results.path, state.step) if dist.is_root() else None
    problem = dist.bcast_object(problem)  # rank 0 looks at the file; every rank stops alike
    if problem:
        raise ResultsError(problem)
    if dist.is_root():
        status.write(run_dir, "running", step=state.step, n_ranks=dist.size())
    try:
        state, final = driver.run(state)
    except StopRun as stop:
        if dist.is_root():
            n = int(status.read(run_dir).get("requeues", 0)) + int(stop.requeue)
            status.write(run_dir, status.REQUEUED if stop.requeue else "stopped", step=stop.step,
                         requeues=n, message=str(stop))
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


def results_problem(path: str, step: int) -> str | None:
    """Why results.h5 must not be (re)opened for a run starting at `step`, or None."""
    if step > 0 and not os.path.exists(path):
        return (f"results file {path} is missing, but the run resumes from step {step}: its history "
                "would be incomplete. Restore the file, or move the checkpoints/ directory away to "
                "start over.")
    if step == 0 and os.path.exists(path):
        try:
            finished = bool(read_final(path))
        except OSError as e:
            return f"cannot read results file {path} ({e})"
        if finished:
            return (f"results file {path} holds a finished run but there is no checkpoint to "
                    "resume from; use another hydra.run.dir")
    return None
