"""Config schema (Hydra structured configs) and validation before any computation.

Types and unknown keys are checked by Hydra/OmegaConf against these dataclasses when the config
is composed; `validate` checks values and cross-field constraints and raises `ConfigError` with a
one-line message that names the field and the value.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from .lattice import KINDS as LATTICE_KINDS
from .models import KINDS as ATTENTION_KINDS, MODES as SYMMETRY_MODES
from .sr import SOLVERS


class ConfigError(ValueError):
    """A bad configuration value; the message names the field."""


@dataclass
class LatticeConfig:
    L: int = 4  # linear size; N = L^2 sites, periodic
    patch: int = 2  # patch side b; L % b == 0
    kind: str = "square"  # square | shastry_sutherland


@dataclass
class HamiltonianConfig:
    J1: float = 1.0  # nearest-neighbour coupling (J on the Shastry-Sutherland lattice)
    J2: float = 0.5  # next-nearest coupling (the dimer coupling J' on Shastry-Sutherland)
    marshall_sign: bool = True  # rotate the sign of off-diagonal J1 terms (sublattice rotation)


@dataclass
class ModelConfig:
    name: str = "vit_factored"
    attention: str = "factored"  # factored | standard
    d: int = 16  # embedding dimension
    heads: int = 2
    layers: int = 1
    translation_invariant: bool = True  # factored weights alpha(r_i - r_j) instead of alpha_ij
    symmetry: str = "none"  # projection: none | translations | full
    chunk_size: int = 0  # configurations per forward pass (0: whole batch)


@dataclass
class SamplerConfig:
    n_samples: int = 1024  # samples per SR step, all ranks together
    n_chains: int = 1024  # Markov chains, all ranks together
    sweep_size: int = 0  # proposals between samples (0: N)
    n_thermalize: int = 20  # sweeps discarded when chains are created
    n_samples_final: int = 16384  # samples of the final energy measurement
    next_nearest_moves: bool = True  # propose exchanges on second-family bonds too


@dataclass
class OptimizerConfig:
    lr: float = 0.02
    lr_final: float = 0.002  # cosine decay from lr to lr_final over run.n_iter
    warmup: int = 20  # linear warm-up steps
    diag_shift: float = 1e-3  # lambda in (S + lambda I)
    diag_shift_final: float = 1e-4  # lambda decays geometrically to this value
    solver: str = "auto"  # auto | dense | cg | kernel
    momentum: float = 0.9  # SPRING momentum mu on the SR direction, 0 <= mu < 1 (0: plain SR)
    phase_scale: float = 1.0  # phase time step / amplitude time step (1: plain SR)
    phase_scale_final: float = 1.0  # decays geometrically to this value, like diag_shift
    cg_tol: float = 1e-6
    cg_maxiter: int = 200


@dataclass
class RunConfig:
    n_iter: int = 300
    seed: int = 0
    allow_changed: list = field(default_factory=list)  # keys that may differ on resume
    max_rollbacks: int = 3  # retries after a non-finite step
    steps_per_job: int = 0  # stop (with a checkpoint) after this many steps in one job; 0: no limit


@dataclass
class CheckpointConfig:
    every_steps: int = 50
    every_minutes: float = 10.0
    keep: int = 3


@dataclass
class LauncherConfig:
    kind: str = "local"  # local | slurm
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    nodes: int = 1
    tasks_per_node: int = 1  # = MPI ranks (= GPUs) per node
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    mem_gb: float = 4.0
    timeout_min: int = 60
    signal_delay_s: int = 60
    max_requeues: int = 3
    srun_args: list = field(default_factory=lambda: ["--mpi=pmi2"])
    setup: list = field(default_factory=list)  # shell lines run before the job (module load ...)
    folder: str = "submitit"  # submitit logs, relative to the sweep directory
    wait: bool = False  # block until all jobs end


@dataclass
class Config:
    lattice: LatticeConfig = field(default_factory=LatticeConfig)
    hamiltonian: HamiltonianConfig = field(default_factory=HamiltonianConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    run: RunConfig = field(default_factory=RunConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)


def register() -> None:
    """Make the schema available to Hydra as `base_config` (first entry of conf/config.yaml)."""
    ConfigStore.instance().store(name="base_config", node=Config)


def _require(ok: bool, name: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"{name}={value!r}: {why}")


def validate(cfg: DictConfig | Config, n_ranks: int = 1) -> Config:
    """Check values and constraints; returns a plain `Config` object."""
    c: Config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), cfg)) \
        if not isinstance(cfg, Config) else cfg
    lat, ham, m, s, o, r, ck = c.lattice, c.hamiltonian, c.model, c.sampler, c.optimizer, c.run, c.checkpoint
    _require(lat.kind in LATTICE_KINDS, "lattice.kind", lat.kind, f"unknown, expected one of {LATTICE_KINDS}")
    _require(lat.L >= 2, "lattice.L", lat.L, "must be >= 2")
    _require(lat.patch >= 1, "lattice.patch", lat.patch, "must be >= 1")
    _require(lat.L % lat.patch == 0, "lattice.L", lat.L, f"not divisible by lattice.patch={lat.patch}")
    _require(lat.L * lat.L % 2 == 0, "lattice.L", lat.L, f"N = L^2 = {lat.L ** 2} is odd: no Sz=0 sector")
    _require(lat.kind == "square" or lat.L % 2 == 0, "lattice.L", lat.L, "Shastry-Sutherland needs even L")
    for name in ("J1", "J2"):
        v = getattr(ham, name)
        _require(v == v and abs(v) < float("inf"), f"hamiltonian.{name}", v, "must be finite")
    _require(m.attention in ATTENTION_KINDS, "model.attention", m.attention,
             f"unknown attention kind, expected one of {ATTENTION_KINDS}")
    _require(m.d >= 1, "model.d", m.d, "must be >= 1")
    _require(m.heads >= 1, "model.heads", m.heads, "must be >= 1")
    _require(m.d % m.heads == 0, "model.heads", m.heads, f"does not divide model.d={m.d}")
    _require(m.layers >= 0, "model.layers", m.layers, "must be >= 0")
    _require(m.symmetry in SYMMETRY_MODES, "model.symmetry", m.symmetry, f"unknown, expected one of {SYMMETRY_MODES}")
    _require(m.symmetry != "full" or lat.kind == "square", "model.symmetry", m.symmetry,
             "'full' projection needs lattice.kind=square")
    _require(m.chunk_size >= 0, "model.chunk_size", m.chunk_size, "must be >= 0")
    for name in ("n_samples", "n_chains", "n_samples_final"):
        _require(getattr(s, name) > 0, f"sampler.{name}", getattr(s, name), "must be positive")
    _require(s.n_samples % s.n_chains == 0, "sampler.n_samples", s.n_samples,
             f"not a multiple of sampler.n_chains={s.n_chains}")
    _require(s.n_samples_final % s.n_chains == 0, "sampler.n_samples_final", s.n_samples_final,
             f"not a multiple of sampler.n_chains={s.n_chains}")
    _require(s.n_chains % n_ranks == 0, "sampler.n_chains", s.n_chains,
             f"not divisible by the number of MPI ranks ({n_ranks})")
    _require(s.sweep_size >= 0, "sampler.sweep_size", s.sweep_size, "must be >= 0")
    _require(s.n_thermalize >= 0, "sampler.n_thermalize", s.n_thermalize, "must be >= 0")
    _require(o.lr > 0, "optimizer.lr", o.lr, "must be positive")
    _require(o.lr_final > 0, "optimizer.lr_final", o.lr_final, "must be positive")
    _require(o.warmup >= 0, "optimizer.warmup", o.warmup, "must be >= 0")
    _require(o.diag_shift > 0, "optimizer.diag_shift", o.diag_shift, "must be positive")
    _require(o.diag_shift_final > 0, "optimizer.diag_shift_final", o.diag_shift_final, "must be positive")
    _require(o.solver in SOLVERS, "optimizer.solver", o.solver, f"unknown solver, expected one of {SOLVERS}")
    _require(o.cg_tol > 0, "optimizer.cg_tol", o.cg_tol, "must be positive")
    _require(0 <= o.momentum < 1, "optimizer.momentum", o.momentum, "must be in [0, 1)")
    _require(o.phase_scale > 0, "optimizer.phase_scale", o.phase_scale, "must be positive")
    _require(o.phase_scale_final > 0, "optimizer.phase_scale_final", o.phase_scale_final,
             "must be positive")
    _require(o.cg_maxiter > 0, "optimizer.cg_maxiter", o.cg_maxiter, "must be positive")
    _require(r.n_iter > 0, "run.n_iter", r.n_iter, "must be positive")
    _require(r.seed >= 0, "run.seed", r.seed, "must be >= 0")
    _require(r.steps_per_job >= 0, "run.steps_per_job", r.steps_per_job, "must be >= 0")
    _require(r.max_rollbacks >= 0, "run.max_rollbacks", r.max_rollbacks, "must be >= 0")
    _require(ck.every_steps > 0, "checkpoint.every_steps", ck.every_steps, "must be positive")
    _require(ck.every_minutes > 0, "checkpoint.every_minutes", ck.every_minutes, "must be positive")
    _require(ck.keep >= 1, "checkpoint.keep", ck.keep, "must be >= 1")
    la = c.launcher
    _require(la.kind in ("local", "slurm"), "launcher.kind", la.kind, "unknown, expected local or slurm")
    for name in ("nodes", "tasks_per_node", "cpus_per_task", "timeout_min"):
        _require(getattr(la, name) >= 1, f"launcher.{name}", getattr(la, name), "must be >= 1")
    for name in ("gpus_per_node", "signal_delay_s", "max_requeues"):
        _require(getattr(la, name) >= 0, f"launcher.{name}", getattr(la, name), "must be >= 0")
    _require(la.mem_gb > 0, "launcher.mem_gb", la.mem_gb, "must be positive")
    return c


def to_yaml(c: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(c))
