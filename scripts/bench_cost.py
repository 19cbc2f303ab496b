"""Cost of the two attention kinds at equal d, heads and layers, per lattice size (b = 2).

For each L and kind: parameters; forward passes per second of log psi on a batch of random Sz = 0
configurations, evaluated in the run's forward chunks (median of --repeat timings after
compilation); the floating-point operations of one forward pass per configuration, as XLA counts
them in the compiled log psi (the arithmetic the kinds differ by, independent of the machine);
seconds per SR step and its split
(sampling, local energies, SR) over --steps steps after two untimed ones (compilation); and the
connected configurations per sample (what the local energies evaluate) and the XLA compilations
during the timed steps (0 when no shape changes). Both kinds start from
their own random initialization, so the step split also reflects how many bonds are anti-aligned.

usage: python scripts/bench_cost.py [--sizes 4,6,8,10] [--steps 3] [--repeat 5] [--batch 4096]
                                    [--json FILE] [hydra overrides ...]
defaults: d = 32, 4 heads, 2 layers, 1024 samples on 1024 chains, no projection.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from pipeline.backend import CompileCounter
from pipeline.config import compose, validate
from pipeline.driver import Driver
from pipeline.hamiltonian import apply_chunked
from pipeline.system import System

DEFAULTS = ["model.d=32", "model.heads=4", "model.layers=2", "sampler.n_samples=1024",
            "sampler.n_chains=1024", "sampler.n_thermalize=5", "model.symmetry=none"]


def forward_rate(system: System, params, batch: int, repeat: int) -> float:
    rng = np.random.default_rng(0)
    base = np.repeat(np.array([1, -1], np.int8), system.n_sites // 2)
    s = jnp.asarray(np.stack([rng.permutation(base) for _ in range(batch)]))
    f = jax.jit(lambda p, x: apply_chunked(system.logpsi, p, x, system.chunk))
    f(params, s).block_until_ready()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        f(params, s).block_until_ready()
        times.append(time.perf_counter() - t0)
    return batch / statistics.median(times)


def forward_flops(system: System, params, batch: int = 64) -> float:
    """XLA's count of floating-point operations of log psi, per configuration."""
    s = jnp.ones((batch, system.n_sites), jnp.int8)
    cost = jax.jit(system.logpsi).lower(params, s).compile().cost_analysis()
    return float(cost["flops"]) / batch


def one(L: int, kind: str, args) -> dict:
    c = validate(compose([*DEFAULTS, f"lattice.L={L}", f"model.attention={kind}", *args.overrides]))
    system = System.build(c)
    driver = Driver(system)
    state = driver.fresh_state()
    rate = forward_rate(system, state.vstate.params, args.batch, args.repeat)
    records = []
    for k in range(2 + args.steps):
        if k == 2:
            counter = CompileCounter()
        state, rec = driver.step(state)
        if k >= 2:
            records.append(rec)
    compiles = counter.count  # read before forward_flops below compiles log psi once more
    med = lambda f: statistics.median(getattr(r, f) for r in records)  # noqa: E731
    bonds = system.hamiltonian.bonds
    s = np.asarray(state.vstate.chains)
    connected = float(np.mean(np.sum(s[:, bonds[:, 0]] != s[:, bonds[:, 1]], axis=1)))
    return {"L": L, "kind": kind, "P": driver.n_params, "forward_per_s": rate,
            "flops_per_config": forward_flops(system, state.vstate.params),
            "s_per_step": med("seconds"), "t_sample": med("t_sample"), "t_energy": med("t_energy"),
            "t_sr": med("t_sr"), "connected_per_sample": connected, "chunk": system.chunk,
            "compiles_after_step_2": compiles,
            "solver": driver.solver}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="4,6,8,10")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--json")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_intermixed_args()  # key=value overrides may come before or after options
    print(f"machine: {os.cpu_count()} cores, {jax.devices()[0].platform}; {' '.join(DEFAULTS)} "
          f"{' '.join(args.overrides)}")
    print(f"{'L':>3} {'kind':<9} {'P':>7} {'fwd/s':>9} {'flops/cfg':>10} {'s/step':>7} {'sample':>7} "
          f"{'energy':>7} {'sr':>7} {'conn/smp':>8} {'compiles':>8} {'f/s ratio':>9} "
          f"{'flop ratio':>10} {'step ratio':>10}")
    rows = []
    for L in (int(x) for x in args.sizes.split(",")):
        pair = {kind: one(L, kind, args) for kind in ("factored", "standard")}
        for kind, r in pair.items():
            rows.append(r)
            ratio_f = pair["factored"]["forward_per_s"] / pair["standard"]["forward_per_s"]
            ratio_s = pair["factored"]["s_per_step"] / pair["standard"]["s_per_step"]
            ratio_a = pair["factored"]["flops_per_config"] / pair["standard"]["flops_per_config"]
            print(f"{L:3d} {kind:<9} {r['P']:7d} {r['forward_per_s']:9.0f} "
                  f"{r['flops_per_config']:10.0f} {r['s_per_step']:7.2f} "
                  f"{r['t_sample']:7.2f} {r['t_energy']:7.2f} {r['t_sr']:7.2f} "
                  f"{r['connected_per_sample']:8.1f} {r['compiles_after_step_2']:8d} "
                  + (f"{ratio_f:9.2f} {ratio_a:10.2f} {ratio_s:10.2f}" if kind == "standard" else ""),
                  flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
