"""Our SR step against NetKet's VMC_SR on the identical model, Hamiltonian, moves and settings.

Our flax ViT module and its initial parameters are handed to NetKet's MCState; NetKet's
Heisenberg operator is built on our own bond list (nearest-neighbour bonds with the Marshall sign
rule, the second family without), and its exchange sampler moves on the same bonds with N
proposals per sweep and no discarded sweeps, like ours. Before timing, both sides must agree:
log psi on NetKet's samples to 1e-12 and the local energies to 1e-10 (NetKet's operator is in
Pauli units, 4x ours). Then each side runs in its own process (so the peak resident memory is its
own): --warmup untimed steps (compilation) and --steps timed ones of kernel SR (minSR) with the
same diagonal shift, momentum (SPRING) and a constant learning rate. Printed: median seconds per
step, peak RSS, and the ratios ours / NetKet.

NetKet is a benchmark dependency only: `pip install -e '.[bench]'` (scripts/bench_vs_netket makes
a separate .venv-bench with it, so the runtime environment never carries it).

usage: python scripts/bench_vs_netket.py [--size 4] [--d 16] [--heads 2] [--layers 1]
           [--samples 1024] [--chains 1024] [--steps 10] [--warmup 3] [--chunk 0]
           [--netket-chunk 0] [--rounds 1] [--gram float64[,float32]]
--chunk: configurations per forward pass of ours (0: chosen automatically), and chunk // 32
samples per chunk for NetKet (about as many connected configurations; 0: the whole batch).
--netket-chunk S: S samples per chunk for NetKet whatever --chunk (e.g. ours automatic, NetKet
bounded so that its whole-batch evaluation fits in memory on 6x6).
--rounds R: time the two sides alternately R times (each in a fresh process) and print the median
of the R time ratios with all of them: the machine's speed drifts between minutes, and only
ratios taken close together compare.
--gram: our kernel's X X^T accumulated in float64 (the default) and/or float32
(optimizer.gram_dtype); with both, each round times ours in each dtype, then NetKet (float64).
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

TOLERANCES = {"logpsi": 1e-12, "local_energy": 1e-10}
LR, SHIFT, MOMENTUM = 0.01, 1e-3, 0.9


def config(args):
    from pipeline.config import compose, validate

    return validate(compose([
        f"lattice.L={args.size}", "model=vit_factored", f"model.d={args.d}", f"model.heads={args.heads}",
        f"model.layers={args.layers}", "model.symmetry=none", f"model.chunk_size={args.chunk}",
        f"sampler.n_samples={args.samples}", f"sampler.n_chains={args.chains}",
        "sampler.n_thermalize=0", "optimizer.solver=kernel", f"optimizer.lr={LR}",
        f"optimizer.lr_final={LR}", "optimizer.warmup=0", f"optimizer.diag_shift={SHIFT}",
        f"optimizer.diag_shift_final={SHIFT}", f"optimizer.momentum={MOMENTUM}",
        f"optimizer.gram_dtype={args.gram.split(',')[0]}", f"run.n_iter={args.warmup + args.steps}"]))


def netket_state(args, system):
    """NetKet's MCState, Hamiltonian and driver on our model, parameters and bonds."""
    import netket as nk
    import optax

    lat, N = system.lattice, system.n_sites
    edges = [[int(i), int(j), 0] for i, j in lat.bonds1] + [[int(i), int(j), 1] for i, j in lat.bonds2]
    graph = nk.graph.Graph(edges=edges, n_nodes=N)
    hilbert = nk.hilbert.Spin(0.5, N, total_sz=0)
    h = system.cfg.hamiltonian
    ham = nk.operator.Heisenberg(hilbert, graph, J=[h.J1, h.J2], sign_rule=[h.marshall_sign, False])
    sampler = nk.sampler.MetropolisExchange(hilbert, graph=graph, d_max=1, n_chains=args.chains,
                                            sweep_size=N)
    vs = nk.vqs.MCState(sampler, system.model, n_samples=args.samples, n_discard_per_chain=0,
                        variables={"params": system.init_params(0)}, seed=0, sampler_seed=1,
                        chunk_size=netket_chunk(args))
    driver = nk.driver.VMC_SR(ham, optax.sgd(LR), diag_shift=SHIFT, momentum=MOMENTUM,
                              variational_state=vs, use_ntk=True)
    return vs, ham, driver


