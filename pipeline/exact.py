"""Exact diagonalization in the Sz = 0 sector (Lanczos on a sparse matrix), for N <= 20 sites, and
exact expectation values of a variational state (full sums over that sector).

Used by the tests, for the relative error of small runs and for the accuracy benchmark's final
measurements on 4x4 (no statistical error). The Hamiltonian is built from the
same `Hamiltonian` object as the local energies (Marshall sign included: it is a unitary change of
basis and leaves the spectrum unchanged).
"""
from __future__ import annotations

import csv
from functools import lru_cache
from itertools import combinations
from importlib import resources
from typing import Callable

import jax
import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import eigsh

from .config import EXACT_MAX_SITES as MAX_SITES
from .hamiltonian import Hamiltonian

BATCH = 2048  # configurations per forward pass of `state_vector`


def sz0_basis(n_sites: int) -> np.ndarray:
    """Sorted integers with n_sites/2 bits set (bit i set: spin i up)."""
    if n_sites > MAX_SITES:
        raise ValueError(f"exact diagonalization is limited to N <= {MAX_SITES}, got N={n_sites}")
    states = [sum(1 << i for i in c) for c in combinations(range(n_sites), n_sites // 2)]
    return np.array(sorted(states), dtype=np.int64)


def configs(states: np.ndarray, n_sites: int) -> np.ndarray:
    """(D, N) +-1 configurations (int8) of basis integers."""
    bits = (states[:, None] >> np.arange(n_sites)) & 1
    return (2 * bits - 1).astype(np.int8)


def sparse_hamiltonian(ham: Hamiltonian) -> tuple[sp.csr_matrix, np.ndarray]:
    """The Hamiltonian (total energy, S.S units) on the Sz=0 basis, and that basis."""
    states = sz0_basis(ham.n_sites)
    s = configs(states, ham.n_sites)
    diag = np.asarray(ham.diagonal(s.astype(np.float64)))
    rows, cols, vals = [np.arange(len(states))], [np.arange(len(states))], [diag]
    for (i, j), w in zip(ham.bonds, ham.off):
        differ = np.nonzero(s[:, i] != s[:, j])[0]
        flipped = states[differ] ^ ((1 << int(i)) | (1 << int(j)))
        rows.append(differ)
        cols.append(np.searchsorted(states, flipped))
        vals.append(np.full(len(differ), w))
    h = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                      shape=(len(states), len(states)))
    return h, states


def start_vector(dim: int) -> np.ndarray:
    """Lanczos start vector: random (fixed seed), so that it overlaps every eigenvector."""
    return np.random.default_rng(0).normal(size=dim)


def lowest_state(h: sp.csr_matrix, n_sites: int) -> tuple[float, np.ndarray]:
    """(lowest eigenvalue per site, its vector) of a sparse Hamiltonian by Lanczos from a random
    start vector (a uniform one is the ferromagnet's Sz = 0 member without the sign rule: an
    eigenvector); for callers that also need the matrix itself."""
    vals, vecs = eigsh(h, k=1, which="SA", tol=1e-12, v0=start_vector(h.shape[0]))
    return float(vals[0]) / n_sites, vecs[:, 0]


def ground_state(ham: Hamiltonian) -> tuple[float, np.ndarray, np.ndarray]:
    """(E0 per site, ground-state vector, basis) (`lowest_state` of `sparse_hamiltonian`)."""
    h, states = sparse_hamiltonian(ham)
    return (*lowest_state(h, ham.n_sites), states)


@lru_cache(maxsize=None)
def _reference_rows() -> tuple[dict, ...]:
    text = resources.files("pipeline").joinpath("data/reference_energies.csv").read_text()
    lines = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    return tuple(csv.DictReader(lines))


def reference_energy(L: int, J2: float) -> tuple[float, bool, str] | None:
    """Best tabulated ground-state energy per site for the J1=1 square J1-J2 model, or None.

    Returns (energy per site, exact?, source). Exact values are preferred over variational ones.
    """
    rows = [r for r in _reference_rows() if int(r["L"]) == L and abs(float(r["J2"]) - J2) < 1e-12]
    if not rows:
        return None
    rows.sort(key=lambda r: (-int(r["exact"]), float(r["energy_per_site"])))
    r = rows[0]
    return float(r["energy_per_site"]), bool(int(r["exact"])), f'{r["method"]}: {r["source"]}'


def apply_exchange(vec: np.ndarray, states: np.ndarray, n_sites: int, i: int, j: int,
                   sign: float) -> np.ndarray:
    """(S_i . S_j) vec on the Sz = 0 basis, with `sign` on the exchange term (the Marshall sign
    between sublattices when the basis is rotated, else 1)."""
    s = configs(states, n_sites)
    out = s[:, i] * s[:, j] / 4 * vec
    differ = np.nonzero(s[:, i] != s[:, j])[0]
    partner = np.searchsorted(states, states[differ] ^ ((1 << i) | (1 << j)))
    out = out.astype(np.result_type(vec, float))
    out[differ] += sign / 2 * vec[partner]
    return out


def correlation_matrix(vec: np.ndarray, states: np.ndarray, n_sites: int,
                       signs: np.ndarray) -> np.ndarray:
    """(N, N) exact <S_i . S_j> of the state `vec` (normalized here); signs as in
    `observables.pair_signs`."""
    v = vec / np.linalg.norm(vec)
    g = np.full((n_sites, n_sites), 0.75)
    for i in range(n_sites):
        for j in range(i + 1, n_sites):
            g[i, j] = g[j, i] = np.vdot(v, apply_exchange(v, states, n_sites, i, j,
                                                          signs[i, j])).real
    return g


def state_vector(logpsi: Callable, states: np.ndarray,
                 n_sites: int) -> Callable[[object], np.ndarray]:
    """params -> the normalized variational state (complex) on the basis `states`. The forward
    pass is compiled once and reused by every call (one shape per batch)."""
    forward = jax.jit(logpsi)
    s = configs(states, n_sites)

    def vector(params) -> np.ndarray:
        lp = np.concatenate([np.asarray(forward(params, s[i:i + BATCH]))
                             for i in range(0, len(s), BATCH)])
        psi = np.exp(lp - lp.real.max())
        return psi / np.linalg.norm(psi)

    return vector


def expectation(h: sp.csr_matrix, psi: np.ndarray, n_sites: int) -> dict[str, float]:
    """Exact energy per site, variance per site and V-score (N Var / E^2, E the total energy) of
    the normalized state `psi` under `h` (`sparse_hamiltonian`): the keys of a Monte Carlo
    measurement (`observables.energy_of`), with zero statistical error."""
    h_psi = h @ psi
    e = float(np.real(np.vdot(psi, h_psi)))
    var = max(float(np.real(np.vdot(h_psi, h_psi))) - e * e, 0.0)
    return {"energy_per_site": e / n_sites, "energy_error": 0.0, "variance_per_site": var / n_sites,
            "v_score": n_sites * var / e ** 2, "n_samples": len(psi)}


def off_sign_rule_weight(vec: np.ndarray) -> float:
    """Weight of a real normalized state on the sign its smaller part carries: with the Marshall
    rotation, how much of it lies off the Marshall sign (global sign aside)."""
    return float(min(np.sum(vec[vec < 0] ** 2), np.sum(vec[vec > 0] ** 2)))


def sign_rule_bound(h: sp.csr_matrix, ground: np.ndarray, n_sites: int) -> tuple[float, np.ndarray]:
    """(energy per site, normalized state) of the best state whose amplitudes all carry the sign
    rule of `h` (`sparse_hamiltonian` with `marshall_sign`: psi >= 0 in the rotated basis): the
    lowest energy any wave function with exactly the Marshall signs can reach, e.g. a network
    whose phases stay at zero. Minimizes the Rayleigh quotient over psi >= 0 (L-BFGS-B, bounds),
    from |ground| (the ground-state vector). Where the ground state's sign differs from the rule
    the minimum mostly sets the amplitude to zero."""
    from scipy.optimize import minimize

    def quotient(x: np.ndarray) -> tuple[float, np.ndarray]:
        hx, n = h @ x, x @ x
        e = x @ hx / n
        return e, 2.0 * (hx - e * x) / n

    res = minimize(quotient, np.abs(ground), jac=True, method="L-BFGS-B",
                   bounds=[(0.0, None)] * len(ground),
                   options={"maxiter": 5000, "gtol": 1e-10, "ftol": 1e-15})
    return float(res.fun) / n_sites, res.x / np.linalg.norm(res.x)
