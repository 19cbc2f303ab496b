"""The VMC loop: sample -> local energies -> statistics -> SR update, with hooks at the edges.

`Driver` owns no files and prints nothing: hooks (see `hooks.py`) log, write results and
checkpoints, and watch for signals. A hook stops the run by raising `StopRun`.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import dist, sr
from .hamiltonian import local_energies
from .sampler import FINAL, INIT, STEP, THERMALIZE, chain_keys, init_chains
from .stats import energy_stats
from .system import System


class NonFiniteEnergy(RuntimeError):
    """The energy or the parameters became non-finite (or blew up) and retries are exhausted."""


class StopRun(Exception):
    """Raised by a hook to end the run cleanly; `requeue` asks the launcher to run it again."""

    def __init__(self, reason: str, step: int, requeue: bool = False) -> None:
        super().__init__(reason)
        self.step, self.requeue = step, requeue


@dataclass
class RunState:
    """The whole mutable state of a run (what a checkpoint holds)."""

    step: int
    params: Any
    opt_state: Any  # (optax state, previous SR direction): see `Driver.init_opt_state`
    chains: jax.Array  # this rank's chains (C_local, N) int8
    lr_scale: float = 1.0  # lowered by each rollback


class Hook(Protocol):
    def on_run_start(self, driver: "Driver", state: RunState) -> None: ...
    def on_step_end(self, driver: "Driver", state: RunState, record: dict) -> None: ...
    def on_rollback(self, driver: "Driver", state: RunState) -> None: ...
    def on_run_end(self, driver: "Driver", state: RunState, final: dict) -> None: ...


@partial(jax.jit, static_argnums=(1, 2))
def _stats(eloc, n_per_chain, n_chains_total, accepted, proposed):
    st = energy_stats(eloc, n_per_chain, n_chains_total)
    acc = dist.allreduce_sum(accepted) / jnp.maximum(dist.allreduce_sum(proposed), 1)
    return st, acc


class Driver:
    """Runs VMC for one `System` on this rank's share of the chains."""

    def __init__(self, system: System, hooks: list[Hook] | None = None) -> None:
        cfg = system.cfg
        self.system, self.cfg, self.hooks = system, cfg, list(hooks or [])
        self.n_ranks, self.rank = dist.size(), dist.rank()
        s = cfg.sampler
        self.n_chains_local = s.n_chains // self.n_ranks
        self.global_ids = jnp.arange(self.n_chains_local) + self.rank * self.n_chains_local
        self.n_per_chain = s.n_samples // s.n_chains
        o = cfg.optimizer
        self.lr = optax.warmup_cosine_decay_schedule(
            o.lr / 10, o.lr, o.warmup, max(cfg.run.n_iter, o.warmup + 1), o.lr_final)
        self.optimizer = optax.sgd(self.lr)
        self.params_template = system.init_params(cfg.run.seed)
        self.n_params = system.n_params(self.params_template)
        self.solver = sr.choose_solver(o.solver, self.n_params, s.n_samples)
        self.last_good: RunState | None = None

    # ---- state ---------------------------------------------------------------------------
    def _keys(self, purpose: int, step: int) -> jax.Array:
        return chain_keys(self.cfg.run.seed, purpose, step, self.global_ids)

    def fresh_state(self) -> RunState:
        """Parameters (broadcast from rank 0), optimizer state and thermalized chains."""
        params = dist.bcast(self.params_template)
        chains = init_chains(self._keys(INIT, 0), self.system.n_sites)
        if self.cfg.sampler.n_thermalize:
            chains, _ = self.system.sampler.run(params, chains, self._keys(THERMALIZE, 0),
                                                self.cfg.sampler.n_thermalize)
        return RunState(0, params, self.init_opt_state(params), chains)

    def init_opt_state(self, params) -> tuple[Any, Any]:
        """The optax state (learning-rate schedule) and the previous SR direction (zero), which
        momentum (optimizer.momentum) carries over from step to step."""
        return self.optimizer.init(params), jax.tree_util.tree_map(jnp.zeros_like, params)

    def fresh_state_templates(self) -> tuple[Any, Any]:
        """(parameters, optimizer state) of the right structure, for reading checkpoints."""
        return self.params_template, self.init_opt_state(self.params_template)

    def _decay(self, step: int, start: float, end: float) -> float:
        """Geometric interpolation from `start` at step 0 to `end` at run.n_iter."""
        frac = min(step / max(self.cfg.run.n_iter, 1), 1.0)
        return start * (end / start) ** frac

    def diag_shift(self, step: int) -> float:
        o = self.cfg.optimizer
        return self._decay(step, o.diag_shift, o.diag_shift_final)

    def phase_scale(self, step: int) -> float:
        o = self.cfg.optimizer
        return self._decay(step, o.phase_scale, o.phase_scale_final)

    # ---- one step --------------------------------------------------------------------------
    def estimate(self, params, chains, keys, n_per_chain: int):
        """Sample and compute local energies and their statistics (all ranks)."""
        t0 = time.perf_counter()
        chains, smp = self.system.sampler.run(params, chains, keys, n_per_chain)
        smp.s.block_until_ready()
        t1 = time.perf_counter()
        eloc = local_energies(self.system.hamiltonian, self.system.logpsi, params, smp.s,
                              smp.logpsi, self.cfg.model.chunk_size)
        st, acc = _stats(eloc, n_per_chain, self.cfg.sampler.n_chains, smp.accepted, smp.proposed)
        st.mean.block_until_ready()
        return chains, smp, eloc, st, float(acc), (t0, t1, time.perf_counter())

    def step(self, state: RunState) -> tuple[RunState, dict]:
        """One SR step; the record holds the energy of the parameters *before* the update."""
        N = self.system.n_sites
        chains, smp, eloc, st, acc, (t0, t1, t2) = self.estimate(
            state.params, state.chains, self._keys(STEP, state.step), self.n_per_chain)
        shift, kappa = self.diag_shift(state.step), self.phase_scale(state.step)
        o = self.cfg.optimizer
        optax_state, previous = state.opt_state
        direction, info = sr.direction(self.system.logpsi, state.params, smp.s, eloc,
                                       self.cfg.sampler.n_samples, jnp.asarray(shift),
                                       jnp.asarray(kappa), self.solver, self.cfg.model.chunk_size,
                                       o.cg_tol, o.cg_maxiter, previous, jnp.asarray(o.momentum))
        scaled = jax.tree_util.tree_map(lambda g: g * state.lr_scale, direction)
        updates, optax_state = self.optimizer.update(scaled, optax_state, state.params)
        params = optax.apply_updates(state.params, updates)
        opt_state = (optax_state, direction)
        jax.block_until_ready(params)
        t3 = time.perf_counter()
        cg_iters = int(info.cg_iterations)
        record = {
            "step": state.step,
            "energy": float(st.mean.real) / N,
            "energy_imag": float(st.mean.imag) / N,
            "energy_error": float(st.error) / N,
            "variance": float(st.variance) / N,
            "acceptance": acc,
            "r_hat": float(st.r_hat),
            "seconds": t3 - t0,
            "t_sample": t1 - t0, "t_energy": t2 - t1, "t_sr": t3 - t2,
            "lr": float(self.lr(state.step)) * state.lr_scale,
            "diag_shift": shift,
            "phase_scale": kappa,
            "cg_iterations": cg_iters,
            "sr_residual": float(info.residual),
            "bytes_comm": sr.bytes_per_step(self.solver, self.n_params,
                                            self.cfg.sampler.n_samples, cg_iters)
            if self.n_ranks > 1 else 0,
        }
        new = RunState(state.step + 1, params, opt_state, chains, state.lr_scale)
        return new, record

    def _blown_up(self, record: dict, params) -> bool:
        """Non-finite energy or parameters, or an energy beyond any physical bound."""
        ham = self.system.hamiltonian
        bound = 0.75 * float(np.abs(ham.J).sum()) / self.system.n_sites
        finite = all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(params))
        e = record["energy"]
        return not (finite and math.isfinite(e) and abs(e) <= 2 * bound)

    # ---- the loop --------------------------------------------------------------------------
    def run(self, state: RunState) -> tuple[RunState, dict | None]:
        """Train until run.n_iter, then measure the final energy. Returns (state, final)."""
        for h in self.hooks:
            h.on_run_start(self, state)
        self.last_good = self.last_good or state
        rollbacks = 0
        while state.step < self.cfg.run.n_iter:
            new, record = self.step(state)
            if self._blown_up(record, new.params):
                if rollbacks >= self.cfg.run.max_rollbacks:
                    raise NonFiniteEnergy(
                        f"non-finite or exploding energy at step {state.step} "
                        f"(E/N={record['energy']}); gave up after {rollbacks} rollbacks. "
                        "Lower optimizer.lr or raise optimizer.diag_shift.")
                rollbacks += 1
                state = replace(self.last_good, lr_scale=self.last_good.lr_scale * 0.5 ** rollbacks)
                dist.print0(f"step {record['step']}: non-finite or exploding energy; rolled back to "
                            f"step {state.step} with lr scale {state.lr_scale:g} "
                            f"(retry {rollbacks}/{self.cfg.run.max_rollbacks})")
                for h in self.hooks:
                    h.on_rollback(self, state)
                continue
            state = new
            for h in self.hooks:
                h.on_step_end(self, state, record)
        final = self.measure(state)
        for h in self.hooks:
            h.on_run_end(self, state, final)
        return state, final

    def measure(self, state: RunState) -> dict:
        """Final energy on a fresh, larger sample (n_samples_final), not the last step's."""
        s = self.cfg.sampler
        n_per_chain = s.n_samples_final // s.n_chains
        _, _, eloc, st, acc, _ = self.estimate(state.params, state.chains,
                                              self._keys(FINAL, state.step), n_per_chain)
        N = self.system.n_sites
        e, err, var = float(st.mean.real) / N, float(st.error) / N, float(st.variance) / N
        ref = reference(self.system)
        return {
            "energy_per_site": e, "energy_error": err, "energy_imag": float(st.mean.imag) / N,
            "variance_per_site": var,
            "v_score": N * float(st.variance) / float(st.mean.real) ** 2,
            "reference_energy_per_site": ref if ref is not None else np.nan,
            "relative_error": (e - ref) / abs(ref) if ref is not None else np.nan,
            "n_samples": s.n_samples_final, "r_hat": float(st.r_hat), "acceptance": acc,
            "step": state.step,
        }


def reference(system: System) -> float | None:
    """Exact (N <= 20) or best published ground-state energy per site, or None."""
    from . import exact

    cfg = system.cfg
    if cfg.lattice.kind == "square" and cfg.hamiltonian.J1 == 1.0:
        row = exact.reference_energy(cfg.lattice.L, cfg.hamiltonian.J2)
        if row is not None:
            return row[0]
    if system.n_sites <= exact.MAX_SITES:
        return exact.ground_state(system.hamiltonian)[0]
    return None
