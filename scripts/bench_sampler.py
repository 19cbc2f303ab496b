"""Decorrelation per second of the exchange sampler on a trained state.

Loads the newest good checkpoint of RUN_DIR (read only), discards --burn-in sweeps of every chain
and then a run of --length sweeps (the sampler compiles per length: this keeps compilation out of
the timing), then records --length samples per chain (one per sweep) and reports: seconds per
sweep, the acceptance, and the integrated autocorrelation time tau (in sweeps, Sokal's self-consistent
window on the chain-averaged autocorrelation) of two series: Re log psi and the local energy.
The figure that matters is effective samples per second, chains / (2 tau x seconds per sweep):
a sampler that moves more per forward pass decorrelates faster at the same cost per sweep.
Run it on two commits (PYTHONPATH=<other checkout>) to compare samplers on the same state.

usage: python scripts/bench_sampler.py RUN_DIR [--chains 256] [--length 200] [--burn-in 50]
                                          [--sweep PROPOSALS]
"""
from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace

import jax
import numpy as np
from omegaconf import OmegaConf

from pipeline import checkpoint
from pipeline.app import restore_vstate
from pipeline.config import validate
from pipeline.driver import Driver
from pipeline.results import load
from pipeline.sampler import FINAL, FINAL_BURN_IN
from pipeline.system import System


def integrated_time(x: np.ndarray, c: float = 5.0) -> float:
    """tau of series x (chains, length): 1 + 2 sum_t rho(t) up to the first window M >= c tau(M)."""
    x = x - x.mean(axis=1, keepdims=True)
    n = x.shape[1]
    f = np.fft.rfft(x, 2 * n, axis=1)
    acf = np.fft.irfft(f * np.conj(f), axis=1)[:, :n].mean(axis=0)
    rho = acf / acf[0]
    taus = 2.0 * np.cumsum(rho) - 1.0
    window = np.arange(n) >= c * taus
    return float(taus[np.argmax(window)] if window.any() else taus[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("--chains", type=int, default=256)
    ap.add_argument("--length", type=int, default=200)
    ap.add_argument("--burn-in", type=int, default=50)
    ap.add_argument("--sweep", type=int, default=0, help="proposals per sweep (0: the run's)")
    args = ap.parse_args()
    stored = OmegaConf.create(str(load(os.path.join(args.run_dir, "results.h5")).attrs["config"]))
    stored.sampler.n_chains = args.chains
    if args.sweep:
        stored.sampler.sweep_size = args.sweep
    system = System.build(validate(stored))
    snap = checkpoint.newest_good(os.path.join(args.run_dir, "checkpoints"),
                                  *Driver(system).templates(), lambda y: None)
    # more chains than the run had: its chains repeated (the burn-in separates them)
    snap = replace(snap, chains=np.resize(snap.chains, (args.chains, snap.chains.shape[1])))
    vs = restore_vstate(system, snap).thermalize(args.burn_in, FINAL_BURN_IN, snap.step)
    # the sampler compiles per sample count: a discarded run of the timed length first
    vs, _ = vs.sample(args.length, FINAL_BURN_IN, snap.step + 1)
    jax.block_until_ready(vs.chains)
    t0 = time.perf_counter()
    vs2, smp = vs.sample(args.length, FINAL, snap.step)
    jax.block_until_ready(smp.s)
    per_sweep = (time.perf_counter() - t0) / args.length
    eloc = np.asarray(vs2.local_energies(smp)).real
    series = {"Re log psi": np.asarray(smp.logpsi).real, "E_loc": eloc}
    c = system.cfg
    print(f"machine: {os.cpu_count()} cores, {jax.devices()[0].platform}; run {args.run_dir} step "
          f"{snap.step}: L={c.lattice.L} {c.model.attention}, {args.chains} chains x {args.length} sweeps "
          f"of {system.sampler.sweep} proposals, burn-in {args.burn_in}")
    print(f"seconds per sweep {per_sweep:.4f}, acceptance {vs.acceptance(smp):.3f}")
    for name, x in series.items():
        tau = integrated_time(x.reshape(args.length, args.chains).T)
        print(f"{name:<11} tau = {tau:6.2f} sweeps, effective samples/s = "
              f"{args.chains / (2 * tau * per_sweep):8.0f}")


if __name__ == "__main__":
    main()
