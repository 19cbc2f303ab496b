"""Train with the accuracy-benchmark settings for a fixed number of SR steps and print, every K
steps, the exact energy of the variational state (a full sum over the Sz = 0 sector, N <= 20),
then where the remaining error sits: the sign structure or the amplitudes.

The exact sums are not timed and do not touch the run (its random streams and updates are those of
an ordinary run). Used for the tables in README, "Accuracy per wall-clock budget".

`optimizer.gram_dtype=float64|float32` (the kernel X X^T accumulated in double or single
precision, the solve in float64 either way) is the experiment behind `scripts/bench_gram`.

usage: python scripts/track_exact.py [--kind factored] [--seed 0] [--steps 300] [--every 50]
                                     [key=value ...]
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from bench_accuracy import configure
from pipeline import exact
from pipeline.driver import Driver
from pipeline.system import System


def energy(h, psi: np.ndarray, n_sites: int) -> float:
    return exact.expectation(h, psi, n_sites)["energy_per_site"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kind", default="factored")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_intermixed_args()  # key=value overrides may come before or after options
    cfg = configure(4, args.kind, args.seed, [*args.overrides, f"run.n_iter={args.steps}"])
    system = System.build(cfg)
    N = system.n_sites
    h, basis = exact.sparse_hamiltonian(system.hamiltonian)
    e0, gs = exact.lowest_state(h, N)
    vector = exact.state_vector(system.logpsi, basis, N)
    projected = exact.state_vector(system.with_symmetry("full").logpsi, basis, N)
    rel = lambda e: (e - e0) / abs(e0)  # noqa: E731
    driver = Driver(system)
    state = driver.fresh_state()
    train_s = 0.0
    print(f"{args.kind}, {driver.n_params} params, overrides {args.overrides}; exact E0/N = {e0:.8f}")
    while state.step < args.steps:
        t = time.perf_counter()
        state, rec = driver.step(state)
        train_s += time.perf_counter() - t
        if state.step % args.every == 0 or state.step == args.steps:
            e = energy(h, vector(state.vstate.params), N)
            e_full = energy(h, projected(state.vstate.params), N)
            print(f"step {state.step:5d}  train {train_s:7.1f} s  exact E/N {e:.6f}  "
                  f"rel. error {rel(e):.2e}  fully projected {rel(e_full):.2e}  "
                  f"(MC E/N of the step {rec.energy:.5f})", flush=True)
    psi = vector(state.vstate.params)
    overlap = np.vdot(gs, psi)
    psi = psi * np.conj(overlap) / abs(overlap)  # global phase aligned with the ground state
    wrong = np.sign(psi.real) != np.sign(gs)
    print(f"fidelity |<psi0|psi>|^2 = {abs(overlap) ** 2:.5f}; ground-state weight on "
          f"configurations with the wrong sign {np.sum(gs[wrong] ** 2):.2e} "
          f"({wrong.sum()} of {len(gs)}); ground-state weight off the Marshall sign "
          f"{exact.off_sign_rule_weight(gs):.2e}")
    print(f"rel. error of |psi| with the exact signs {rel(energy(h, np.abs(psi) * np.sign(gs), N)):.2e}; "
          f"of the exact |psi0| with this state's signs "
          f"{rel(energy(h, np.abs(gs) * np.sign(psi.real), N)):.2e}")


if __name__ == "__main__":
    main()
