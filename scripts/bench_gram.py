"""Float32 against float64 for the kernel X X^T of minSR (the (2n x 2n) Gram matrix of the
centred, scaled Jacobian rows), on the 4x4 accuracy-benchmark model.

1. Cost and error of the product alone: X of the benchmark's shape (2 x sampler.n_samples rows, P
   columns, Gaussian entries), median of --repeat timings of `pipeline.sr.host_gram` on X in
   float64 (BLAS dsyrk, one triangle) and in float32 (ssyrk, what optimizer.gram_dtype=float32
   runs); the relative error of T and of the regularized solve (T + lambda I)^{-1} e with
   lambda = optimizer.diag_shift_final (the smallest shift of a run).
2. The effect on training: `scripts/track_exact` run twice in separate processes (--steps steps,
   same seed), with optimizer.gram_dtype=float64 and =float32; both exact-energy trajectories
   are printed (float64 stays the default: with float32, 1 and K ranks agree only to float32
   round-off; see README, "Float32 kernel against float64").

usage: python scripts/bench_gram.py [--kind factored] [--repeat 5] [--steps 150] [--every 25]
                                    [key=value ...]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench_accuracy import configure
from pipeline import sr
from pipeline.system import System


def timed(f, X, repeat: int) -> tuple[float, np.ndarray]:
    """Median seconds of f(X) over `repeat` calls after one untimed, and f(X) as a full matrix."""
    out = f(X)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        f(X)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), np.triu(out) + np.triu(out, 1).T


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kind", default="factored")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--every", type=int, default=25)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_intermixed_args()  # key=value overrides may come before or after options
    cfg = configure(4, args.kind, 0, args.overrides)
    system = System.build(cfg)
    P = system.n_params(system.init_params(0))
    n = 2 * cfg.sampler.n_samples
    X = jax.random.normal(jax.random.PRNGKey(0), (n, P), jnp.float64) / np.sqrt(n)
    t64, T64 = timed(lambda x: sr.host_gram(x, 1), X, args.repeat)
    t32, T32 = timed(lambda x: sr.host_gram(x, 1), X.astype(jnp.float32), args.repeat)
    lam = cfg.optimizer.diag_shift_final
    e = jax.random.normal(jax.random.PRNGKey(1), (n,), jnp.float64)
    y64, y32 = (np.linalg.solve(np.asarray(T) + lam * np.eye(n), np.asarray(e)) for T in (T64, T32))
    print(f"machine: {os.cpu_count()} cores; X {n} x {P}: X X^T float64 {t64:.3f} s, float32 "
          f"{t32:.3f} s ({t32 / t64:.2f}x); relative error of T "
          f"{np.linalg.norm(T32 - T64) / np.linalg.norm(T64):.1e}, of the solve at shift {lam:g} "
          f"{np.linalg.norm(y32 - y64) / np.linalg.norm(y64):.1e}", flush=True)
    here = os.path.dirname(os.path.abspath(__file__))
    for dtype in ("float64", "float32"):
        print(f"\n== track_exact optimizer.gram_dtype={dtype}", flush=True)
        subprocess.run([sys.executable, os.path.join(here, "track_exact.py"), "--kind", args.kind,
                        "--steps", str(args.steps), "--every", str(args.every), *args.overrides,
                        f"optimizer.gram_dtype={dtype}"], check=True)


if __name__ == "__main__":
    main()
