"""results.h5: the run's history, written step by step (HDF5 SWMR: readable while the job runs),
and its final measurement.

Layout (an interface users script against):
  /                 attrs: n_params, config (resolved YAML), units, versions, code_version, n_ranks
  /history/<field>  1-D datasets, one row per step: the fields of `records.StepRecord`, in its
                    order and with its documentation; energies per site in S.S units
  /final            attrs: energy_per_site, energy_error, variance_per_site, v_score,
                    reference_energy_per_site, relative_error, n_samples, r_hat, acceptance

Readers open it with h5py.File(path, "r", swmr=True) while the job runs.
Only rank 0 writes.
"""
from __future__ import annotations

from typing import Mapping

import h5py
import numpy as np

from .errors import ResultsError
from .records import DTYPES, HISTORY, StepRecord

UNITS = "energies per site in S.S units (H = J1 sum S_i.S_j + J2 sum S_i.S_j); variance = Var(E_loc)/N"


class ResultsWriter:
    """Appends one row per step to /history; `finish` writes /final."""

    def __init__(self, path: str, attrs: Mapping[str, object], keep_steps_below: int) -> None:
        """Open (or create) `path`; rows with step >= keep_steps_below are cut (resume)."""
        self.path = path
        try:
            self.f = h5py.File(path, "a", libver="latest")
        except (OSError, BlockingIOError) as e:
            raise ResultsError(f"cannot open results file {path} for writing ({e}); "
                               "is another job writing it, or the directory read-only?") from e
        f = self.f
        hist = f.require_group("history")
        n_keep = 0
        if "step" in hist:
            n_keep = int(np.searchsorted(hist["step"][...], keep_steps_below))
        for name in HISTORY:
            if name not in hist:
                hist.create_dataset(name, shape=(0,), maxshape=(None,), chunks=(256,),
                                    dtype=DTYPES[name])
            hist[name].resize((n_keep,))
        if "final" in f:
            del f["final"]
        for key, value in attrs.items():
            f.attrs[key] = value
        f.attrs["units"] = UNITS
        f.flush()
        f.swmr_mode = True

    def append(self, record: StepRecord) -> None:
        hist = self.f["history"]
        for name, value in record.as_dict().items():
            ds = hist[name]
            n = ds.shape[0]
            ds.resize((n + 1,))
            ds[n] = value
            ds.flush()

    def truncate(self, step: int) -> None:
        """Drop rows with step >= `step` (after a rollback)."""
        hist = self.f["history"]
        n = int(np.searchsorted(hist["step"][...], step))
        for name in HISTORY:
            hist[name].resize((n,))
            hist[name].flush()

    def close(self) -> None:
        if self.f.id.valid:
            self.f.close()

    def finish(self, final: Mapping[str, float]) -> None:
        """Close the SWMR session and write /final (new objects need a non-SWMR handle)."""
        self.close()
        with h5py.File(self.path, "a", libver="latest") as f:
            g = f.require_group("final")
            for key, value in final.items():
                g.attrs[key] = value
            f.flush()


def read_history(path: str) -> dict[str, np.ndarray]:
    """The history as arrays; safe while a job writes the file."""
    with h5py.File(path, "r", swmr=True) as f:
        return {k: f["history"][k][...] for k in f["history"]}


def read_final(path: str) -> dict[str, float]:
    with h5py.File(path, "r") as f:
        return dict(f["final"].attrs) if "final" in f else {}
