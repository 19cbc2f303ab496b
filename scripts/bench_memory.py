"""Memory and time of one kernel-SR direction per rank: the gather path (every rank holds all of
X) against X distributed by parameter blocks, for ViTs of about 1e4, 1e5 and 4e5 parameters,
N_tot = 1024 and 2048 samples, on 1 and 2 MPI ranks. Checks each run against the memory model
(`model_bytes`) and prints what a 10x10 run at 4096 samples needs per GPU on 8, 16 and 64 ranks.

The SR part is what grows with P and N_tot, so each run times `sr.direction` (Jacobian, kernel
build and solve, update) on random Sz = 0 configurations of the 6x6 lattice with random local
energies: the 10x10 model's X has the same size for the same P and N_tot (the lattice changes only
the activations of one chunk). A run the model predicts not to fit in this machine's memory is
skipped and said so (two ranks share one machine here; on a cluster each has its own GPU).
Every rank runs under an address-space limit of --rank-limit-gb (default 12 GiB: a GPU-sized
budget per rank, two of which fit in this machine together), so a run that needs more than one
GPU's memory fails as it would on a GPU ("does not fit") and the same problem on 2 ranks can fit.

usage: python scripts/bench_memory.py [--sizes 1e4,1e5,4e5] [--samples 1024,2048] [--chunk 64]
                                      [--budget-gb 22] [--rank-limit-gb 12] [--json FILE]
       mpirun -n K python scripts/bench_memory.py --one SIZE N_TOT PATH CHUNK LIMIT_GB  (one run)
       python scripts/bench_memory.py --report FILE.json [CHUNK]   (a saved run against the model)
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

# ViT sizes (d, heads, layers) by label; factored attention, translation-invariant, 2x2 patches.
SIZES = {"1e4": (32, 4, 1), "1e5": (64, 8, 2), "4e5": (72, 12, 8)}
LATTICE = 6
PATHS = {"gather": "kernel_gather", "blocks": "kernel"}


def model_bytes(P: int, n_total: int, K: int, path: str, chunk: int) -> dict[str, float]:
    """The memory model of `pipeline.budget.sr_bytes` for one path, with the runtime's base."""
    from pipeline.budget import BASE_BYTES, sr_bytes

    terms = sr_bytes(P, n_total, K, PATHS[path] if path in PATHS else path, chunk)
    return terms | {"total": sum(terms.values()) + BASE_BYTES}


def _config(size: str, n_total: int, solver: str, chunk: int):
    from pipeline.config import compose, validate
    from pipeline import dist

    d, heads, layers = SIZES[size]
    return validate(compose([f"lattice.L={LATTICE}", f"model.d={d}", f"model.heads={heads}",
                             f"model.layers={layers}", f"model.chunk_size={chunk}",
                             f"sampler.n_samples={n_total}", f"sampler.n_chains={n_total}",
                             f"optimizer.solver={solver}", "optimizer.momentum=0.9"]), dist.size())


