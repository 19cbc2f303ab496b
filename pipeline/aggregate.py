"""Collect the final results of many run directories into one table (offline, read-only).

python -m pipeline.aggregate DIR [DIR ...] [--csv FILE]
Every results.h5 under the directories is read (`results.load`: also files of running or killed
jobs, never hanging); a run without /final shows its status instead (a `running` whose process is
gone shows as stale); an unreadable or foreign file is skipped with a one-line warning.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys

import yaml

from . import status
from .errors import ResultsError
from .results import load

COLUMNS = ("run_dir", "state", "L", "J2", "model", "n_params", "energy_per_site", "energy_error",
           "variance_per_site", "v_score", "reference_energy_per_site", "relative_error")


def _row(dirpath: str) -> dict:
    c = load(os.path.join(dirpath, "results.h5"))
    try:
        cfg = yaml.safe_load(c.attrs["config"])
        row = {"run_dir": dirpath, "state": status.current(dirpath), "L": cfg["lattice"]["L"],
               "J2": cfg["hamiltonian"]["J2"], "model": f"vit_{cfg['model']['attention']}",
               "n_params": int(c.attrs.get("n_params", 0))}
    except (KeyError, TypeError, yaml.YAMLError) as e:
        raise ResultsError(f"results file {dirpath}/results.h5 is not one of vitnqs ({e!r})") from None
    if c.final:
        row |= {k: float(c.final[k]) for k in COLUMNS[6:]}
    return row


def collect(roots: list[str]) -> list[dict]:
    rows = []
    for root in roots:
        for dirpath, _, files in sorted(os.walk(root)):
            if "results.h5" not in files:
                continue
            try:
                rows.append(_row(dirpath))
            except ResultsError as e:
                print(f"skipping {os.path.join(dirpath, 'results.h5')}: {e}", file=sys.stderr)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("dirs", nargs="+")
    ap.add_argument("--csv", help="write the table to this CSV file")
    args = ap.parse_args(argv)
    rows = collect(args.dirs)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, COLUMNS)
            w.writeheader()
            w.writerows(rows)
    print("E/N in S.S units per site")
    for r in rows:
        e = (f"{r['energy_per_site']:.6f} ± {r['energy_error']:.6f}  rel.err {r['relative_error']:.2e}"
             if "energy_per_site" in r else r["state"])
        print(f"L={r['L']:<3} J2={r['J2']:<5} {r['model']:<13} P={r['n_params']:<7} {e}  {r['run_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
