"""Local energies of the J1-J2 (and Shastry-Sutherland) Heisenberg model in spin-1/2 units.

  E_loc(s) = sum_b J_b s_i s_j / 4  +  sum_{b: s_i != s_j} (J_b / 2) sign_b psi(s^b) / psi(s)

with s_i = +-1, s^b the configuration with the spins of bond b exchanged and sign_b = -1 on the
nearest-neighbour bonds when the Marshall sign rule is on. Only connected configurations (bonds
whose spins differ) are evaluated: their indices are gathered on the host and padded to a coarse
bucket so that the jitted evaluation recompiles only a handful of times.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from . import backend  # noqa: F401  (device pinning, float64)
from .lattice import Lattice

LogPsi = Callable[[object, jax.Array], jax.Array]


@dataclass(frozen=True, eq=False)
class Hamiltonian:
    """Bonds with their couplings. `off` is the off-diagonal factor J/2 * (Marshall sign)."""

    bonds: np.ndarray
    J: np.ndarray
    off: np.ndarray
    n_sites: int

    @classmethod
    def build(cls, lattice: Lattice, J1: float, J2: float, marshall_sign: bool) -> "Hamiltonian":
        """J1 on the nearest-neighbour bonds, J2 on the second family (diagonals or dimers)."""
        b1, b2 = lattice.bonds1, lattice.bonds2
        bonds = np.concatenate([b1, b2]).astype(np.int32)
        J = np.concatenate([np.full(len(b1), J1), np.full(len(b2), J2)]).astype(np.float64)
        sign = np.ones(len(bonds))
        if marshall_sign:
            sub = lattice.sublattice_sign
            # Only bonds between the two sublattices change sign (all J1 bonds on the square).
            sign = np.where(sub[bonds[:, 0]] != sub[bonds[:, 1]], -1.0, 1.0)
        keep = J != 0
        return cls(bonds[keep], J[keep], (J * sign / 2)[keep], lattice.n_sites)

    def diagonal(self, s: jax.Array) -> jax.Array:
        """Ising part sum_b J_b s_i s_j / 4 for a batch (..., N) of +-1 configurations."""
        s = s.astype(jnp.float64)
        return (s[..., self.bonds[:, 0]] * s[..., self.bonds[:, 1]]) @ self.J / 4

    def connected(self, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Host-side: (sample index, bond index) of every bond whose spins differ."""
        mask = s[:, self.bonds[:, 0]] != s[:, self.bonds[:, 1]]
        return np.nonzero(mask)


def _bucket(k: int, granularity: int) -> int:
    return max(granularity, -(-k // granularity) * granularity)


@partial(jax.jit, static_argnames=("logpsi", "chunk"))
def _offdiag(logpsi: LogPsi, params, s: jax.Array, logpsi_s: jax.Array, sample: jax.Array,
             bond_i: jax.Array, bond_j: jax.Array, weight: jax.Array, chunk: int) -> jax.Array:
    """sum over connected (sample, bond) pairs of weight * psi(s^b)/psi(s), per sample."""
    rows = jnp.arange(sample.shape[0])
    sp = s[sample]
    sp = sp.at[rows, bond_i].multiply(-1).at[rows, bond_j].multiply(-1)
    lp = apply_chunked(logpsi, params, sp, chunk)
    ratio = jnp.exp(lp - logpsi_s[sample])
    contrib = jnp.where(weight != 0, weight * ratio, 0.0)
    return jax.ops.segment_sum(contrib, sample, num_segments=s.shape[0])


def apply_chunked(logpsi: LogPsi, params, s: jax.Array, chunk: int) -> jax.Array:
    """log psi of a batch, evaluated `chunk` configurations at a time (0: all at once)."""
    if chunk <= 0 or s.shape[0] <= chunk:
        return logpsi(params, s)
    return jax.lax.map(lambda x: logpsi(params, x[None])[0], s, batch_size=chunk)


def local_energies(ham: Hamiltonian, logpsi: LogPsi, params, s: jax.Array,
                   logpsi_s: jax.Array, chunk: int = 0) -> jax.Array:
    """Complex local energies (total, not per site) of a batch of configurations s (C, N)."""
    s_host = np.asarray(s)
    sample, bond = ham.connected(s_host)
    k = len(sample)
    kb = _bucket(k, max(64, (s_host.shape[0] * len(ham.J)) // 16))
    pad = kb - k
    sample = np.concatenate([sample, np.zeros(pad, np.int64)]).astype(np.int32)
    bond = np.concatenate([bond, np.zeros(pad, np.int64)])
    weight = np.concatenate([ham.off[bond[:k]], np.zeros(pad)])
    off = _offdiag(logpsi, params, s, logpsi_s, jnp.asarray(sample),
                   jnp.asarray(ham.bonds[bond, 0]), jnp.asarray(ham.bonds[bond, 1]),
                   jnp.asarray(weight), chunk)
    return ham.diagonal(s) + off