def check(args) -> dict:
    """Largest differences of log psi and local energies between the two sides, same samples."""
    import jax.numpy as jnp

    from pipeline.hamiltonian import local_energies
    from pipeline.system import System

    system = System.build(config(args))
    vs, ham, _ = netket_state(args, system)
    s = np.asarray(vs.samples).reshape(-1, system.n_sites)
    params = system.init_params(0)
    ours_lp = np.asarray(system.logpsi(params, jnp.asarray(s.astype(np.int8))))
    theirs_lp = np.asarray(vs.log_value(s))
    ours_e = np.asarray(local_energies(system.hamiltonian, system.logpsi, params,
                                       jnp.asarray(s.astype(np.int8)), jnp.asarray(ours_lp), system.chunk))
    theirs_e = np.asarray(vs.local_estimators(ham).data).reshape(-1) / 4.0  # Pauli -> S.S units
    return {"logpsi": float(np.max(np.abs(ours_lp - theirs_lp))),
            "local_energy": float(np.max(np.abs(ours_e - theirs_e))),
            "energy_per_site": float(np.mean(ours_e).real / system.n_sites),
            "n_params": system.n_params(params)}


def time_ours(args) -> list[float]:
    from pipeline.driver import Driver
    from pipeline.system import System

    driver = Driver(System.build(config(args)))
    state, times = driver.fresh_state(), []
    for _ in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        state, _ = driver.step(state)
        times.append(time.perf_counter() - t0)
    return times[args.warmup:]


def time_netket(args) -> list[float]:
    import jax

    from pipeline.system import System

    _, _, driver = netket_state(args, System.build(config(args)))
    stamps = [time.perf_counter()]

    def stamp(step, log_data, drv) -> bool:  # after every step (the energy is read: synchronous)
        jax.block_until_ready(drv.state.parameters)
        stamps.append(time.perf_counter())
        return True

    driver.run(args.warmup + args.steps, out=(), show_progress=False, callback=stamp)
    return list(np.diff(stamps))[args.warmup:]


def side(args) -> None:
    """One side in this process: JSON with its step times and its own peak RSS on stdout."""
    times = {"ours": time_ours, "netket": time_netket, "check": check}[args.side](args)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"result": times, "peak_rss": peak}))


def netket_chunk(args) -> int | None:
    """NetKet's samples per chunk: --netket-chunk, else --chunk // 32, else None (whole batch)."""
    chunk = args.netket_chunk or args.chunk // 32
    return min(args.samples, chunk) if chunk else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in (("size", 4), ("d", 16), ("heads", 2), ("layers", 1), ("samples", 1024),
                          ("chains", 1024), ("steps", 10), ("warmup", 3), ("chunk", 0)):
        ap.add_argument(f"--{name}", type=int, default=default)
    ap.add_argument("--netket-chunk", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--gram", default="float64")
    ap.add_argument("--side", choices=["ours", "netket", "check"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        return side(args)

    def run(which: str, gram: str = "float64") -> dict:
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--side", which,
                              "--gram", gram], capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"the {which} side failed:\n{out.stderr[-3000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    agreement = run("check")["result"]
    bad = {k: v for k, v in agreement.items() if k in TOLERANCES and not v <= TOLERANCES[k]}
    print(f"L={args.size}, d={args.d}, {args.heads} heads, {args.layers} layers, "
          f"{agreement['n_params']} parameters, {args.samples} "
          f"samples on {args.chains} chains; agreement: max |d log psi| = {agreement['logpsi']:.1e}, "
          f"max |d E_loc| = {agreement['local_energy']:.1e} (E/N = {agreement['energy_per_site']:.6f}, "
          "S.S units)")
    if bad:
        sys.exit(f"the two sides differ beyond {TOLERANCES}: {bad}; not timing")
    grams = args.gram.split(",")
    names = [f"ours {g}" for g in grams] + ["netket"]
    rounds = [[run("ours", g) for g in grams] + [run("netket")] for _ in range(args.rounds)]
    print(f"{'':13} {'s/step (median)':>16} {'min':>7} {'max':>7} {'peak RSS GB':>12}   (per round)")
    for i, name in enumerate(names):
        for r in (each[i] for each in rounds):
            t = r["result"]
            print(f"{name:13} {statistics.median(t):16.3f} {min(t):7.3f} {max(t):7.3f} "
                  f"{r['peak_rss'] / 1e9:12.2f}")
    for i, name in enumerate(names[:-1]):
        times = [statistics.median(each[i]["result"]) / statistics.median(each[-1]["result"])
                 for each in rounds]
        memory = [each[i]["peak_rss"] / each[-1]["peak_rss"] for each in rounds]
        print(f"ratio {name}/netket: time {statistics.median(times):.2f} (rounds: "
              f"{', '.join(f'{t:.2f}' for t in times)}), memory {statistics.median(memory):.2f}")

if __name__ == "__main__":
    main()
