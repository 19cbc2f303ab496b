"""Time the phases of one SR step on fixed inputs (no sampling noise): the SR direction
(Jacobian, kernel build and solve), the Jacobian alone and the local energies, median and minimum
of several repetitions. Settings: the 4x4 accuracy benchmark's model (d = 32, 4 heads, 1 layer,
translation projection, automatic chunks) on 1024 random Sz = 0 configurations, unless overridden.

To compare two versions of the code, run it in both checkouts (e.g. a `git worktree` of the older
commit, with PYTHONPATH pointing at it), alternately, on a quiet machine.

usage: python scripts/bench_phases.py [--repeat 5] [--label NAME] [hydra overrides ...]
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from pipeline import sr
from pipeline.config import compose, validate
from pipeline.hamiltonian import local_energies
from pipeline.system import System

DEFAULTS = ["model.d=32", "model.heads=4", "model.symmetry=translations", "optimizer.solver=kernel"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--label", default="")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_intermixed_args()  # key=value overrides may come before or after options
    c = validate(compose([*DEFAULTS, *args.overrides]))
    system = System.build(c)
    params = system.init_params(0)
    n, chunk, rows = c.sampler.n_samples, system.chunk, system.jacobian_chunk
    rng = np.random.default_rng(0)
    base = np.repeat([1, -1], system.n_sites // 2).astype(np.int8)
    s = jnp.asarray(np.stack([rng.permutation(base) for _ in range(n)]))
    eloc = jnp.asarray(rng.normal(size=n) + 1j * rng.normal(size=n))
    lp = system.logpsi(params, s)
    zero = jax.tree_util.tree_map(jnp.zeros_like, params)
    jac = jax.jit(lambda p, x: sr.jacobian(system.logpsi, p, x, rows))
    phases = {
        "SR direction": lambda: sr.direction(system.logpsi, params, s, eloc, n, jnp.asarray(1e-3),
                                             jnp.asarray(10.0), str(c.optimizer.solver), rows,
                                             1e-6, 10, zero, jnp.asarray(0.9),
                                             str(c.optimizer.gram_dtype)),
        "Jacobian": lambda: jac(params, s),
        "local energies": lambda: local_energies(system.hamiltonian, system.logpsi, params, s, lp,
                                                 chunk),
    }
    print(f"{args.label} P={system.n_params(params)} samples={n} forward chunk {chunk} Jacobian "
          f"chunk {rows or 'all'} (seconds: median, min of {args.repeat})")
    for name, f in phases.items():
        jax.block_until_ready(f())  # compile
        times = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            jax.block_until_ready(f())
            times.append(time.perf_counter() - t)
        print(f"{args.label} {name:>15}: {statistics.median(times):.3f} {min(times):.3f}", flush=True)


if __name__ == "__main__":
    main()