def one(size: str, n_total: int, path: str, chunk: int, limit_gb: float) -> None:
    """One run on however many ranks this was launched with, each under an address-space limit
    of limit_gb GiB; rank 0 prints a JSON line."""
    limit = int(limit_gb * 2 ** 30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    from pipeline import dist

    with dist.abort_on_error():  # a rank that fails (out of memory) ends the other, not waits
        _one(size, n_total, path, chunk)


def _one(size: str, n_total: int, path: str, chunk: int) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from pipeline import dist, sr
    from pipeline.system import System

    c = _config(size, n_total, PATHS[path], chunk)
    system = System.build(c)
    params = system.init_params(0)
    P = system.n_params(params)
    K, n_local = dist.size(), n_total // dist.size()
    rng = np.random.default_rng(dist.rank())
    base = np.repeat([1, -1], system.n_sites // 2).astype(np.int8)
    s = jnp.asarray(np.stack([rng.permutation(base) for _ in range(n_local)]))
    eloc = jnp.asarray(rng.normal(size=n_local) + 1j * rng.normal(size=n_local))
    zero = jax.tree_util.tree_map(jnp.zeros_like, params)
    solver = PATHS[path] if K > 1 else "kernel"
    args = (system.logpsi, params, s, eloc, n_total, jnp.asarray(1e-3), jnp.asarray(1.0), solver,
            chunk, 1e-6, 10, zero, jnp.asarray(0.9))
    t0 = time.perf_counter()
    # the two jitted stages of sr.direction; the peak is the larger one's (X lives in both)
    first = (*args[:5], args[6], solver, chunk, zero, args[12])
    r = jax.eval_shape(sr.rows, *first)
    solved = None
    if sr.host_solve_used(solver):  # as sr.direction: solved on the host, T freed before stage 2
        solved = (jax.ShapeDtypeStruct(r.zeta.shape, r.zeta.dtype),
                  jax.ShapeDtypeStruct((), r.X.dtype))
        r = r._replace(X_gram=None, T=None)
    stages = [sr.rows.lower(*first),
              sr.solve_rows.lower(r, solved, n_total, args[5], solver, 1e-6, 10, zero, args[12])]
    mems = [stage.compile().memory_analysis() for stage in stages]
    compile_s = time.perf_counter() - t0
    xla_peak = max((m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes
                    - m.alias_size_in_bytes) if m is not None else float("nan") for m in mems)
    jac = jax.jit(lambda p, x: sr.jacobian(system.logpsi, p, x, chunk))
    jax.block_until_ready(jac(params, s))
    times, t_jac = [], []
    for _ in range(2 if P < 200_000 else 1):  # the largest runs take minutes per step here
        dist.barrier()
        t = time.perf_counter()
        jax.block_until_ready(sr.direction(*args))
        times.append(time.perf_counter() - t)
        t = time.perf_counter()
        jax.block_until_ready(jac(params, s))
        t_jac.append(time.perf_counter() - t)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rows = dist.world().gather({"rss": rss, "xla": xla_peak}, root=0) if K > 1 else \
        [{"rss": rss, "xla": xla_peak}]
    if dist.is_root():
        m = 2 * n_total
        x_bytes = 8 * (m * -(-P // K) if (path == "blocks" or K == 1) else m * P * (1 + 1 / K))
        print(json.dumps({"size": size, "P": P, "n_total": n_total, "K": K, "path": path,
                          "chunk": chunk, "x_bytes": x_bytes,
                          "rss_max": max(r["rss"] for r in rows), "xla_peak": max(r["xla"] for r in rows),
                          "seconds": min(times), "t_jacobian": min(t_jac),
                          "compile_s": compile_s,
                          "model": model_bytes(P, n_total, K, path, chunk)["total"]}), flush=True)


def _params(size: str) -> int:
    from pipeline.system import System

    system = System.build(_config(size, 1024, "kernel", 0))
    return system.n_params(system.init_params(0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1e4,1e5,4e5")
    ap.add_argument("--samples", default="1024,2048")
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--budget-gb", type=float, default=22.0,
                    help="memory all ranks together may use on this machine")
    ap.add_argument("--rank-limit-gb", type=float, default=12.0,
                    help="address-space limit of each rank (a GPU's memory)")
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args()
    here = os.path.dirname(os.path.abspath(__file__))
    python = sys.executable
    mpirun = os.path.join(os.path.dirname(python), "mpirun")
    rows, notes = [], []
    print(f"machine: {os.cpu_count()} cores, budget {args.budget_gb:g} GB for all ranks together; "
          f"{args.rank_limit_gb:g} GiB per rank; lattice {LATTICE}x{LATTICE}, chunk {args.chunk}",
          flush=True)
    for size in args.sizes.split(","):
        P = _params(size)
        for n_total in map(int, args.samples.split(",")):
            for K, path in ((1, "blocks"), (2, "gather"), (2, "blocks")):
                need = model_bytes(P, n_total, K, path, args.chunk)["total"]
                label = f"P={P} N_tot={n_total} K={K} {path if K > 1 else 'one rank'}"
                if K * need > args.budget_gb * 1e9:
                    notes.append(f"{label}: skipped, the model predicts {need / 1e9:.1f} GB per rank "
                                 f"x {K} > {args.budget_gb:g} GB")
                    print(notes[-1], flush=True)
                    continue
                cmd = ([mpirun, "-n", str(K)] if K > 1 else []) + [
                    python, os.path.join(here, "bench_memory.py"), "--one", size, str(n_total),
                    path, str(args.chunk), str(args.rank_limit_gb)]
                out = subprocess.run(cmd, capture_output=True, text=True)
                line = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
                if out.returncode or not line:
                    last = (out.stderr.strip().splitlines() or ["?"])[-1][:160]
                    fits = need <= args.rank_limit_gb * 2 ** 30
                    notes.append(f"{label}: " + (f"failed: {last}" if fits else
                                 f"does not fit in {args.rank_limit_gb:g} GiB per rank (model "
                                 f"{need / 1e9:.1f} GB); it ended with: {last}"))
                    print(notes[-1], flush=True)
                    continue
                rows.append(json.loads(line[0]))
                r = rows[-1]
                print(f"{label}: RSS {r['rss_max'] / 1e9:.2f} GB, model {r['model'] / 1e9:.2f} GB, "
                      f"{r['seconds']:.2f} s", flush=True)
    table(rows)
    for note in notes:
        print(note)
    print(projection())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


def report(path: str, chunk: int) -> None:
    """Print the table of an earlier run's JSON rows against the current memory model."""
    rows = json.load(open(path))
    for r in rows:
        r["model"] = model_bytes(r["P"], r["n_total"], r["K"], r["path"], r["chunk"])["total"]
    table(rows)
    print(projection(chunk=chunk))


def table(rows: list[dict]) -> None:
    print(f"\n{'P':>7} {'N_tot':>5} {'K':>2} {'path':>7} {'X/rank GB':>9} {'RSS/rank GB':>11} "
          f"{'XLA peak GB':>11} {'model GB':>8} {'RSS/model':>9} {'s/step':>7} {'Jacobian s':>10} "
          f"{'rest s':>7}")
    for r in rows:
        print(f"{r['P']:>7} {r['n_total']:>5} {r['K']:>2} {r['path'] if r['K'] > 1 else 'one':>7} "
              f"{r['x_bytes'] / 1e9:>9.2f} {r['rss_max'] / 1e9:>11.2f} {r['xla_peak'] / 1e9:>11.2f} "
              f"{r['model'] / 1e9:>8.2f} {r['rss_max'] / r['model']:>9.2f} {r['seconds']:>7.2f} "
              f"{r['t_jacobian']:>10.2f} {r['seconds'] - r['t_jacobian']:>7.2f}")
    by = {(r["P"], r["n_total"], r["K"], r["path"]): r for r in rows}
    for (P, n, K, path), r in sorted(by.items()):
        one_rank = by.get((P, n, 1, "blocks"))
        if K == 2 and one_rank:
            print(f"P={P} N_tot={n} {path}: X per rank at K=2 / K=1 = "
                  f"{r['x_bytes'] / one_rank['x_bytes']:.2f}, RSS {r['rss_max'] / one_rank['rss_max']:.2f}")


def projection(P: int = 430_000, n_total: int = 4096, chunk: int = 64) -> str:
    """What the published 10x10 model at 4096 samples needs per GPU, from the model."""
    lines = [f"10x10 ViT, P = {P}, N_tot = {n_total}, chunk {chunk}, per rank (model, float64):"]
    for K in (1, 8, 16, 64):
        for path in ("blocks", "gather"):
            t = model_bytes(P, n_total, K, path, chunk)
            lines.append(f"  K={K:>2} {path:>6}: X {t['X'] / 1e9:6.2f} GB, kernel "
                         f"{t['kernel'] / 1e9:.2f} GB, chunk {t['chunk'] / 1e9:.2f} GB, "
                         f"total {t['total'] / 1e9:6.2f} GB")
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--report"]:
        report(sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 64)
    elif sys.argv[1:2] == ["--one"]:
        one(sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5]), float(sys.argv[6]))
    else:
        main()
