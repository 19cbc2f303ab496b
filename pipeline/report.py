"""Reporting: reference energies, relative errors and the one-line summary of a run.

The loop measures; this layer, which writes results, says how good the measurement is.
"""
from __future__ import annotations

import math

from . import exact
from .config import Config, LatticeKind
from .hamiltonian import Hamiltonian


def reference_energy(cfg: Config, hamiltonian: Hamiltonian) -> float | None:
    """Exact (N <= exact.MAX_SITES, or tabulated) or best published ground-state energy per
    site, or None."""
    if cfg.lattice.kind == LatticeKind.square and cfg.hamiltonian.J1 == 1.0:
        row = exact.reference_energy(cfg.lattice.L, cfg.hamiltonian.J2)
        if row is not None:
            return row[0]
    if hamiltonian.n_sites <= exact.MAX_SITES:
        return exact.ground_state(hamiltonian)[0]
    return None


def with_reference(final: dict, reference: float | None) -> dict:
    """`final` plus reference_energy_per_site and relative_error (NaN without a reference)."""
    if reference is None:
        return final | {"reference_energy_per_site": math.nan, "relative_error": math.nan}
    e = final["energy_per_site"]
    return final | {"reference_energy_per_site": reference,
                    "relative_error": (e - reference) / abs(reference)}


def summary(c: Config, f: dict) -> str:
    """One line: the final energy per site with its error, variance, V-score, relative error."""
    rel = f["relative_error"]
    ref = (f"reference {f['reference_energy_per_site']:.7f}, relative error {rel:.2e}"
           if rel == rel else "no reference energy for this system")
    return (f"final: L={c.lattice.L} J2={c.hamiltonian.J2} {c.model.name}: E/N = "
            f"{f['energy_per_site']:.6f} ± {f['energy_error']:.6f} (per site, S.S units; "
            f"{f['n_samples']} fresh samples, projection {f.get('symmetry', 'none')}), var/N = {f['variance_per_site']:.4g}, "
            f"V-score = {f['v_score']:.3g}; {ref}")
