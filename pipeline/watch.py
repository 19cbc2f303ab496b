"""Print the latest steps of a running (or finished) job from its results.h5, read with SWMR.

python -m pipeline.watch RUN_DIR [--once] [--every SECONDS]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from . import status
from .errors import ResultsError
from .results import read_final, read_history


def describe(run_dir: str) -> str:
    path = os.path.join(run_dir, "results.h5")
    h = read_history(path)
    n = len(h["step"])
    state = status.current(run_dir)
    if n == 0:
        return f"{run_dir}: {state}, 0 steps"
    last = (f"step {h['step'][-1]}: E/N = {h['energy'][-1]:+.6f} ± {h['energy_error'][-1]:.6f}, "
            f"var/N = {h['variance'][-1]:.4g}, acc = {h['acceptance'][-1]:.3f}, "
            f"{h['seconds'][-1]:.2f} s/step")
    line = f"{run_dir}: {state}, {n} steps; {last}"
    final = read_final(path) if state == "finished" else {}
    if final:
        line += (f"\nfinal E/N = {final['energy_per_site']:.6f} ± {final['energy_error']:.6f}, "
                 f"relative error {final['relative_error']:.2e}")
    return line


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("run_dir")
    ap.add_argument("--once", action="store_true", help="print once and exit")
    ap.add_argument("--every", type=float, default=5.0, help="seconds between updates")
    args = ap.parse_args(argv)
    if not os.path.exists(os.path.join(args.run_dir, "results.h5")):
        print(f"no results.h5 in {args.run_dir} yet", file=sys.stderr)
        return 1
    while True:
        try:
            print(describe(args.run_dir), flush=True)
        except ResultsError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        if args.once or status.current(args.run_dir) not in ("running", "queued", status.REQUEUED):
            return 0
        time.sleep(args.every)


if __name__ == "__main__":
    sys.exit(main())
