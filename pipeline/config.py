"""The one config layer: schema (Hydra structured configs), composition, validation, resume diff.

Types, unknown keys and the choices (Enums below) are checked by OmegaConf against these
dataclasses when Hydra composes the config; `validate` checks values and cross-field constraints
and raises `ConfigError` with a one-line message that names the field and the value. This module
starts no JAX: the launcher, `aggregate` and `watch` use it on machines without devices.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Optional

import yaml
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import ConfigError

SEED_LIMIT = 2 ** 63  # JAX keys take a signed 64-bit seed
EXACT_MAX_SITES = 20  # exact diagonalization and sampler.kind=exact: the Sz = 0 sector has 184756 states


class LatticeKind(StrEnum):
    square = "square"
    shastry_sutherland = "shastry_sutherland"


class Attention(StrEnum):
    factored = "factored"
    standard = "standard"


class Symmetry(StrEnum):
    """Projection group: none, the b^2 intra-patch translations, or those x C4v x spin flip."""

    none = "none"
    translations = "translations"
    full = "full"


class Solver(StrEnum):
    """dense | cg | kernel (minSR, distributed by parameter blocks on K ranks) | kernel_gather (minSR
    with X gathered on every rank, the reference) | auto (by P, N_tot and K; see sr.choose_solver)."""

    auto = "auto"
    dense = "dense"
    cg = "cg"
    kernel = "kernel"
    kernel_gather = "kernel_gather"


class Precision(StrEnum):
    """Floating-point precision of one part of the computation: the ViT's forward and backward
    passes (model.dtype; parameters, log psi, local energies and SR stay float64 either way) or
    the accumulation of the kernel solvers' X X^T (optimizer.gram_dtype; solved in float64)."""

    float64 = "float64"
    float32 = "float32"


class SamplerKind(StrEnum):
    """exchange: Metropolis with spin-exchange moves | exact: independent draws from |psi|^2 over
    the whole Sz = 0 sector (N <= 20), with local energies from the sparse Hamiltonian."""

    exchange = "exchange"
    exact = "exact"


class GramBuild(StrEnum):
    """Where the kernel solvers' X X^T is built: inside jit (XLA, the upper block triangle) or,
    on CPU, on the host by BLAS syrk."""

    xla = "xla"
    blas = "blas"


class LauncherKind(StrEnum):
    local = "local"
    slurm = "slurm"


@dataclass
class LatticeConfig:
    L: int = 4  # linear size; N = L^2 sites, periodic
    patch: int = 2  # patch side b; L % b == 0
    kind: LatticeKind = LatticeKind.square


@dataclass
class HamiltonianConfig:
    J1: float = 1.0  # nearest-neighbour coupling (J on the Shastry-Sutherland lattice)
    J2: float = 0.5  # next-nearest coupling (the dimer coupling J' on Shastry-Sutherland)
    marshall_sign: bool = True  # rotate the sign of off-diagonal J1 terms (sublattice rotation)


@dataclass
class ModelConfig:
    attention: Attention = Attention.factored
    d: int = 16  # embedding dimension
    heads: int = 2
    layers: int = 1
    translation_invariant: bool = True  # factored weights alpha(r_i - r_j) instead of alpha_ij
    symmetry: Symmetry = Symmetry.none
    chunk_size: int = 0  # configurations per forward pass and samples per Jacobian chunk (0: automatic
    # forward chunks from a memory budget, budget.forward_chunk; the Jacobian in one piece)
    dtype: Precision = Precision.float64  # arithmetic of the network's passes (params: float64)

    @property
    def name(self) -> str:
        """vit_factored | vit_standard: derived from the attention kind, never set apart from it."""
        return f"vit_{self.attention}"


@dataclass
class SamplerConfig:
    kind: SamplerKind = SamplerKind.exchange  # exchange (Metropolis) | exact (N <= 20: whole sector)
    n_samples: int = 1024  # samples per SR step, all ranks together
    n_chains: int = 1024  # Markov chains, all ranks together
    sweep_size: int = 0  # proposals between samples (0: N)
    n_thermalize: int = 20  # sweeps discarded when chains are created and before the final measurement
    n_samples_final: int = 16384  # samples of the final energy measurement
    next_nearest_moves: bool = True  # propose exchanges on second-family bonds too
    final_symmetry: Optional[Symmetry] = None  # projection of the final measurement (None: that of the last step)


