"""Run a few SR steps of a small system for each of several solver cases, on however many ranks
this was launched with, and save energies and parameters (rank 0) per case, for comparison across
rank counts. All cases in one process: one start-up (imports, MPI, the shared compilations) per
rank count instead of one per case.

usage: [mpirun -n K] python agreement.py OUT_DIR N_STEPS CASE ...
  CASE = SOLVER:GRAM_DTYPE:GRAM_BUILD:SAMPLER:MODEL_DTYPE
writes OUT_DIR/SOLVER-GRAM_DTYPE-GRAM_BUILD-SAMPLER-MODEL_DTYPE.npz for each case
"""
from __future__ import annotations

import os
import sys

import numpy as np
from jax.flatten_util import ravel_pytree

from pipeline import compile_cache, dist
from pipeline.config import Config, validate
from pipeline.driver import Driver
from pipeline.system import System

MAX_STEP = 0.05  # binds on some of the steps (test_mpi checks that it does)


def config(solver: str, n_steps: int, gram_dtype: str, gram_build: str, sampler: str,
           model_dtype: str) -> Config:
    c = Config()
    c.model.dtype = model_dtype  # float32: the network's passes in single precision
    c.sampler.kind = sampler  # exact: every rank evaluates the whole table, draws its own chains
    c.model.d, c.model.heads = 8, 2
    c.sampler.n_samples, c.sampler.n_chains, c.sampler.n_thermalize = 192, 96, 4  # 96: 1, 2, 3 ranks
    c.sampler.n_samples_final = 192
    c.optimizer.solver, c.optimizer.warmup = solver, 0
    c.optimizer.gram_dtype = gram_dtype  # float32: the kernel's partial Grams round differently
    c.optimizer.gram_build = gram_build  # xla: the kernel built and summed over ranks inside jit
    c.model.chunk_size = 32  # the Jacobian (and the re-sharding of X) in chunks
    c.optimizer.momentum = 0.9  # the SPRING terms are distributed too (rows of X phi_prev)
    c.optimizer.phase_scale, c.optimizer.phase_scale_final = 10.0, 2.0  # and the phase scale
    c.optimizer.cg_tol, c.optimizer.cg_maxiter = 1e-10, 5000  # converged: no round-off amplification
    c.optimizer.max_step = MAX_STEP  # the trust region's d^T S d is summed over ranks too
    c.run.n_iter = n_steps
    return validate(c, dist.size())


def run_case(path: str, c: Config) -> None:
    driver = Driver(System.build(c))
    state = driver.fresh_state()
    energies, lengths, signs = [], [], []
    for _ in range(c.run.n_iter):
        state, record = driver.step(state)
        energies.append(record.energy)
        lengths.append(record.step_length)
        signs.append((record.phase_coherence, record.minority_sign))
    flat = np.asarray(ravel_pytree(state.vstate.params)[0])
    dist.assert_same("parameters", flat)
    chains = dist.gather_rows(np.asarray(state.vstate.chains))
    if dist.is_root():
        np.savez(path, energies=np.array(energies), lengths=np.array(lengths),
                 signs=np.array(signs), max_step=MAX_STEP, params=flat, chains=chains,
                 n_ranks=dist.size())


def main(out_dir: str, n_steps: str, *cases: str) -> None:
    compile_cache.enable("auto")  # the suite's (VITNQS_COMPILE_CACHE), as the jobs use
    with dist.abort_on_error():
        for case in cases:
            solver, gram_dtype, gram_build, sampler, model_dtype = case.split(":")
            run_case(os.path.join(out_dir, case.replace(":", "-") + ".npz"),
                     config(solver, int(n_steps), gram_dtype, gram_build, sampler, model_dtype))


if __name__ == "__main__":
    main(*sys.argv[1:])
