"""The VMC loop: sample -> local energies -> statistics -> SR update, with hooks at the edges.

The loop only orchestrates: the `VariationalState` samples and estimates, the SR `Preconditioner`
turns samples into an update, hooks (see `hooks.py`) log, write results and checkpoints and watch
for signals. The loop owns the rollback policy: a snapshot of the run state taken at step counts
(the start of the job, then every checkpoint.every_steps steps the state whose energy the step
has just measured and passed, so a rollback never returns to parameters that already failed),
to which a failed step returns with half the learning rate, at most run.max_rollbacks times per
run (the count is part of the run state, so checkpoints carry it across jobs). A step fails when
its energy or the new parameters are non-finite, when its energy is beyond any physical bound,
or when its energy rose far above the lowest seen so far (`collapsed`: a state that falls apart
while its energy stays inside the bound). A hook stops the run by raising `StopRun`.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from . import dist, observables
from .records import StepRecord
from .sampler import STEP, THERMALIZE
from .sr import Preconditioner, SRState
from .state import VariationalState
from .config import Symmetry
from .system import System


RISE_ERRORS = 10.0  # a collapse rises by more than this many of its step's error bars


class NonFiniteEnergy(RuntimeError):
    """The energy or the parameters became non-finite, blew up or collapsed, and retries are
    exhausted."""


class StopRun(Exception):
    """Raised by a hook to end the run cleanly after a checkpoint; `state` is the status to
    record: "stopped", "requeued" (asks the launcher to run it again) or "cancelled"."""

    def __init__(self, reason: str, step: int, state: str = "stopped") -> None:
        super().__init__(reason)
        self.step, self.state = step, state

    @property
    def requeue(self) -> bool:
        return self.state == "requeued"


@jax.jit
def _all_finite(tree) -> jax.Array:
    """Whether every entry of every leaf is finite (one program, not two per leaf)."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]))


@dataclass(frozen=True)
class RunState:
    """The whole state of a run (what a checkpoint holds)."""

    step: int
    vstate: VariationalState  # parameters and this rank's chains
    sr_state: SRState  # optimizer state and the previous direction
    rollbacks: int = 0  # rollbacks so far in this run
    # min over the steps so far of E/N + 2 errors: the reference of `Driver.collapsed` (kept in
    # checkpoints, so a resumed run judges its steps as the uninterrupted one would)
    energy_floor: float = math.inf

    @property
    def lr_scale(self) -> float:
        """Each rollback halves the learning rate for the rest of the run."""
        return 0.5 ** self.rollbacks


class Hook(Protocol):
    def on_run_start(self, state: RunState) -> None: ...
    def on_step_end(self, state: RunState, record: StepRecord) -> None: ...
    def on_rollback(self, state: RunState) -> None: ...
    def on_run_end(self, state: RunState, final: dict) -> None: ...


