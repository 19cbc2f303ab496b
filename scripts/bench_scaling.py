"""One rank's part of the scaling benchmark: the same total work (samples, chains) on however many
ranks this runs on. Rank 0 prints one JSON line: seconds per step, samples per second, and the
share of the step spent in communication, measured by timing collectives of the sizes this
solver moves per step (all-reduce / all-gather through the same mpi4jax path, inside jit).

usage: mpirun -n K python scripts/bench_scaling.py [dotted=overrides ...]
"""
from __future__ import annotations

import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from pipeline import dist
from pipeline.config import Config, compose, validate
from pipeline.driver import Driver
from pipeline.system import System


def _config(overrides: list[str]) -> Config:
    """Hydra overrides, exactly as `python -m pipeline` takes them."""
    return validate(compose(["sampler.n_thermalize=5", *overrides]), dist.size())


def _comm_seconds(solver: str, n_params: int, n_total: int, n_local: int, repeat: int = 5) -> float:
    """Time the collectives of one SR solve, of the sizes `pipeline.sr` moves: dense and cg
    all-reduce P-vectors (and dense the P x P matrix); the kernel solver re-shards X by an
    all-to-all, all-reduces the 2N_tot x 2N_tot kernel (on CPU on the host, by mpi4py) and
    all-gathers zeta and the direction's blocks."""
    if dist.size() == 1:
        return 0.0
    K, m = dist.size(), 2 * n_total
    Pb = -(-n_params // K)

    @jax.jit
    def collectives(X, P2, v):
        out = [dist.allreduce_sum(v), dist.allreduce_sum(v)]  # <O>, F (dense, cg)
        if solver == "dense":
            out.append(dist.allreduce_sum(P2))
        elif solver == "kernel":
            out = [dist.alltoall(X), dist.allgather(X[0, 0, :, 0]), dist.allgather(v[:Pb])]
        return out

    X = jnp.ones((K, 2, n_local, Pb) if solver == "kernel" else (1,))
    P2 = jnp.ones((n_params, n_params)) if solver == "dense" else jnp.ones(1)
    v = jnp.ones(n_params)
    T = np.ones((m, m)) if solver == "kernel" else None

    def once():
        jax.block_until_ready(collectives(X, P2, v))
        if T is not None:
            dist.host_allreduce_sum(T)

    once()
    dist.barrier()
    t = time.perf_counter()
    for _ in range(repeat):
        once()
    return (time.perf_counter() - t) / repeat


def main(overrides: list[str]) -> None:
    c = _config(overrides)
    n_warm, n_steps = 3, 10
    with dist.abort_on_error():
        driver = Driver(System.build(c))
        state = driver.fresh_state()
        for _ in range(n_warm):  # compile every bucket size we are likely to meet
            state, _ = driver.step(state)
        dist.barrier()
        t0 = time.perf_counter()
        records = []
        for _ in range(n_steps):
            state, r = driver.step(state)
            records.append(r)
        seconds = (time.perf_counter() - t0) / n_steps
        comm = _comm_seconds(driver.solver, driver.n_params, c.sampler.n_samples,
                             c.sampler.n_samples // dist.size())
        if driver.solver == "cg":  # one P-vector all-reduce per CG iteration on top
            comm += float(np.mean([r.cg_iterations for r in records])) * comm / 3
        if dist.is_root():
            print(json.dumps({
                "ranks": dist.size(), "solver": driver.solver, "params": driver.n_params,
                "samples": c.sampler.n_samples, "seconds_per_step": seconds,
                "samples_per_second": c.sampler.n_samples / seconds,
                **{k: float(np.mean([getattr(r, k) for r in records]))
                   for k in ("t_sample", "t_energy", "t_sr")},
                "comm_seconds": comm, "comm_share": comm / seconds,
                "bytes_per_step": records[-1].bytes_comm}), flush=True)


def table(lines: list[str]) -> None:
    """Format the JSON lines of several runs (stdin of `--table`)."""
    rows = [json.loads(line) for line in lines if line.startswith("{")]
    print(f"{'ranks':>5} {'solver':>7} {'params':>7} {'samples':>7} {'s/step':>7} {'samples/s':>9} "
          f"{'sample':>7} {'energy':>7} {'sr':>7} {'comm share':>10} {'MB/step':>8}")
    for r in rows:
        print(f"{r['ranks']:>5} {r['solver']:>7} {r['params']:>7} {r['samples']:>7} "
              f"{r['seconds_per_step']:>7.3f} {r['samples_per_second']:>9.0f} {r['t_sample']:>7.3f} "
              f"{r['t_energy']:>7.3f} {r['t_sr']:>7.3f} {100 * r['comm_share']:>9.1f}% "
              f"{r['bytes_per_step'] / 1e6:>8.1f}")
    if len(rows) == 2:
        print(f"speed-up 1 -> 2 ranks: {rows[0]['seconds_per_step'] / rows[1]['seconds_per_step']:.2f}x")


if __name__ == "__main__":
    if sys.argv[1:] == ["--table"]:
        table(sys.stdin.readlines())
    else:
        main(sys.argv[1:])