@dataclass
class OptimizerConfig:
    lr: float = 0.02
    lr_final: float = 0.002  # cosine decay from lr to lr_final over run.n_iter
    warmup: int = 20  # linear warm-up steps
    diag_shift: float = 1e-3  # lambda in (S + lambda I)
    diag_shift_final: float = 1e-4  # lambda decays geometrically to this value
    solver: Solver = Solver.auto
    momentum: float = 0.9  # SPRING momentum mu on the SR direction, 0 <= mu < 1 (0: plain SR)
    phase_scale: float = 1.0  # phase time step / amplitude time step (1: plain SR)
    phase_scale_final: float = 1.0  # decays geometrically to this value, like diag_shift
    max_step: float = 0.0  # trust region: longest update, lr sqrt(d^T S d) (0: no limit)
    gram_dtype: Precision = Precision.float64  # kernel solvers: X X^T accumulated in this dtype
    gram_build: GramBuild = GramBuild.blas  # kernel solvers on CPU: X X^T by host BLAS or XLA
    cg_tol: float = 1e-6
    cg_maxiter: int = 200


@dataclass
class AnalysisConfig:
    every_steps: int = 25  # attention maps of the chains into results.h5 /attention (0: off)


@dataclass
class RunConfig:
    n_iter: int = 300
    seed: int = 0
    allow_changed: list = field(default_factory=list)  # keys that may differ on resume
    max_rollbacks: int = 3  # rollbacks after a failed step, per run (kept in checkpoints)
    max_rise: float = 0.02  # a step whose E/N rose this share of |lowest| above it fails (0: off)
    steps_per_job: int = 0  # stop (with a checkpoint) after this many steps in one job; 0: no limit
    init_from: Optional[str] = None  # warm start from this run directory's checkpoint (warmstart.py)
    finetune_steps: int = 0  # the last steps: projection 'full' at optimizer.lr_final (driver.py)
    compile_cache: Optional[str] = "auto"  # compiled executables kept on disk (compile_cache.py)


@dataclass
class CheckpointConfig:
    every_steps: int = 50  # also the step interval of the in-memory rollback snapshot
    every_minutes: float = 10.0
    keep: int = 3


@dataclass
class LauncherConfig:
    kind: LauncherKind = LauncherKind.local
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
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)


# ---- composition -------------------------------------------------------------------------------
def conf_dir() -> str:
    """The Hydra config directory: shipped inside the installed package (pipeline/conf), or
    `conf/` at the top of a source checkout."""
    here = os.path.dirname(os.path.abspath(__file__))
    for candidate in (os.path.join(here, "conf"), os.path.join(os.path.dirname(here), "conf")):
        if os.path.isfile(os.path.join(candidate, "config.yaml")):
            return candidate
    raise FileNotFoundError(f"no Hydra configs (config.yaml) next to {here}")


def register() -> None:
    """Make the schema available to Hydra as `base_config` (first entry of conf/config.yaml)."""
    ConfigStore.instance().store(name="base_config", node=Config)


