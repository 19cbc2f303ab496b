"""SLURM submission with submitit: one job per sweep point (one job array per sweep), one SLURM
task per MPI rank, requeue after preemption or a time limit.

On the login node, `python -m pipeline [-m] launcher=slurm ...` validates every point, queues it
(`enqueue`), and `SubmitCallback` submits them all when Hydra's composition ends: nothing is
submitted unless every point validated and `sbatch --test-only` accepted the resources. Inside the
job, `SlurmJob` checks that the MPI world has one rank per task, runs `app.run_job`, and when the
run stopped on SIGUSR2/SIGTERM (all ranks checkpointed) rank 0 requeues the job with
`scontrol requeue`, up to `launcher.max_requeues` times (counted in the run's status.json).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from .. import budget, rundir, status
from ..config import Config, LauncherConfig, to_yaml, validate
from ..errors import ConfigError, RunDirError



@dataclass(frozen=True)
class Point:
    """One job to submit: its validated config, run directory and command-line overrides."""

    config: Config
    run_dir: str
    overrides: tuple[str, ...]


_PENDING: list[Point] = []


class SubmissionError(RuntimeError):
    """Submission refused before anything was queued; the message says why."""


def enqueue(cfg: DictConfig, run_dir: str) -> None:
    """Validate one point now (bad input fails before anything is submitted) and queue it."""
    c = validate(cfg, cfg.launcher.nodes * cfg.launcher.tasks_per_node)
    budget.check(c, c.launcher.nodes * c.launcher.tasks_per_node, *budget.slurm_bytes(c))
    from hydra.core.hydra_config import HydraConfig

    overrides = tuple(HydraConfig.get().overrides.task) if HydraConfig.initialized() else ()
    _PENDING.append(Point(c, os.path.abspath(run_dir), overrides))


def _executor_parameters(la: LauncherConfig, name: str) -> dict[str, Any]:
    params: dict[str, Any] = {
        "name": name, "nodes": la.nodes, "tasks_per_node": la.tasks_per_node,
        "cpus_per_task": la.cpus_per_task, "mem_gb": la.mem_gb, "timeout_min": la.timeout_min,
        "slurm_signal_delay_s": la.signal_delay_s, "slurm_srun_args": list(la.srun_args),
        "slurm_setup": list(la.setup), "slurm_additional_parameters": {"requeue": True},
    }
    if la.gpus_per_node:
        params["gpus_per_node"] = la.gpus_per_node
    for key in ("partition", "account", "qos"):
        if getattr(la, key):
            params[f"slurm_{key}"] = getattr(la, key)
    return params


def test_resources(la: LauncherConfig) -> None:
    """`sbatch --test-only` with the job's resources: unknown partitions, impossible requests."""
    if shutil.which("sbatch") is None:
        raise SubmissionError("launcher=slurm: sbatch is not on PATH (no SLURM client here)")
    cmd = ["sbatch", "--test-only", f"--nodes={la.nodes}", f"--ntasks-per-node={la.tasks_per_node}",
           f"--cpus-per-task={la.cpus_per_task}", f"--mem={int(la.mem_gb * 1024)}M",
           f"--time={la.timeout_min}", "--wrap=true"]
    if la.gpus_per_node:
        cmd.append(f"--gpus-per-node={la.gpus_per_node}")
    cmd += [f"--{k}={getattr(la, k)}" for k in ("partition", "account", "qos") if getattr(la, k)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        msg = (out.stderr or out.stdout).strip().replace("\n", " ")
        raise SubmissionError(f"SLURM refuses the launcher resources ({_describe(la)}): {msg}")


def _describe(la: LauncherConfig) -> str:
    return (f"partition={la.partition}, nodes={la.nodes}, tasks_per_node={la.tasks_per_node}, "
            f"cpus_per_task={la.cpus_per_task}, gpus_per_node={la.gpus_per_node}, "
            f"mem_gb={la.mem_gb}, timeout_min={la.timeout_min}")


def _check_folder(folder: str, what: str) -> None:
    try:
        rundir.check(folder, what)
    except RunDirError as e:
        raise SubmissionError(str(e)) from e


def submit(points: list[Point], base_dir: str) -> list[Any]:
    """Submit the points as job arrays (one per distinct launcher setting); returns the jobs."""
    import submitit

    if not points:
        raise SubmissionError("the sweep has no points: nothing submitted")
    groups: dict[str, list[Point]] = {}
    for p in points:
        groups.setdefault(OmegaConf.to_yaml(OmegaConf.structured(p.config.launcher)), []).append(p)
    folder = os.path.join(base_dir, points[0].config.launcher.folder)
    _check_folder(folder, "submitit folder")
    for group in groups.values():  # every check before the first submission
        test_resources(group[0].config.launcher)
    for p in points:
        _check_folder(p.run_dir, "run directory")
    jobs = []
    for group in groups.values():
        la = group[0].config.launcher
        ex = submitit.AutoExecutor(folder=os.path.join(folder, "%j"), slurm_python=sys.executable,
                                   cluster="slurm")
        ex.update_parameters(**_executor_parameters(la, "vitnqs"))
        batch = ex.map_array(SlurmJob(), [to_yaml(p.config) for p in group],
                             [p.run_dir for p in group], [list(p.overrides) for p in group])
        for job, p in zip(batch, group):
            status.write(p.run_dir, "queued", job_id=job.job_id, requeues=0)
            print(f"submitted job {job.job_id}: {p.run_dir}", flush=True)
        jobs += batch
    return jobs


class SubmitCallback(Callback):
    """Hydra callback: submits what `enqueue` queued when the single run or the sweep ends."""

    def _flush(self, config: DictConfig, base_dir: str) -> None:
        if config.launcher.kind != "slurm":
            return
        points = list(_PENDING)
        _PENDING.clear()
        try:
            jobs = submit(points, base_dir)
        except (SubmissionError, ConfigError) as e:
            sys.stderr.write(f"error: {e}\n")
            sys.exit(2)
        if config.launcher.wait:
            failed = 0
            for job in jobs:
                try:
                    job.results()
                    print(f"job {job.job_id} finished", flush=True)
                except Exception as e:  # the job's own error, reported per job
                    failed += 1
                    print(f"job {job.job_id} failed: {str(e).strip().splitlines()[-1]}", flush=True)
            if failed:
                sys.exit(1)

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._flush(config, config.hydra.run.dir)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._flush(config, config.hydra.sweep.dir)


class SlurmJob:
    """What each SLURM task runs (every task is one MPI rank of the same world)."""

    def __call__(self, config_yaml: str, run_dir: str, overrides: list[str]) -> dict | None:
        import submitit

        from .. import dist
        from ..app import run_job

        env = submitit.JobEnvironment()
        cfg = OmegaConf.create(config_yaml)
        if dist.size() != env.num_tasks:
            msg = (f"MPI world size {dist.size()} != {env.num_tasks} SLURM tasks: srun started "
                   f"separate worlds; set launcher.srun_args to the PMI of your MPI (--mpi=pmi2 "
                   f"for MPICH, --mpi=pmix for Open MPI), now {list(cfg.launcher.srun_args)}")
            status.write(run_dir, "failed", error=msg, job_id=env.job_id)
            raise RuntimeError(msg)
        code = run_job(cfg, run_dir, progress_bar=False, overrides=overrides)
        if code != status.EXIT_REQUEUE:
            return status.read(run_dir) if dist.is_root() else None
        if dist.is_root():
            done = int(status.read(run_dir).get("requeues", 0))
            if done > cfg.launcher.max_requeues:
                status.write(run_dir, "failed", job_id=env.job_id,
                             error=f"requeue cap launcher.max_requeues={cfg.launcher.max_requeues} reached")
                raise RuntimeError(f"not requeued: launcher.max_requeues={cfg.launcher.max_requeues} reached")
            subprocess.check_call(["scontrol", "requeue", env.job_id], timeout=60)
            status.write(run_dir, status.REQUEUED, job_id=env.job_id)
        # Exit without a result: submitit then treats the requeued job as still running.
        raise SystemExit(status.EXIT_REQUEUE)
