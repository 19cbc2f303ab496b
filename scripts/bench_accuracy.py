"""Accuracy per wall-clock budget on 4x4, J2 = 0.5: train each attention kind for a fixed budget
and measure the final energy on fresh samples.

The budget covers everything after start-up (compilation, a short calibration that sets the
number of SR steps so that the learning-rate schedule ends inside the budget, training and the
final measurement). Settings come from conf/experiment/bench_4x4.yaml; extra dotted overrides
apply to both kinds.

usage: python scripts/bench_accuracy.py [--minutes 15] [--kinds factored,standard] [key=value ...]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time

from pipeline import observables
from pipeline.config import compose, validate
from pipeline.driver import Driver
from pipeline.models import group
from pipeline.report import reference_energy, with_reference
from pipeline.system import System

CALIBRATION_STEPS = 12
PROJECTED_SAMPLES = 8192
SAFETY = 1.3  # margin on the measurement times predicted from the calibration steps
SPLIT = ("t_sample", "t_energy", "t_sr")  # per-step phases the driver times


def configure(kind: str, overrides: list[str]):
    return validate(compose(["+experiment=bench_4x4", f"model=vit_{kind}", *overrides]))


def bench(kind: str, minutes: float, overrides: list[str]) -> dict:
    start = time.perf_counter()
    cfg = configure(kind, overrides)
    system = System.build(cfg)
    probe = Driver(system)
    state = probe.fresh_state()
    times, sampling = [], []
    for _ in range(CALIBRATION_STEPS):
        t = time.perf_counter()
        state, rec = probe.step(state)
        times.append(time.perf_counter() - t)
        sampling.append(rec.t_sample + rec.t_energy)
    per_step, per_estimate = (statistics.median(x[4:]) for x in (times, sampling))
    # The measurements cost what sampling and local energies cost per step, scaled by their
    # sample counts and (projected) by the group size: full (64 images) over the training one.
    images = len(group(system.lattice, "full")[0]) / len(group(system.lattice, cfg.model.symmetry)[0])
    reserve = SAFETY * per_estimate * (cfg.sampler.n_samples_final
                                       + images * PROJECTED_SAMPLES) / cfg.sampler.n_samples
    left = minutes * 60 - (time.perf_counter() - start) - reserve
    n_iter = max(int(left / (per_step * 1.03)), 10)
    run_cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, n_iter=n_iter))
    driver = Driver(dataclasses.replace(system, cfg=run_cfg))  # same jitted functions
    state = driver.fresh_state()
    t_train = time.perf_counter()
    split: dict[str, list[float]] = {k: [] for k in SPLIT}
    while state.step < n_iter:
        state, rec = driver.step(state)
        for k in SPLIT:
            split[k].append(getattr(rec, k))
        if state.step % 100 == 0:
            print(f"  [{kind}] step {state.step}/{n_iter}: E/N = {rec.energy:.6f} "
                  f"± {rec.energy_error:.6f}", flush=True)
    train_s = time.perf_counter() - t_train
    t_final = time.perf_counter()
    ref = reference_energy(cfg, system.hamiltonian)
    final = with_reference(observables.energy(state.vstate, cfg.sampler.n_samples_final, state.step), ref)
    t_projected = time.perf_counter()
    # The same parameters, projected on the full symmetry group (translations x C4v x spin flip)
    # for the final measurement only: it lowers the energy without retraining.
    full_cfg = dataclasses.replace(run_cfg, model=dataclasses.replace(run_cfg.model, symmetry="full",
                                                                      chunk_size=2048),
                                   sampler=dataclasses.replace(run_cfg.sampler,
                                                               n_samples_final=PROJECTED_SAMPLES))
    full = System.build(full_cfg)
    projected = with_reference(observables.energy(state.vstate.replace(system=full),
                                              PROJECTED_SAMPLES, state.step), ref)
    return {"attention": kind, "params": driver.n_params, "solver": driver.solver,
            "symmetry": cfg.model.symmetry, "steps": n_iter, "seconds_per_step": train_s / n_iter,
            **{f"median_{k}": statistics.median(v) for k, v in split.items()},
            "energy_per_site": final["energy_per_site"], "energy_error": final["energy_error"],
            "relative_error": final["relative_error"], "v_score": final["v_score"],
            "projected_energy": projected["energy_per_site"],
            "projected_error": projected["energy_error"],
            "projected_relative_error": projected["relative_error"],
            "measure_seconds": t_projected - t_final,
            "projected_measure_seconds": time.perf_counter() - t_projected,
            "wall_minutes": (time.perf_counter() - start) / 60}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=15.0)
    ap.add_argument("--kinds", default="factored,standard")
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    print(f"4x4 J2=0.5, exact E/N = -0.5286202095; budget {args.minutes:g} min per kind on "
          f"{os.cpu_count()} cores", flush=True)
    rows = [bench(k, args.minutes, args.overrides) for k in args.kinds.split(",")]
    print(f"{'attention':>10} {'params':>7} {'solver':>7} {'symmetry':>12} {'steps':>6} {'s/step':>7} "
          f"{'E/N (S.S units)':>22} {'rel. error':>10} {'E/N fully projected':>22} {'rel. error':>10} "
          f"{'minutes':>8}")
    for r in rows:
        print(f"{r['attention']:>10} {r['params']:>7} {r['solver']:>7} {r['symmetry']:>12} "
              f"{r['steps']:>6} {r['seconds_per_step']:>7.3f} "
              f"{r['energy_per_site']:>12.6f} ± {r['energy_error']:.6f} {r['relative_error']:>10.2e} "
              f"{r['projected_energy']:>12.6f} ± {r['projected_error']:.6f} "
              f"{r['projected_relative_error']:>10.2e} {r['wall_minutes']:>8.1f}")
    for r in rows:
        inside = "inside" if r["wall_minutes"] <= args.minutes else "OVER"
        print(f"{r['attention']}: final measurement {r['measure_seconds']:.0f} s, projected "
              f"measurement {r['projected_measure_seconds']:.0f} s ({inside} the budget); median step: "
              f"sampling {r['median_t_sample']:.3f} s, local energies {r['median_t_energy']:.3f} s, "
              f"SR {r['median_t_sr']:.3f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
