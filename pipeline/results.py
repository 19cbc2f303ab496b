"""results.h5: the run's history, written step by step (HDF5 SWMR: readable while the job runs),
and its final measurement.

Layout (an interface users script against):
  /                 attrs: n_params, config (resolved YAML), units, versions, code_version, n_ranks,
                    format_version
  /history/<field>  1-D datasets, one row per step: the fields of `records.StepRecord`, in its
                    order and with its documentation; energies per site in S.S units
  /attention/<field> attention maps on the chains every analysis.every_steps steps and at the
                    end (models with layers; see `analysis`): step (rows,), dependence (rows,
                    layers, heads), profile (rows, layers, heads, n), mean_map (rows, layers,
                    heads, n, n); n = number of patches
  /final            attrs: step, energy_per_site, energy_error, variance_per_site, v_score,
                    reference_energy_per_site, relative_error, n_samples, r_hat, acceptance,
                    symmetry (the projection it was measured with)
  /measurements/<name>  written by `python -m pipeline.measure` (see `measure`)

Readers open it with h5py.File(path, "r", swmr=True) while the job runs, or with `load` here,
which also reads files whose writer was killed and never hangs on a damaged one.
Only rank 0 writes. The file is only ever replaced whole (written next to it, then renamed) or
appended to: a new run creates it, a resume rebuilds it from the rows below the resume step
(`prepare`), and /final is added by rewriting it (`ResultsWriter.finish`); in between, rows are
appended in SWMR mode, so a kill at any moment leaves a file `load` can read. The growing groups
(/history, /attention) each carry a `step` dataset; resuming and rolling back cut all of them at
the same step.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Mapping

import h5py
import numpy as np
from h5py import h5f, h5p

from . import hdf5
from .errors import ResultsError
from .records import DTYPES, HISTORY, StepRecord

FORMAT_VERSION = 2  # 2: /attention and /measurements; readers refuse newer files with one line
UNITS = "energies per site in S.S units (H = J1 sum S_i.S_j + J2 sum S_i.S_j); variance = Var(E_loc)/N"
GROWING = ("history", "attention")  # groups whose datasets grow by rows while the job runs
# name -> (dtype, row shape) of every growing dataset, e.g. "history/energy": (float64, ())
Tables = Mapping[str, tuple[type, tuple[int, ...]]]
HISTORY_TABLES: dict[str, tuple[type, tuple[int, ...]]] = {
    f"history/{name}": (DTYPES[name], ()) for name in HISTORY}
# history fields newer than some files: resuming such a file gives its earlier rows NaN there
ADDED = ("step_length", "phase_coherence", "minority_sign")
log = logging.getLogger("vitnqs")


@dataclass
class Content:
    """A results file in memory: root attributes and, by path, each group's or dataset's
    attributes and each dataset's array."""

    attrs: dict = field(default_factory=dict)
    groups: dict[str, dict] = field(default_factory=dict)
    datasets: dict[str, tuple[np.ndarray, dict]] = field(default_factory=dict)
    left_open: bool = False  # its writer was killed (or is still writing)

    @property
    def history(self) -> dict[str, np.ndarray]:
        return self.group("history")

    @property
    def final(self) -> dict:
        return dict(self.groups.get("final", {}))

    def group(self, name: str) -> dict[str, np.ndarray]:
        """The datasets of one group, by field name."""
        return {k[len(name) + 1:]: a for k, (a, _) in self.datasets.items()
                if k.startswith(name + "/")}

    def cut(self, keep_steps_below: int) -> None:
        """Drop the rows with step >= keep_steps_below from every growing group."""
        for g in GROWING:
            steps = self.group(g).get("step", np.zeros(0, np.int64))
            n = int(np.searchsorted(steps, keep_steps_below))
            for k, (a, attrs) in list(self.datasets.items()):
                if k.startswith(g + "/"):
                    self.datasets[k] = (a[:n], attrs)

    def write(self, path: str) -> None:
        """Replace `path` with this content (atomically); growing datasets stay growable (chunks of
        at most 256 rows and about 1 MiB) and carry a Fletcher-32 checksum per chunk, so damaged
        rows fail to read instead of reading wrong."""
        def fill(f: h5py.File) -> None:
            f.attrs.update(self.attrs)
            for name, attrs in self.groups.items():
                f.require_group(name).attrs.update(attrs)
            for name, (a, attrs) in self.datasets.items():
                growing = name.split("/", 1)[0] in GROWING
                rows = max(1, min(256, 2 ** 20 // max(a.itemsize * int(np.prod(a.shape[1:])), 1)))
                ds = f.create_dataset(name, data=a, chunks=(rows,) + a.shape[1:] if growing else None,
                                      maxshape=(None,) + a.shape[1:] if growing else None,
                                      fletcher32=growing)  # damaged rows fail to read
                ds.attrs.update(attrs)
        hdf5.write_atomically(path, fill)


def load(path: str, attempts: int = 3) -> Content:
    """The whole file, read in bounded time (see `hdf5`); a live writer's file is read as of its
    last flush. Raises ResultsError with one line naming the file when it cannot be read."""
    for attempt in range(attempts):
        try:
            f, left_open = hdf5.read_image(path)
            with f:
                c = Content(dict(f.attrs), left_open=left_open)
                for name, obj in hdf5.walk(f):
                    if isinstance(obj, h5py.Dataset):
                        c.datasets[name] = (obj[()], dict(obj.attrs))
                    else:
                        c.groups[name] = dict(obj.attrs)
            return c
        except FileNotFoundError:
            raise ResultsError(f"results file {path} does not exist") from None
        except (OSError, KeyError, ValueError, RuntimeError) as e:
            if attempt + 1 == attempts:
                reason = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise ResultsError(f"results file {path} is damaged or unreadable ({reason}); move "
                                   "it away to start over, or restore a good copy") from None
            time.sleep(0.2)  # a live writer may have been between two flushes
    raise AssertionError("unreachable")


def check_history(path: str, c: Content, step: int) -> None:
    """A resume from checkpoint `step` needs exactly the rows of steps 0 .. step-1."""
    h = c.history
    missing = [k for k in HISTORY if k not in h and k not in ADDED]
    if missing:
        raise ResultsError(f"results file {path} lacks history fields {missing}: not a results "
                           "file of this version; use another hydra.run.dir")
    steps = h["step"][h["step"] < step]
    if not np.array_equal(steps, np.arange(step)):
        last = int(steps[-1]) if len(steps) else None
        raise ResultsError(
            f"results file {path} holds {len(steps)} history rows up to step {last} but the "
            f"checkpoint is at step {step}: it is an older or foreign copy. Restore the run's own "
            "results.h5, or move checkpoints/ away to start over.")


def prepare(path: str, attrs: Mapping[str, object], step: int, n_iter: int,
            tables: Tables = HISTORY_TABLES) -> bool:
    """Make `path` the results file of a run (re)starting at `step`: a new file at step 0 (an
    unfinished earlier attempt's rows are dropped), else the existing file rebuilt with the rows
    below `step`, attributes updated and /final kept; every growing dataset of `tables` exists
    afterwards (SWMR appends cannot create datasets). Returns True, touching nothing, when the
    file holds the finished run (/final of step `step` >= n_iter). Refuses, with one line, a
    missing file on resume, a history that does not end at step - 1, or a finished run without
    checkpoints."""
    exists = os.path.lexists(path)
    if step > 0 and not exists:
        raise ResultsError(f"results file {path} is missing, but the run resumes from step {step}: "
                           "its history would be incomplete. Restore the file, or move the "
                           "checkpoints/ directory away to start over.")
    old = load(path) if exists else None
    if old is not None and old.final and step >= n_iter and old.final.get("step", step) == step:
        return True
    if old is not None and step == 0 and old.final:
        raise ResultsError(f"results file {path} holds a finished run but there is no checkpoint "
                           "to resume from; use another hydra.run.dir")
    if step > 0:
        c = old if old is not None else Content()
        check_history(path, c, step)
        c.cut(step)
        for k in ADDED:
            c.datasets.setdefault(f"history/{k}", (np.full(step, np.nan, DTYPES[k]), {}))
    else:  # a new run, or an attempt killed before its first checkpoint: start the file over
        c = Content()
    for name, (dtype, shape) in tables.items():
        c.datasets.setdefault(name, (np.zeros((0,) + tuple(shape), dtype), {}))
        c.groups.setdefault(name.split("/", 1)[0], {})
    c.attrs.update(attrs)
    c.attrs["units"] = UNITS
    c.attrs["format_version"] = FORMAT_VERSION
    if old is not None and old.left_open:
        log.warning("results file %s had been left open by a killed writer: rebuilt from its "
                    "rows below step %d", path, step)
    c.write(path)
    return False


class ResultsWriter:
    """Appends rows to the growing groups of a file `prepare` made; `finish` writes /final."""

    def __init__(self, path: str) -> None:
        """Open `path` for SWMR writing in one call, so no moment leaves it open without SWMR."""
        self.path = path
        try:
            fapl = h5p.create(h5p.FILE_ACCESS)
            fapl.set_libver_bounds(h5f.LIBVER_LATEST, h5f.LIBVER_LATEST)
            self.f = h5py.File(h5f.open(path.encode(), h5f.ACC_RDWR | h5f.ACC_SWMR_WRITE, fapl))
        except OSError as e:
            raise ResultsError(f"cannot open results file {path} for writing ({e})") from e

    def append(self, record: StepRecord) -> None:
        self.append_row("history", record.as_dict())

    def append_row(self, group: str, row: Mapping[str, object]) -> None:
        """One row (field -> value or array of the row shape) at the end of each dataset."""
        g = self.f[group]
        for name, value in row.items():
            ds = g[name]
            n = ds.shape[0]
            ds.resize((n + 1,) + ds.shape[1:])
            ds[n] = value
            ds.flush()

    def truncate(self, step: int) -> None:
        """Drop rows with step >= `step` from every growing group (after a rollback)."""
        for group in GROWING:
            if group not in self.f:
                continue
            g = self.f[group]
            n = int(np.searchsorted(g["step"][...], step))
            for ds in g.values():
                ds.resize((n,) + ds.shape[1:])
                ds.flush()

    def close(self) -> None:
        if self.f.id.valid:
            self.f.close()

    def finish(self, final: Mapping[str, float]) -> None:
        """Close the SWMR session and write /final by replacing the file with a copy holding it."""
        self.close()
        write_final(self.path, final)


def write_final(path: str, final: Mapping[str, float]) -> None:
    """Set /final's attributes by rewriting the file (write-new-then-replace)."""
    c = load(path)
    c.groups["final"] = dict(final)
    c.write(path)


def read_history(path: str) -> dict[str, np.ndarray]:
    """The history as arrays; safe while a job writes the file."""
    return load(path).history


def read_final(path: str) -> dict[str, float]:
    return load(path).final
