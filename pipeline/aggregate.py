"""The offline report of many runs: one table row per run, as CSV, and figures.

python -m pipeline.aggregate DIR [DIR ...] [--csv FILE] [--plots OUTDIR]

Every results.h5 under the directories is read (`results.load`: also files of running or killed
jobs, never hanging); a run without /final shows its status instead (a `running` whose process is
gone shows as stale); an unreadable, foreign or newer-format file is skipped with a one-line
warning. The table (a pandas DataFrame) has one row per run: the config keys that differ between
the runs (always L, J2 and model), n_params, steps done, median seconds per step and its split,
the final energy per site with its error, the reference and relative error, the V-score, the
newest /measurements entry (energy, error, relative error, symmetry) and the mean attention
input-dependence D of the last /attention row. Energies are per site in S.S units. With --plots,
PNG figures are written by `plots` (matplotlib, no display needed).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass, field

import numpy as np
import yaml

from . import status
from .config import Config, to_yaml
from .errors import ResultsError
from .results import FORMAT_VERSION, Content, load

ALWAYS = ("L", "J2", "model")
FINAL = ("energy_per_site", "energy_error", "reference_energy_per_site", "relative_error",
         "v_score")
TIMES = ("seconds", "t_sample", "t_energy", "t_sr")


@dataclass
class Run:
    """One run directory's results, as read."""

    run_dir: str
    state: str
    config: dict
    content: Content
    row: dict = field(default_factory=dict)
    plot_label: str = ""  # set by plots: the label, numbered when runs share it

    @property
    def label(self) -> str:
        """Short: size, attention kind, J2 (`plots` numbers runs that share one)."""
        return f"L={self.row['L']} {self.row['model'].removeprefix('vit_')} J2={self.row['J2']}"

    @property
    def measurements(self) -> dict[str, dict]:
        """name -> attributes of each /measurements entry, oldest first (by name order)."""
        return {k.split("/", 1)[1]: v for k, v in sorted(self.content.groups.items())
                if k.startswith("measurements/")}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v if not isinstance(v, list) else str(v)
    return out


def read_run(dirpath: str) -> Run:
    """One run; ResultsError (one line) when the file is unreadable, foreign or newer."""
    path = os.path.join(dirpath, "results.h5")
    c = load(path)
    version = int(c.attrs.get("format_version", 1))
    if version > FORMAT_VERSION:
        raise ResultsError(f"results file {path} has format version {version}; this vitnqs reads "
                           f"up to {FORMAT_VERSION}: update vitnqs")
    try:
        cfg = yaml.safe_load(c.attrs["config"])
        row = {"L": cfg["lattice"]["L"], "J2": cfg["hamiltonian"]["J2"],
               "model": f"vit_{cfg['model']['attention']}"}
    except (KeyError, TypeError, yaml.YAMLError) as e:
        raise ResultsError(f"results file {path} is not one of vitnqs ({e!r})") from None
    run = Run(dirpath, status.current(dirpath), cfg, c)
    run.row = {"run_dir": dirpath, "state": run.state, **row,
               "n_params": int(c.attrs.get("n_params", 0)), "steps": len(c.history.get("step", []))}
    h = c.history
    for t in TIMES:
        run.row[f"median_{t}"] = float(np.median(h[t])) if len(h.get(t, [])) else math.nan
    final = c.final
    run.row |= {k: float(final.get(k, math.nan)) for k in FINAL}
    ref = run.row["reference_energy_per_site"]
    meas = list(run.measurements.items())
    if meas:
        name, m = meas[-1]
        e = float(m["energy_per_site"])
        run.row |= {"measured": name, "measured_symmetry": str(m["symmetry"]),
                    "measured_energy_per_site": e, "measured_energy_error": float(m["energy_error"]),
                    "measured_relative_error": (e - ref) / abs(ref) if ref == ref else math.nan}
    dep = c.group("attention").get("dependence")
    run.row["attention_dependence"] = float(dep[-1].mean()) if dep is not None and len(dep) else math.nan
    return run


def collect_runs(roots: list[str]) -> list[Run]:
    runs = []
    for root in roots:
        for dirpath, _, files in sorted(os.walk(root)):
            if "results.h5" not in files:
                continue
            try:
                runs.append(read_run(dirpath))
            except ResultsError as e:
                print(f"skipping {os.path.join(dirpath, 'results.h5')}: {e}", file=sys.stderr)
    return runs


def collect(roots: list[str]) -> list[dict]:
    """The table rows of all runs under `roots` (see the module doc)."""
    return [r.row for r in collect_runs(roots)]


def frame(runs: list[Run]):
    """The report as a pandas DataFrame: the rows plus the config keys that vary between runs."""
    import pandas as pd

    defaults = _flatten(yaml.safe_load(to_yaml(Config())))  # keys older runs did not have yet
    flat = [defaults | _flatten(r.config) for r in runs]
    keys = sorted({k for f in flat for k in f})
    varying = [k for k in keys if len({repr(f.get(k)) for f in flat}) > 1
               and k not in ("lattice.L", "hamiltonian.J2", "model.attention")
               and not k.startswith(("launcher.", "checkpoint."))]
    rows = [r.row | {k: f.get(k) for k in varying} for r, f in zip(runs, flat)]
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    front = ["run_dir", "state", *ALWAYS, *varying]
    return df[front + [c for c in df.columns if c not in front]]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.aggregate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="+")
    ap.add_argument("--csv", help="write the table to this CSV file")
    ap.add_argument("--plots", metavar="OUTDIR", help="write the PNG figures into this directory")
    args = ap.parse_args(argv)
    runs = collect_runs(args.dirs)
    df = frame(runs)
    if args.csv:
        df.to_csv(args.csv, index=False)
    print("E/N in S.S units per site; seconds per SR step")
    if df.empty:
        print("no runs found")
    else:
        shown = [c for c in df.columns if c not in ("median_t_sample", "median_t_energy", "median_t_sr")]
        with __import__("pandas").option_context("display.width", 200, "display.max_columns", None,
                                                 "display.max_colwidth", None,
                                                 "display.float_format", "{:.6g}".format):
            print(df[shown].rename(columns={"relative_error": "rel.err"}).to_string(index=False))
    if args.plots:
        from . import plots

        for path in plots.write_all(runs, args.plots):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