class Driver:
    """Runs VMC for one `System` on this rank's share of the chains."""

    def __init__(self, system: System, hooks: list[Hook] | None = None,
                 preconditioner: Preconditioner | None = None) -> None:
        cfg = system.cfg
        self.system, self.cfg, self.hooks = system, cfg, list(hooks or [])
        self.n_per_chain = cfg.sampler.n_samples // cfg.sampler.n_chains
        self.n_params = system.n_params(system.init_params(cfg.run.seed))
        self.finetune = system.with_symmetry(Symmetry.full) if cfg.run.finetune_steps else None
        last = Symmetry.full if self.finetune else cfg.model.symmetry
        self.final_system = system.with_symmetry(cfg.sampler.final_symmetry or last)
        self.switch = cfg.run.n_iter - cfg.run.finetune_steps
        self.preconditioner = preconditioner or Preconditioner(
            cfg.optimizer, self.switch, self.n_params, cfg.sampler.n_samples,
            system.jacobian_chunk)

    def set_horizon(self, n_iter: int) -> None:
        """Where the schedules end: fine-tuning takes the last run.finetune_steps of `n_iter`
        steps on the fully projected state, after the schedules (lr -> lr_final, diag_shift ->
        diag_shift_final, ...) have reached their final values at n_iter - finetune_steps. The
        optimizer state does not depend on it, so a run may move its horizon (`deadline.train`);
        the preconditioner itself is kept (`Preconditioner.set_horizon`)."""
        self.switch = n_iter - self.cfg.run.finetune_steps
        self.preconditioner.set_horizon(self.switch)

    @property
    def solver(self) -> str:
        return self.preconditioner.solver

    def fresh_state(self, params=None) -> RunState:
        """Step 0: parameters from the seed, or `params` (a warm start: its chains may begin at
        the ordered pattern its |psi|^2 favours, `VariationalState.fresh`), fresh chains."""
        vs = VariationalState.fresh(self.system, params, warm=params is not None)
        return RunState(0, vs, self.preconditioner.init(vs.params))

    def templates(self) -> tuple[Any, SRState]:
        """(parameters, SR state) of the right structure, for reading checkpoints."""
        params = self.system.init_params(self.cfg.run.seed)
        return params, self.preconditioner.init(params)

    # ---- one step --------------------------------------------------------------------------
    def step(self, state: RunState) -> tuple[RunState, StepRecord]:
        """One SR step; the record holds the energy of the parameters *before* the update."""
        t0 = time.perf_counter()
        vs, smp = self._phase(state).sample(self.n_per_chain, STEP, state.step)
        smp.s.block_until_ready()
        t1 = time.perf_counter()
        eloc = vs.local_energies(smp)
        st = vs.statistics(eloc, self.n_per_chain)
        acc = vs.acceptance(smp)
        coherence, minority = vs.sign_structure(smp)
        t2 = time.perf_counter()
        params, sr_state, info = self.preconditioner.update(
            vs.system.logpsi, vs.params, smp.s, eloc, state.sr_state, state.step, state.lr_scale)
        jax.block_until_ready(params)
        t3 = time.perf_counter()
        N = self.system.n_sites
        record = StepRecord(
            step=state.step, energy=float(st.mean.real) / N, energy_error=float(st.error) / N,
            energy_imag=float(st.mean.imag) / N, variance=float(st.variance) / N, acceptance=acc,
            r_hat=float(st.r_hat), phase_coherence=coherence, minority_sign=minority,
            seconds=t3 - t0, t_sample=t1 - t0, t_energy=t2 - t1, t_sr=t3 - t2, **info)
        return replace(state, step=state.step + 1, vstate=vs.replace(params=params),
                       sr_state=sr_state), record

    def _phase(self, state: RunState) -> VariationalState:
        """The state with the system of its phase: from step n_iter - run.finetune_steps on, the
        fully projected one; entering that phase the chains first discard sampler.n_thermalize
        sweeps under it (a run resumed later in the phase has chains that already did)."""
        vs = state.vstate
        if self.finetune is None or state.step < self.switch or vs.system is self.finetune:
            return vs
        vs = vs.replace(system=self.finetune)
        if state.step == self.switch:
            vs = vs.thermalize(self.cfg.sampler.n_thermalize, THERMALIZE, state.step)
        return vs

    def blown_up(self, record: StepRecord, params) -> bool:
        """Non-finite energy or parameters, or an energy beyond any physical bound."""
        bound = 0.75 * float(np.abs(self.system.hamiltonian.J).sum()) / self.system.n_sites
        return not (bool(_all_finite(params)) and math.isfinite(record.energy)
                    and abs(record.energy) <= 2 * bound)

    def collapsed(self, record: StepRecord, floor: float) -> bool:
        """The energy rose above `floor` (the run's lowest E/N + 2 errors) by more than
        run.max_rise of |floor| and by more than RISE_ERRORS of its own error bars: far beyond
        the noise of a healthy run (at most 0.2% and 2 error bars in a logged 6x6 run),
        where a rare large local energy inflates the error bar with the mean. run.max_rise = 0
        turns the test off."""
        rise, limit = record.energy - floor, self.cfg.run.max_rise
        return limit > 0 and rise > max(limit * abs(floor), RISE_ERRORS * record.energy_error)

    def failure(self, record: StepRecord, params, floor: float) -> str | None:
        """Why the step that measured `record` and produced `params` failed, or None."""
        if self.blown_up(record, params):
            return "non-finite or exploding energy"
        if self.collapsed(record, floor):
            return (f"collapse: E/N rose to {record.energy:.6f} ± {record.energy_error:.6f} "
                    f"above the floor {floor:.6f} (run.max_rise={self.cfg.run.max_rise:g})")
        return None

    def advance(self, state: RunState, snapshot: RunState
                ) -> tuple[RunState, StepRecord | None, RunState]:
        """One step under the rollback policy: (new state, its record, snapshot); at every
        checkpoint.every_steps steps the snapshot moves to `state`, whose parameters this step
        has just measured and found sound (the new parameters are not measured until the next
        step: a snapshot of them could hold the very state that fails next, and every rollback
        to it would fail again). After a failed step: (snapshot with one more rollback, None,
        snapshot). Every training loop steps through here (`run`, `deadline.train`)."""
        new, record = self.step(state)
        reason = self.failure(record, new.vstate.params, state.energy_floor)
        if reason:
            return self._rollback(state, snapshot, record, reason), None, snapshot
        new = replace(new, energy_floor=min(state.energy_floor,
                                            record.energy + 2 * record.energy_error))
        return new, record, state if state.step % self.cfg.checkpoint.every_steps == 0 else snapshot

    # ---- the loop --------------------------------------------------------------------------
    def run(self, state: RunState) -> tuple[RunState, dict]:
        """Train until run.n_iter, then measure the energy on fresh samples. Returns
        (state, final measurement)."""
        for h in self.hooks:
            h.on_run_start(state)
        snapshot = state
        while state.step < self.cfg.run.n_iter:
            state, record, snapshot = self.advance(state, snapshot)
            if record is not None:
                for h in self.hooks:
                    h.on_step_end(state, record)
        final = observables.energy(state.vstate.replace(system=self.final_system),
                                   self.cfg.sampler.n_samples_final, state.step)
        final["symmetry"] = str(self.final_system.cfg.model.symmetry)
        for h in self.hooks:
            h.on_run_end(state, final)
        return state, final

    def _rollback(self, state: RunState, snapshot: RunState, record: StepRecord,
                  reason: str) -> RunState:
        limit = self.cfg.run.max_rollbacks
        if state.rollbacks >= limit:
            raise NonFiniteEnergy(
                f"{reason} at step {record.step} (E/N={record.energy}); "
                f"gave up after {state.rollbacks} rollbacks. Lower optimizer.lr or raise "
                "optimizer.diag_shift.")
        back = replace(snapshot, rollbacks=state.rollbacks + 1)
        dist.print0(f"step {record.step}: {reason}; rolled back to step "
                    f"{back.step} with lr scale {back.lr_scale:g} (rollback {back.rollbacks}/{limit})")
        for h in self.hooks:
            h.on_rollback(back)
        return back
