"""Accuracy per wall-clock budget: train each attention kind (and seed, and with or without a warm
start) inside a fixed budget at J2 = 0.5 (or any hamiltonian.J2=...) and measure the final energy
on fresh samples, trained and fully projected.

The budget covers everything after start-up: compilation, the warm-start run, training and both
final measurements. The schedules' horizon follows the measured step time during the run
(`pipeline.deadline`), so a load that comes or goes shortens or lengthens the run instead of
overrunning or idling. Training keeps a reserve for the final measurements (what they cost at
full size, predicted from the step phases and the measured cost of a compilation, at most
MEASURE_SHARE of the budget), and the measurements draw samples block by block (up to
sampler.n_samples_final and PROJECTED_SAMPLES) while the time left allows.

--measure exact (the default where the lattice has at most exact.MAX_SITES sites: 4x4) replaces
both Monte Carlo measurements by exact sums over the Sz = 0 sector (`pipeline.exact`: no
statistical error, seconds instead of minutes); they are compiled and timed once on the initial
state, and training keeps that time (x SAFETY) for them. --measure mc forces the sampled ones.

--size 4 uses conf/experiment/bench_4x4.yaml (15 minutes), --size 6 bench_6x6.yaml (60 minutes).
--warm F (F > 0, size > 4): the first fraction F of the budget trains the same model on 4x4, whose
parameters start the large run (`pipeline.warmstart.map_params`, as run.init_from does).
--warm-j2 X trains the warm start at J2 = X instead (on the same lattice with --size 4): a
continuation in the coupling, from one where the Marshall-sign plateau is left to one where not.
--lanczos F keeps the share F of the budget for one Lanczos step on the trained state
(`pipeline.lanczos`), measured after the others; with exact sums it is always reported (exact).
--save DIR writes each trained state before its final measurements (parameters, chains, step).
--warm-size S trains the warm start on S x S instead of 4x4 (4 <= S <= size; S = size, e.g. 6 with
--size 6, is the continuation in the coupling on the lattice itself and needs --warm-j2).

usage: python scripts/bench_accuracy.py [--size 4|6] [--minutes M] [--kinds factored,standard]
           [--seeds 0,1,2,3] [--warm 0,0.2] [--warm-j2 X] [--warm-size S]
           [--measure auto|exact|mc] [--lanczos F]
           [--json FILE] [--save DIR] [key=value ...]
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import time
from typing import Callable

import jax
import numpy as np

from pipeline import exact, lanczos, observables, warmstart
from pipeline.config import compose, validate
from pipeline.deadline import Deadline, train
from pipeline.driver import Driver
from pipeline.models import group
from pipeline.report import reference_energy, with_reference
from pipeline.system import System

PROJECTED_SAMPLES = 8192
LANCZOS_SAMPLES = 16384  # at most, for the Lanczos step (its time share is what limits it)
SAFETY = 1.3  # margin on the measurement times predicted from the steps' sampling times
MEASURE_SHARE = 0.25  # of the budget, at most, kept for the final measurements
PROJECTED_BURN_IN = 5  # sweeps (see `measurements`)
FINAL_SHARE = 0.25  # of the time left after training, at most, for the unprojected measurement
SPLIT = ("t_sample", "t_energy", "t_sr")  # per-step phases the driver times
BUDGET_MINUTES = {4: 15.0, 6: 60.0}
WARM_L = 4
LAST = 20  # training steps whose mean minority sign the row reports


def configure(size: int, kind: str, seed: int, overrides: list[str]):
    return validate(compose([f"+experiment=bench_{size}x{size}", f"model=vit_{kind}",
                             f"run.seed={seed}", *overrides]))


def warm_overrides(overrides: list[str], warm_j2: float | None, small_L: int) -> list[str]:
    """The run's overrides for its warm start: on small_L x small_L, at J2 = warm_j2 when given,
    and without a fine-tuning phase (run.finetune_steps belongs to the run itself: the warm
    start's parameters are carried over, not its projection)."""
    own = ("run.finetune_steps=",) + (("hamiltonian.J2=",) if warm_j2 is not None else ())
    kept = [o for o in overrides if not o.lstrip("+").startswith(own)]
    return kept + ([f"hamiltonian.J2={warm_j2}"] if warm_j2 is not None else []) + [f"lattice.L={small_L}"]


def warm_params(size: int, kind: str, seed: int, overrides: list[str], until: float, system,
                warm_j2: float | None, small_L: int):
    """Parameters for `system` from a run of the same model that ends at `until`: on
    small_L x small_L, at the coupling `warm_j2` when given (else the run's own)."""
    small = Driver(System.build(configure(size, kind, seed, warm_overrides(overrides, warm_j2, small_L))))
    state, steps = train(small, small.fresh_state(), Deadline(until, lambda *phases: 0.0),
                         small.cfg.run.n_iter)
    b = system.lattice.patch
    params = warmstart.map_params(state.vstate.params, system.init_params(seed), small_L // b,
                                  system.lattice.L // b)
    return params, steps


def projection_images(cfg, system) -> float:
    """Symmetry images of a configuration under the full projection, over those under training's."""
    return len(group(system.lattice, "full")[0]) / len(group(system.lattice, cfg.model.symmetry)[0])


def measurement_seconds(cfg, sweep: float, energy: float, n: int, images: float = 1.0,
                        burn: int | None = None, compile_s: float = 0.0) -> float:
    """Predicted seconds of a measurement on n samples (`observables.energy_within` in blocks of
    a training step's sweeps) after steps of (sweep, energy) seconds of sampling and local
    energies: `compile_s`, then `burn` (default sampler.n_thermalize) burn-in sweeps rounded up
    to whole blocks, then n / n_samples steps' worth of sampling and local energies, `images`
    times that under a larger projection, with the SAFETY margin."""
    s = cfg.sampler
    burn = s.n_thermalize if burn is None else burn
    block = s.n_samples // s.n_chains
    steps = -(-burn // block) * sweep + n * (sweep + energy) / s.n_samples
    return SAFETY * (compile_s + images * steps)


def reserve(cfg, images: float, budget_s: float) -> Callable[[float, float, float], float]:
    """Seconds kept after training: both final measurements at full size, at most MEASURE_SHARE
    of the budget (`measurements` then takes fewer samples); only the unprojected one when the
    cap leaves no room for the projected one's compilation, burn-in and first block."""
    s = cfg.sampler
    cap = MEASURE_SHARE * budget_s

    def seconds(sweep: float, energy: float, compile_s: float) -> float:
        final = measurement_seconds(cfg, sweep, energy, s.n_samples_final)
        least, most = (measurement_seconds(cfg, sweep, energy, n, images, PROJECTED_BURN_IN, compile_s)
                       for n in (s.n_samples, PROJECTED_SAMPLES))
        return min(final + (most if final + least <= cap else 0.0), cap)
    return seconds


def measurements(state, cfg, deadline: Deadline, end: float, ref) -> tuple[dict, dict]:
    """The final measurements inside the time left, each drawn one block (a training step's
    sweeps, whose compiled sampler it reuses) at a time until its sample count or its time is
    reached (`observables.energy_within`): the trained state on up to sampler.n_samples_final
    samples within FINAL_SHARE of the time left (all of it when the projected one does not fit),
    then its projection on the full symmetry group (translations x C4v x spin flip: it lowers the
    energy without retraining) on up to PROJECTED_SAMPLES within the rest. The projected one
    burns in PROJECTED_BURN_IN sweeps: the chains come equilibrated under the same parameters
    with the training's projection (20 sweeps under the 64-image projection took about 3
    minutes on 4x4 here, a fifth of the budget). It is skipped (NaN) when its compilation (the
    training's, measured), burn-in and first block do not fit, the same test as `reserve`'s."""
    s = cfg.sampler
    block = s.n_samples // s.n_chains
    images = projection_images(cfg, state.vstate.system)
    least = measurement_seconds(cfg, *deadline.phase_seconds(), s.n_samples, images,
                                PROJECTED_BURN_IN, deadline.compile_seconds())
    now = time.perf_counter()
    share = FINAL_SHARE if (1 - FINAL_SHARE) * (end - now) >= least else 1.0
    final = observables.energy_within(state.vstate, state.step, s.n_thermalize, block,
                                      s.n_samples_final, now + share * (end - now), SAFETY)
    if end - time.perf_counter() < least:
        return with_reference(final, ref), {"energy_per_site": np.nan, "energy_error": np.nan,
                                            "relative_error": np.nan, "n_samples": 0}
    projected = state.vstate.system.with_symmetry("full")
    vs = state.vstate.replace(system=projected)
    return with_reference(final, ref), with_reference(observables.energy_within(
        vs, state.step, PROJECTED_BURN_IN, block, PROJECTED_SAMPLES, end, SAFETY), ref)


def lanczos_measurement(state, cfg, final: dict, end: float, ref) -> dict:
    """One Lanczos step on the trained state (`pipeline.lanczos`; its training projection, not
    the full one, whose 16x costlier samples would be too few), with h1 and Var H from its
    measurement `final`, on fresh samples until `end` (at most LANCZOS_SAMPLES), after
    sampler.n_thermalize burn-in sweeps."""
    return with_reference(lanczos.lanczos_within(state.vstate, state.step, final,
                                                 cfg.sampler.n_thermalize, LANCZOS_SAMPLES, end,
                                                 SAFETY), ref)


def exact_measurements(system: System) -> Callable[[object], tuple[dict, dict, dict]]:
    """params -> the exact (trained, fully projected, one Lanczos step on the trained state)
    energies: full sums over the Sz = 0 sector with the same forward passes as the sampled
    measurements, one compilation each."""
    h, states = exact.sparse_hamiltonian(system.hamiltonian)
    N = system.n_sites
    vector, projected = (exact.state_vector(s.logpsi, states, N)
                         for s in (system, system.with_symmetry("full")))

    def measure(params) -> tuple[dict, dict, dict]:
        psi = vector(params)
        return (exact.expectation(h, psi, N), exact.expectation(h, projected(params), N),
                lanczos.exact(h, psi, N))
    return measure


def bench(size: int, kind: str, seed: int, warm: float, minutes: float, exact_sums: bool,
          overrides: list[str], warm_j2: float | None, warm_L: int, lanczos_share: float,
          save: str | None) -> dict:
    start = time.perf_counter()
    end = start + minutes * 60
    cfg = configure(size, kind, seed, overrides)
    system = System.build(cfg)
    params, warm_steps = (warm_params(size, kind, seed, overrides, start + warm * minutes * 60, system,
                                      warm_j2, warm_L) if warm > 0 else (None, 0))
    driver = Driver(system)
    state = driver.fresh_state(params)
    ref = reference_energy(cfg, system.hamiltonian)
    images = projection_images(cfg, system)  # also the cost of a fine-tuning step, a priori
    if exact_sums:  # compiled and timed on the initial state; training keeps that time for them
        exact_of = exact_measurements(system)
        t0 = time.perf_counter()
        initial = exact_of(state.vstate.params)[1]
        exact_s = time.perf_counter() - t0
        print(f"  [{kind} seed {seed}] exact sums over {initial['n_samples']} states: {exact_s:.1f} s "
              f"with compilation; initial E/N fully projected {initial['energy_per_site']:.6f}",
              flush=True)
        deadline = Deadline(end, lambda *_: SAFETY * exact_s, tail_factor=images)
    else:
        kept = reserve(cfg, images, minutes * 60)
        lanczos_s = lanczos_share * minutes * 60
        deadline = Deadline(end, lambda *phases: kept(*phases) + lanczos_s, tail_factor=images)
    split: dict[str, list[float]] = {k: [] for k in (*SPLIT, "minority_sign")}

    def log(state, rec, horizon: int) -> None:
        for k in split:
            split[k].append(getattr(rec, k))
        if state.step % 100 == 0:
            print(f"  [{kind} seed {seed}] step {state.step}/{horizon}: E/N = {rec.energy:.6f} "
                  f"± {rec.energy_error:.6f}, minority sign {rec.minority_sign:.4f}", flush=True)

    t_train = time.perf_counter()
    state, n_iter = train(driver, state, deadline, cfg.run.n_iter, log)
    train_s = time.perf_counter() - t_train
    if save:
        with open(os.path.join(save, f"{kind}_seed{seed}_warm{warm:g}.pkl"), "wb") as f:
            pickle.dump({"params": jax.tree_util.tree_map(np.asarray, state.vstate.params),
                         "chains": np.asarray(state.vstate.chains), "step": state.step,
                         "overrides": overrides}, f)
    t_final = time.perf_counter()
    if exact_sums:
        final, projected, step = (with_reference(m, ref) for m in exact_of(state.vstate.params))
    else:
        final, projected = measurements(state, cfg, deadline, end - lanczos_s, ref)
        step = (lanczos_measurement(state, cfg, final, end, ref) if lanczos_share > 0 else
                {"energy_per_site": np.nan, "energy_error": np.nan, "relative_error": np.nan,
                 "n_samples": 0})
    return {"L": size, "attention": kind, "seed": seed, "warm": warm, "warm_steps": warm_steps,
            "warm_j2": warm_j2 if warm > 0 else None, "warm_L": warm_L if warm > 0 else None,
            "measure": "exact" if exact_sums else "mc",
            "params": driver.n_params, "solver": driver.solver, "symmetry": cfg.model.symmetry,
            "J2": cfg.hamiltonian.J2, "steps": n_iter, "rollbacks": state.rollbacks,
            "seconds_per_step": train_s / max(n_iter, 1),
            "finetune_steps": len(deadline.tail_steps),
            "seconds_per_finetune_step": statistics.fmean(deadline.tail_steps or [np.nan]),
            **{f"median_{k}": statistics.median(split[k]) for k in SPLIT},
            "minority_sign": statistics.fmean(split["minority_sign"][-LAST:]),
            "energy_per_site": final["energy_per_site"], "energy_error": final["energy_error"],
            "reference": ref, "relative_error": final["relative_error"], "v_score": final["v_score"],
            "projected_energy": projected["energy_per_site"],
            "projected_error": projected["energy_error"],
            "projected_relative_error": projected["relative_error"],
            "lanczos_energy": step["energy_per_site"], "lanczos_error": step["energy_error"],
            "lanczos_relative_error": step["relative_error"], "lanczos_v_score": step.get("v_score", np.nan),
            "lanczos_alpha": step.get("alpha", np.nan),
            "lanczos_alpha_halves": [float(a) for a in step.get("alpha_halves", [])],
            "final_samples": final["n_samples"], "projected_samples": projected["n_samples"],
            "lanczos_samples": step["n_samples"],
            "measure_seconds": time.perf_counter() - t_final,
            "wall_minutes": (time.perf_counter() - start) / 60}


def spread(values: list[float]) -> str:
    v = np.asarray(values, float)
    return (f"mean {np.mean(v):.2e}, std {np.std(v):.1e}, min {np.min(v):.2e}, max {np.max(v):.2e}"
            if len(v) > 1 else f"{v[0]:.2e}")


def report(rows: list[dict], minutes: float) -> None:
    print(f"{'L':>2} {'attention':>10} {'seed':>4} {'warm':>4} {'params':>7} {'steps':>6} "
          f"{'s/step':>7} {'E/N (S.S units)':>22} {'rel. error':>10} {'V-score':>8} "
          f"{'E/N fully projected':>22} {'rel. error':>10} {'minutes':>8}")
    for r in rows:
        print(f"{r['L']:>2} {r['attention']:>10} {r['seed']:>4} {r['warm']:>4g} {r['params']:>7} "
              f"{r['steps']:>6} {r['seconds_per_step']:>7.3f} "
              f"{r['energy_per_site']:>12.6f} ± {r['energy_error']:.6f} {r['relative_error']:>10.2e} "
              f"{r['v_score']:>8.4f} {r['projected_energy']:>12.6f} ± {r['projected_error']:.6f} "
              f"{r['projected_relative_error']:>10.2e} {r['wall_minutes']:>8.1f}")
    for r in rows:
        inside = "inside" if r["wall_minutes"] <= minutes else "OVER"
        how = (f"exact sums over {r['final_samples']} states" if r["measure"] == "exact" else
               f"{r['final_samples']} samples, {r['projected_samples']} fully projected")
        tail = (f"; {r['finetune_steps']} of them fine-tuning, {r['seconds_per_finetune_step']:.1f} s "
                f"each" if r["finetune_steps"] else "")
        at = (f" on {r['warm_L']}x{r['warm_L']}" if r["warm_L"] is not None else "") + \
            (f" at J2 = {r['warm_j2']:g}" if r["warm_j2"] is not None else "")
        if r["lanczos_samples"]:
            print(f"{r['attention']} seed {r['seed']} warm {r['warm']:g}: one Lanczos step on the trained "
                  f"state: E/N = {r['lanczos_energy']:.6f} ± {r['lanczos_error']:.6f}, "
                  f"rel. error {r['lanczos_relative_error']:.2e}, V-score {r['lanczos_v_score']:.4f} "
                  f"({'exact' if r['measure'] == 'exact' else str(r['lanczos_samples']) + ' samples'}; "
                  f"a = {', '.join(f'{a:.4f}' for a in r['lanczos_alpha_halves'] or [r['lanczos_alpha']])})")
        print(f"{r['attention']} seed {r['seed']} warm {r['warm']:g}{at}: {inside} the budget{tail}; warm-up "
              f"steps {r['warm_steps']}; rollbacks {r['rollbacks']}; final measurements "
              f"{r['measure_seconds']:.0f} s ({how}); median "
              f"step: sampling {r['median_t_sample']:.3f} s, local energies "
              f"{r['median_t_energy']:.3f} s, SR {r['median_t_sr']:.3f} s; minority sign "
              f"{r['minority_sign']:.4f} (mean of the last {LAST} steps)")
    for key in sorted({(r["attention"], r["warm"]) for r in rows}):
        group_rows = [r for r in rows if (r["attention"], r["warm"]) == key]
        print(f"{key[0]} warm {key[1]:g} over {len(group_rows)} seed(s): relative error "
              f"{spread([r['relative_error'] for r in group_rows])}; fully projected "
              f"{spread([r['projected_relative_error'] for r in group_rows])}"
              + (f"; one Lanczos step {spread([r['lanczos_relative_error'] for r in group_rows])}"
                 if all(r["lanczos_samples"] for r in group_rows) else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=4, choices=sorted(BUDGET_MINUTES))
    ap.add_argument("--minutes", type=float, help="budget per run (default: 15 for 4x4, 60 for 6x6)")
    ap.add_argument("--kinds", default="factored,standard")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--warm", default="0", help="fractions of the budget for a warm start (on 4x4 unless --warm-size)")
    ap.add_argument("--warm-j2", type=float, help="coupling of the warm start (default: the run's; "
                    "with --size 4 the warm start is on the same lattice)")
    ap.add_argument("--warm-size", type=int, help=f"lattice size of the warm start (default: "
                    f"{WARM_L}, at most --size)")
    ap.add_argument("--measure", default="auto", choices=("auto", "exact", "mc"),
                    help="final energies by exact sums or by sampling (auto: exact where the "
                         f"lattice has at most {exact.MAX_SITES} sites)")
    ap.add_argument("--lanczos", type=float, default=0.0,
                    help="share of the budget kept for one Lanczos step on the trained state, "
                         "sampled (default 0: none; with exact sums it is always reported)")
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument("--save", help="write each trained state (parameters, chains, step) to "
                    "KIND_seedS_warmF.pkl in this directory, before its final measurements")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_intermixed_args()  # key=value overrides may come before or after options
    minutes = args.minutes or BUDGET_MINUTES[args.size]
    warms = [float(w) for w in args.warm.split(",")]
    if args.warm_j2 is not None and not any(warms):
        ap.error(f"--warm-j2 {args.warm_j2:g} needs --warm F with F > 0 (the budget's share for it)")
    warm_L = min(WARM_L, args.size) if args.warm_size is None else args.warm_size
    if not WARM_L <= warm_L <= args.size:
        ap.error(f"--warm-size {warm_L} must be from {WARM_L} to --size ({args.size})")
    if warm_L == args.size and any(warms) and args.warm_j2 is None:
        ap.error(f"--warm on the run's own lattice ({warm_L}x{warm_L}) needs --warm-j2 (a warm "
                 f"start at another coupling) or --warm-size below {args.size}")
    for folder in (args.save, args.json and os.path.dirname(os.path.abspath(args.json))):
        if folder:  # now, not after an hour of training
            os.makedirs(folder, exist_ok=True)
    small = args.size ** 2 <= exact.MAX_SITES
    if args.measure == "exact" and not small:
        ap.error(f"--measure exact needs at most {exact.MAX_SITES} sites; {args.size}x{args.size} "
                 f"has {args.size ** 2}")
    exact_sums = args.measure == "exact" or (args.measure == "auto" and small)
    print(f"{args.size}x{args.size}: budget {minutes:g} min per run on {os.cpu_count()} cores; "
          f"final energies {'exact' if exact_sums else 'sampled'}; "
          f"overrides: {' '.join(args.overrides) or 'none'}", flush=True)
    rows = []
    for kind in args.kinds.split(","):
        for warm in warms:
            for seed in (int(s) for s in args.seeds.split(",")):
                rows.append(bench(args.size, kind, seed, warm, minutes, exact_sums, args.overrides,
                                  args.warm_j2, warm_L, args.lanczos, args.save))
                report(rows[-1:], minutes)
    print("\nall runs (E/N per site in S.S units; relative error against the reference table or "
          "exact diagonalization):")
    report(rows, minutes)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
