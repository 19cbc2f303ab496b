"""Measure a trained run: energy, spin correlations, structure factor and dimer correlations.

python -m pipeline.measure RUN_DIR [--symmetry none|translations|full] [--n-samples N]
                                   [--seed S] [--burn-in SWEEPS] [--name NAME] [--lanczos N]
                                   [launcher=slurm] [launcher.KEY=VALUE ...]

Loads the run's newest good checkpoint (read only: checkpoints and /history are never touched),
projects the state onto the chosen symmetry group (default: the run's own model.symmetry),
re-thermalizes the checkpoint's chains under that state for `--burn-in` sweeps (default
sampler.n_thermalize), samples `--n-samples` configurations (default sampler.n_samples_final) and
writes the group /measurements/<NAME> into the run's results.h5 (NAME defaults to
step<STEP>_<symmetry>, with _2, _3, ... appended when taken). `--lanczos N` adds one Lanczos
step on the measured state (`pipeline.lanczos`: the energy of psi + a (H - <H>) psi at its best a,
a variational energy below the state's own) on N samples from 64 of the chains, a fitted on one
half of them and measured on the other, both ways; a sample costs about what the local energies
of 160 samples cost. Works on one
rank, under mpirun or srun (the samples do not depend on the rank count), and as a SLURM job:
`launcher=slurm` submits it with the run's launcher settings, changed by `launcher.KEY=VALUE`
arguments.

/measurements/<NAME> (an interface, like /history):
  attrs     energy_per_site, energy_error, variance_per_site, v_score, r_hat, acceptance,
            n_samples, symmetry, step, seed, burn_in, units; singlet_weight (+ _error) on the
            Shastry-Sutherland lattice; with --lanczos N: lanczos_energy_per_site,
            lanczos_energy_error, lanczos_variance_per_site, lanczos_v_score,
            lanczos_acceptance, lanczos_alpha (the mean of the a above, in 1 / total-energy
            units), lanczos_alpha_halves (the two a: one per half), lanczos_shift (<H>,
            total), lanczos_fit_samples (each a's: half), lanczos_n_samples
  datasets  correlation, correlation_error, correlation_zz, structure_factor,
            structure_factor_error, dimer_correlation, dimer_correlation_error: (L, L) arrays
            indexed by displacement (dx, dy) or by q = 2 pi (kx, ky) / L (see `observables`)
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import yaml
from omegaconf import OmegaConf

from .errors import ConfigError, RefusedRun, ResultsError

UNITS = "S.S units, spin 1/2; energies per site; correlations <S_i.S_j>"


@dataclass(frozen=True)
class Request:
    """What to measure (None: the run's own setting)."""

    run_dir: str
    symmetry: str | None = None
    n_samples: int | None = None
    seed: int | None = None
    burn_in: int | None = None
    name: str | None = None
    lanczos: int = 0


def _config(req: Request, stored_yaml: str, n_ranks: int):
    """The run's config with the measurement's symmetry and seed, validated."""
    from .config import validate

    c = validate(OmegaConf.create(stored_yaml), n_ranks)
    model = replace(c.model, symmetry=req.symmetry or c.model.symmetry)
    run = replace(c.run, seed=c.run.seed if req.seed is None else req.seed)
    c = validate(replace(c, model=model, run=run), n_ranks)
    n = c.sampler.n_samples_final if req.n_samples is None else req.n_samples
    if n <= 0 or n % c.sampler.n_chains:
        raise ConfigError(f"--n-samples={n}: must be a positive multiple of sampler.n_chains="
                          f"{c.sampler.n_chains}")
    if req.lanczos < 0 or req.lanczos % c.sampler.n_chains:
        raise ConfigError(f"--lanczos={req.lanczos}: must be 0 (none) or a positive multiple of "
                          f"sampler.n_chains={c.sampler.n_chains}")
    if req.burn_in is not None and req.burn_in < 0:
        raise ConfigError(f"--burn-in={req.burn_in}: must be >= 0")
    return c, n


def _unique_name(existing: set[str], wanted: str) -> str:
    name, k = wanted, 1
    while name in existing:
        k += 1
        name = f"{wanted}_{k}"
    return name


def measure(req: Request) -> dict[str, Any]:
    """Run the measurement on all ranks; rank 0 writes it. Returns the attributes written."""
    from . import checkpoint, compile_cache, dist, lanczos, observables, rundir
    from .app import restore_vstate
    from .driver import Driver
    from .results import load
    from .system import System

    path = os.path.join(req.run_dir, "results.h5")
    with dist.abort_on_error():
        stored = dist.root_decides(lambda: str(load(path).attrs.get("config", "")))
        if not stored:
            raise ResultsError(f"results file {path} holds no config: not a vitnqs run")
        c, n_samples = _config(req, stored, dist.size())
        compile_cache.enable(c.run.compile_cache)  # the run's: a repeated measurement loads
        system = System.build(c)
        driver = Driver(system)
        ckpt_dir = os.path.join(req.run_dir, "checkpoints")
        with contextlib.ExitStack() as owned:
            dist.root_decides(lambda: owned.enter_context(rundir.owned(req.run_dir)))
            snap = dist.root_decides(lambda: checkpoint.newest_good(
                ckpt_dir, *driver.templates(), lambda y: None, log=lambda m: print(m, file=sys.stderr)))
            if snap is None:
                raise ResultsError(f"no readable checkpoint in {ckpt_dir}: nothing to measure")
            vstate = restore_vstate(system, snap)
            burn_in = c.sampler.n_thermalize if req.burn_in is None else req.burn_in
            vs, smp, n_per_chain = observables.fresh_samples(vstate, n_samples, snap.step, burn_in)
            attrs = observables.energy_of(vs, smp, n_per_chain)
            arrays = observables.correlations(vs, smp, n_per_chain, system.chunk)
            if req.lanczos:
                step = lanczos.lanczos_within(vs, snap.step, attrs, burn_in, req.lanczos,
                                              float("inf"), 1.0)
                attrs |= {f"lanczos_{k}": v for k, v in step.items()}
            for key in ("singlet_weight", "singlet_weight_error"):
                if key in arrays:
                    attrs[key] = arrays.pop(key)
            attrs |= {"symmetry": str(c.model.symmetry), "step": snap.step, "seed": c.run.seed,
                      "burn_in": burn_in,
                      "units": UNITS}
            if dist.is_root():
                attrs["name"] = _write(path, req.name or f"step{snap.step}_{c.model.symmetry}",
                                       attrs, arrays)
    return attrs


def _write(path: str, wanted: str, attrs: dict, arrays: dict[str, np.ndarray]) -> str:
    """Add /measurements/<name> to the results file (rewritten whole, atomically)."""
    from .results import load

    content = load(path)
    taken = {k.split("/")[1] for k in content.groups if k.startswith("measurements/")}
    name = _unique_name(taken, wanted)
    content.groups.setdefault("measurements", {})
    content.groups[f"measurements/{name}"] = dict(attrs)
    for key, a in arrays.items():
        content.datasets[f"measurements/{name}/{key}"] = (np.asarray(a), {})
    content.write(path)
    return name


def summary(attrs: dict) -> str:
    line = (f"measured {attrs['name']}: E/N = {attrs['energy_per_site']:.6f} ± "
            f"{attrs['energy_error']:.6f} (per site, S.S units; {attrs['n_samples']} samples, "
            f"symmetry {attrs['symmetry']}, step {attrs['step']}), var/N = "
            f"{attrs['variance_per_site']:.4g}, V-score = {attrs['v_score']:.3g}, R-hat = "
            f"{attrs['r_hat']:.3f}")
    if "lanczos_energy_per_site" in attrs:
        line += (f"; one Lanczos step: E/N = {attrs['lanczos_energy_per_site']:.6f} ± "
                 f"{attrs['lanczos_energy_error']:.6f} ({attrs['lanczos_n_samples']} samples), "
                 f"V-score = {attrs['lanczos_v_score']:.3g}")
    return line


class MeasureJob:
    """What each SLURM task runs (one MPI rank of the measurement's world)."""

    def __call__(self, req: Request) -> dict | None:
        import submitit

        from . import dist

        env = submitit.JobEnvironment()
        if dist.size() != env.num_tasks:
            raise RuntimeError(f"MPI world size {dist.size()} != {env.num_tasks} SLURM tasks: "
                               "set launcher.srun_args to the PMI of your MPI")
        attrs = measure(req)
        return attrs if dist.is_root() else None


def _submit(req: Request, launcher_args: list[str]) -> int:
    """Submit the measurement as one SLURM job with the run's launcher settings."""
    import submitit

    from .config import LauncherConfig, conf_dir
    from .launch.slurm import _executor_parameters, test_resources
    from .results import load

    stored = yaml.safe_load(str(load(os.path.join(req.run_dir, "results.h5")).attrs["config"]))
    run_launcher = stored.get("launcher", {})
    base = OmegaConf.merge(OmegaConf.structured(LauncherConfig),
                           OmegaConf.load(os.path.join(conf_dir(), "launcher", "slurm.yaml")),
                           run_launcher if run_launcher.get("kind") == "slurm" else {})
    try:
        for arg in launcher_args:
            key, value = arg.split("=", 1)
            OmegaConf.update(base, key.removeprefix("launcher."), yaml.safe_load(value))
        la: LauncherConfig = OmegaConf.to_object(base)
    except Exception as e:
        why = str(e).splitlines()[0]
        raise ConfigError(f"launcher arguments {launcher_args}: {why}") from None
    test_resources(la)
    ex = submitit.AutoExecutor(folder=os.path.join(req.run_dir, la.folder, "%j"),
                               slurm_python=sys.executable, cluster="slurm")
    ex.update_parameters(**_executor_parameters(la, "vitnqs-measure"))
    job = ex.submit(MeasureJob(), req)
    print(f"submitted measurement job {job.job_id}: {req.run_dir}", flush=True)
    if la.wait:
        print(summary(job.results()[0]), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.measure", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("--symmetry", choices=["none", "translations", "full"])
    ap.add_argument("--n-samples", type=int)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--burn-in", type=int)
    ap.add_argument("--name")
    ap.add_argument("--lanczos", type=int, default=0, help="samples for one Lanczos step (0: none)")
    ap.add_argument("launcher", nargs="*", help="launcher=slurm and launcher.KEY=VALUE")
    args = ap.parse_intermixed_args(argv)
    from .launch.slurm import SubmissionError

    req = Request(os.path.abspath(args.run_dir), args.symmetry, args.n_samples, args.seed,
                  args.burn_in, args.name, args.lanczos)
    bad = [a for a in args.launcher if not a.startswith("launcher")]
    try:
        if bad:
            raise ConfigError(f"{bad[0]}: only launcher=slurm and launcher.KEY=VALUE may follow "
                              "the run directory")
        if "launcher=slurm" in args.launcher:
            return _submit(req, [a for a in args.launcher if a != "launcher=slurm"])
        from . import dist

        attrs = measure(req)
        if dist.is_root():
            print(summary(attrs), flush=True)
        return 0
    except (RefusedRun, ResultsError, SubmissionError) as e:
        from . import dist

        if dist.is_root():  # every rank refused alike: one line
            sys.stderr.write(f"error: {e}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
