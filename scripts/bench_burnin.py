"""Burn-in of fresh chains on trained parameters: random starts against ordered starts.

A warm start (run.init_from, scripts/bench_accuracy --warm) gives trained parameters fresh
chains. From random Sz = 0 configurations the chains of an ordered state coarsen their domains
slowly under local exchanges; a warm start therefore lets each chain begin at one of the
lattice's ordered patterns instead (`sampler.ordered_starts`). This prints the energy of the
chains after a number of sweeps from each kind of start, on a state saved by
`scripts/bench_accuracy --save DIR` (its file name gives the attention kind and seed), and the
equilibrium value from the saved (trained, equilibrated) chains.

usage: python scripts/bench_accuracy.py ... --save DIR; then
       python scripts/bench_burnin.py DIR/factored_seed2_warm0.pkl [--size 6] [--sweeps 5,10,20,40,80]
           [--last 4] [key=value ...]
"""
from __future__ import annotations

import argparse
import os
import pickle
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench_accuracy import configure
from pipeline.observables import energy_of, fresh_samples
from pipeline.state import VariationalState
from pipeline.system import System


def energy(vs: VariationalState, burn_in: int, sweeps: int, step: int) -> tuple[VariationalState, float, float]:
    """E/N and its error over `sweeps` sweeps (one sample per chain each) after `burn_in`
    discarded ones; `step` numbers the random streams of each call."""
    vs, smp, n_per_chain = fresh_samples(vs, sweeps * vs.system.cfg.sampler.n_chains, step, burn_in)
    e = energy_of(vs, smp, n_per_chain)
    return vs, e["energy_per_site"], e["energy_error"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("saved")
    ap.add_argument("--size", type=int, default=6)
    ap.add_argument("--sweeps", default="5,10,20,40,80", help="burn-in sweeps at which to measure")
    ap.add_argument("--last", type=int, default=4, help="sweeps measured at each point (then discarded)")
    args, overrides = ap.parse_known_args()
    kind, seed = os.path.basename(args.saved).split("_")[:2]
    seed = int(seed.removeprefix("seed"))
    with open(args.saved, "rb") as f:
        saved = pickle.load(f)
    cfg = configure(args.size, kind, seed,
                    [*saved["overrides"], *overrides, "sampler.n_thermalize=0"])
    system = System.build(cfg)
    params = jax.tree_util.tree_map(jnp.asarray, saved["params"])
    points = [int(x) for x in args.sweeps.split(",")]
    print(f"{args.size}x{args.size} {kind} seed {seed}: {cfg.sampler.n_chains} chains, E/N (S.S units) "
          f"over {args.last} sweeps after each burn-in")
    ref = VariationalState(system, params, jnp.asarray(saved["chains"]))
    _, e, err = energy(ref, 0, 5 * args.last, 0)
    print(f"  saved chains (equilibrium): E/N = {e:.6f} ± {err:.6f}", flush=True)
    for warm, label in ((False, "random"), (True, "ordered")):
        t0 = time.perf_counter()
        vs, done = VariationalState.fresh(system, params, warm=warm), 0
        for k, n in enumerate(points, 1):
            vs, e, err = energy(vs, n - done, args.last, k)
            done = n + args.last
            print(f"  {label:>7} starts, {n:4d} sweeps: E/N = {e:.6f} ± {err:.6f}", flush=True)
        print(f"  ({label} starts: {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