def compose(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The config Hydra would compose for `python -m pipeline OVERRIDES` (for scripts and tests)."""
    from hydra import compose as hydra_compose, initialize_config_dir

    register()
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))


# ---- validation --------------------------------------------------------------------------------
def _require(ok: bool, name: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"{name}={value!r}: {why}")


def _finite_positive(name: str, value: float) -> None:
    _require(math.isfinite(value), name, value, "must be finite")
    _require(value > 0, name, value, "must be positive")


def _typed(cfg: DictConfig | Config) -> Config:
    """A `Config` object; a value of the wrong type or an unknown choice becomes a ConfigError."""
    try:
        given = dataclasses.asdict(cfg) if isinstance(cfg, Config) else cfg
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), given))
    except OmegaConfBaseException as e:
        why = str(getattr(e, "msg", e)).splitlines()[0]
        value = getattr(e, "value", None)
        raise ConfigError(f"{e.full_key}={value!r}: {why}" if getattr(e, "full_key", None)
                          else why) from None


def validate(cfg: DictConfig | Config, n_ranks: int = 1) -> Config:
    """Check values and constraints; returns a plain `Config` object."""
    c = _typed(cfg)
    lat, ham, m, s, o, r, ck = c.lattice, c.hamiltonian, c.model, c.sampler, c.optimizer, c.run, c.checkpoint
    _require(lat.L >= 2, "lattice.L", lat.L, "must be >= 2")
    _require(lat.patch >= 1, "lattice.patch", lat.patch, "must be >= 1")
    _require(lat.L % lat.patch == 0, "lattice.L", lat.L, f"not divisible by lattice.patch={lat.patch}")
    _require(lat.L * lat.L % 2 == 0, "lattice.L", lat.L, f"N = L^2 = {lat.L ** 2} is odd: no Sz=0 sector")
    _require(lat.kind == LatticeKind.square or lat.L % 2 == 0, "lattice.L", lat.L,
             "Shastry-Sutherland needs even L")
    for name in ("J1", "J2"):
        v = getattr(ham, name)
        _require(math.isfinite(v), f"hamiltonian.{name}", v, "must be finite")
    _require(ham.J1 != 0 or ham.J2 != 0, "hamiltonian.J1", ham.J1,
             "and hamiltonian.J2 are both zero: no Hamiltonian")
    _require(m.d >= 1, "model.d", m.d, "must be >= 1")
    _require(m.heads >= 1, "model.heads", m.heads, "must be >= 1")
    _require(m.d % m.heads == 0, "model.heads", m.heads, f"does not divide model.d={m.d}")
    _require(m.layers >= 0, "model.layers", m.layers, "must be >= 0")
    if lat.kind == LatticeKind.shastry_sutherland:  # only shifts by even vectors keep the dimers
        for name, value in (("model.symmetry", m.symmetry),
                            ("sampler.final_symmetry", s.final_symmetry or Symmetry.none),
                            ("run.finetune_steps", Symmetry.full if r.finetune_steps else
                             Symmetry.none)):
            _require(value == Symmetry.none, name, str(value) if name != "run.finetune_steps"
                     else r.finetune_steps,
                     "projects over shifts by one site (and rotations), which move the "
                     "Shastry-Sutherland dimers onto empty plaquettes; use no projection")
        _require(lat.patch % 2 == 0, "lattice.patch", lat.patch,
                 "an odd patch makes the ViT invariant under shifts by an odd number of sites, "
                 "which are not symmetries of the Shastry-Sutherland dimers; use an even patch")
    _require(m.chunk_size >= 0, "model.chunk_size", m.chunk_size, "must be >= 0")
    for name in ("n_samples", "n_chains", "n_samples_final"):
        _require(getattr(s, name) > 0, f"sampler.{name}", getattr(s, name), "must be positive")
    _require(s.n_samples % s.n_chains == 0, "sampler.n_samples", s.n_samples,
             f"not a multiple of sampler.n_chains={s.n_chains}")
    _require(s.n_samples_final % s.n_chains == 0, "sampler.n_samples_final", s.n_samples_final,
             f"not a multiple of sampler.n_chains={s.n_chains}")
    _require(s.n_chains % n_ranks == 0, "sampler.n_chains", s.n_chains,
             f"not divisible by the number of MPI ranks ({n_ranks})")
    _require(s.kind == SamplerKind.exchange or lat.L * lat.L <= EXACT_MAX_SITES, "sampler.kind",
             str(s.kind), f"enumerates the Sz = 0 sector, limited to N <= {EXACT_MAX_SITES} sites "
             f"(here N = {lat.L ** 2}); use sampler.kind=exchange")
    _require(s.sweep_size >= 0, "sampler.sweep_size", s.sweep_size, "must be >= 0")
    _require(s.n_thermalize >= 0, "sampler.n_thermalize", s.n_thermalize, "must be >= 0")
    for name in ("lr", "lr_final", "diag_shift", "diag_shift_final", "phase_scale",
                 "phase_scale_final", "cg_tol"):
        _finite_positive(f"optimizer.{name}", getattr(o, name))
    _require(o.warmup >= 0, "optimizer.warmup", o.warmup, "must be >= 0")
    _require(0 <= o.momentum < 1, "optimizer.momentum", o.momentum, "must be in [0, 1)")
    _require(math.isfinite(o.max_step) and o.max_step >= 0, "optimizer.max_step", o.max_step,
             "must be finite and >= 0 (0: no limit)")
    _require(o.cg_maxiter > 0, "optimizer.cg_maxiter", o.cg_maxiter, "must be positive")
    _require(r.n_iter > 0, "run.n_iter", r.n_iter, "must be positive")
    _require(0 <= r.seed < SEED_LIMIT, "run.seed", r.seed, "must be in [0, 2^63)")
    _require(r.steps_per_job >= 0, "run.steps_per_job", r.steps_per_job, "must be >= 0")
    _require(0 <= r.finetune_steps < r.n_iter, "run.finetune_steps", r.finetune_steps,
             f"must be in [0, run.n_iter={r.n_iter})")
    _require(r.max_rollbacks >= 0, "run.max_rollbacks", r.max_rollbacks, "must be >= 0")
    _require(math.isfinite(r.max_rise) and r.max_rise >= 0, "run.max_rise", r.max_rise,
             "must be finite and >= 0 (0: off)")
    _require(c.analysis.every_steps >= 0, "analysis.every_steps", c.analysis.every_steps,
             "must be >= 0 (0: off)")
    _require(ck.every_steps > 0, "checkpoint.every_steps", ck.every_steps, "must be positive")
    _require(ck.every_minutes > 0, "checkpoint.every_minutes", ck.every_minutes, "must be positive")
    _require(ck.keep >= 1, "checkpoint.keep", ck.keep, "must be >= 1")
    la = c.launcher
    for name in ("nodes", "tasks_per_node", "cpus_per_task", "timeout_min"):
        _require(getattr(la, name) >= 1, f"launcher.{name}", getattr(la, name), "must be >= 1")
    for name in ("gpus_per_node", "signal_delay_s", "max_requeues"):
        _require(getattr(la, name) >= 0, f"launcher.{name}", getattr(la, name), "must be >= 0")
    _require(la.mem_gb > 0, "launcher.mem_gb", la.mem_gb, "must be positive")
    return c


def to_yaml(c: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(c))


# ---- resume: which differences from the checkpoint's config are allowed --------------------------
# Keys that may differ from the checkpoint's config on resume without run.allow_changed: they
# change neither the model nor the trajectory (chunk sizes and where X X^T is built: round-off).
ALWAYS_CHANGEABLE = ("analysis.", "checkpoint.", "launcher.", "model.chunk_size",
                     "optimizer.gram_build", "sampler.n_samples_final",
                     "run.allow_changed", "run.max_rollbacks", "run.max_rise",
                     "run.steps_per_job", "run.init_from", "run.compile_cache")


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out |= _flatten(v, f"{prefix}{k}.")
        return out
    return {prefix[:-1]: d}


def config_differences(stored_yaml: str, current: Config) -> list[str]:
    """Dotted keys whose values differ and that the resume may not change. A key the stored
    config lacks (a checkpoint of an older version) counts as its default: keys are added with
    defaults that keep the earlier behaviour."""
    old, new = _flatten(yaml.safe_load(stored_yaml)), _flatten(yaml.safe_load(to_yaml(current)))
    defaults = _flatten(yaml.safe_load(to_yaml(Config())))
    old = {k: old.get(k, defaults.get(k)) for k in set(old) | set(new)}
    allowed = ALWAYS_CHANGEABLE + tuple(current.run.allow_changed)
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k) and not any(k == a or (a.endswith(".") and k.startswith(a))
                                                    for a in allowed)]
