"""Local energies of the J1-J2 (and Shastry-Sutherland) Heisenberg model in spin-1/2 units.

  E_loc(s) = sum_b J_b s_i s_j / 4  +  sum_{b: s_i != s_j} (J_b / 2) sign_b psi(s^b) / psi(s)

with s_i = +-1, s^b the configuration with the spins of bond b exchanged and sign_b = -1 on the
nearest-neighbour bonds when the Marshall sign rule is on. Only connected configurations (bonds
whose spins differ) are evaluated. They are found on the device, inside `jax.jit`, with a fixed
shape: `jnp.nonzero(mask, size=bucket)`. The only host traffic is one integer per batch (the
number of connected pairs), which sets the bucket: it grows with 10% headroom when a batch needs
more and never shrinks, so after the first steps nothing recompiles. The bucket depends on the
batches a process has seen, so a resumed run may pad differently from the uninterrupted one; it is
a whole number of forward chunks (or the whole range, when one chunk would hold that), so every
connected configuration is evaluated in the same chunk at the same position and the local
energies do not depend on the padding, bit for bit (a forward pass's rounding depends on its
batch size).
"""
from __future__ import annotations

from dataclasses import dataclass, field
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
    buckets: dict = field(default_factory=dict, compare=False, repr=False)  # batch size -> size

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
        """Host-side: (sample index, bond index) of every bond whose spins differ (for tests and
        exact diagonalization)."""
        mask = s[:, self.bonds[:, 0]] != s[:, self.bonds[:, 1]]
        return np.nonzero(mask)

    def bucket(self, n: int, count: int, chunk: int = 0) -> int:
        """Padded number of connected pairs for a batch of n configurations with `count` of them:
        sticky (never shrinks) with 10% headroom, rounded to 1/64 of the whole n x bonds range
        and to whole forward chunks (see the module doc); the whole range when one chunk (or
        `chunk` = 0: one piece) would hold it, so a single forward pass has a fixed shape."""
        whole = n * len(self.J)
        step = min(chunk, whole) if chunk > 0 else whole
        grain, whole = _round_up(max(64, whole // 64), step), _round_up(whole, step)
        size = self.buckets.get(n, 0)
        if count > size:
            size = min(_round_up(int(1.1 * count), grain), whole)
            self.buckets[n] = size
        return size


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


@jax.jit
def _count(s: jax.Array, bonds: jax.Array) -> jax.Array:
    return jnp.sum(s[:, bonds[:, 0]] != s[:, bonds[:, 1]])


def connected_configs(s: jax.Array, bonds: jax.Array, size: int
                      ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(configurations s^b (size, N), sample index, bond index, valid) of the connected (sample,
    bond) pairs of s (C, N), padded to `size`; call inside jit. Padding rows are not valid and
    hold all spins up, a configuration with no connected pair of its own: the local energies of
    these rows (`lanczos.local_pair`) then evaluate nothing for the padding."""
    nb = bonds.shape[0]
    mask = (s[:, bonds[:, 0]] != s[:, bonds[:, 1]]).reshape(-1)
    (flat,) = jnp.nonzero(mask, size=size, fill_value=0)
    valid = jnp.arange(size) < mask.sum()
    sample, bond = flat // nb, flat % nb
    rows = jnp.arange(size)
    sp = s[sample]
    sp = sp.at[rows, bonds[bond, 0]].multiply(-1).at[rows, bonds[bond, 1]].multiply(-1)
    return jnp.where(valid[:, None], sp, jnp.ones_like(sp)), sample, bond, valid


@partial(jax.jit, static_argnames=("logpsi", "size", "chunk"))
def _local(logpsi: LogPsi, params, s: jax.Array, logpsi_s: jax.Array, bonds: jax.Array,
           J: jax.Array, off: jax.Array, size: int, chunk: int) -> jax.Array:
    """Diagonal part plus sum over connected (sample, bond) pairs of off * psi(s^b)/psi(s)."""
    sp, sample, bond, valid = connected_configs(s, bonds, size)
    lp = apply_chunked(logpsi, params, sp, chunk, jnp.sum(valid))
    contrib = jnp.where(valid, off[bond] * jnp.exp(lp - logpsi_s[sample]), 0.0)
    si, sj = s[:, bonds[:, 0]], s[:, bonds[:, 1]]
    diag = (si.astype(jnp.float64) * sj.astype(jnp.float64)) @ J / 4
    return diag + jax.ops.segment_sum(contrib, sample, num_segments=s.shape[0])


def local_energies_traced(ham: Hamiltonian, logpsi: LogPsi, params, s: jax.Array,
                          logpsi_s: jax.Array, chunk: int = 0) -> jax.Array:
    """`local_energies` inside a traced function: every (sample, bond) pair is padded in (a fixed
    shape, no host-side count), at the price of evaluating the aligned pairs too."""
    return _local(logpsi, params, s, logpsi_s, jnp.asarray(ham.bonds), jnp.asarray(ham.J),
                  jnp.asarray(ham.off), s.shape[0] * len(ham.J), chunk)


def apply_chunked(logpsi: LogPsi, params, s: jax.Array, chunk: int,
                  used: jax.Array | None = None) -> jax.Array:
    """log psi of a batch, evaluated `chunk` configurations at a time (0: all at once).

    used (traced, optional): only the first `used` rows matter (the rest is padding), so only
    the chunks that hold them are evaluated and the padding rows come back as 0. A padded batch
    (the connected configurations in their sticky bucket, some 10% larger than needed) then
    costs what its rows cost. Each chunk is computed as the same vmapped program at the same
    offset either way, so the rows that are evaluated come out bit for bit the same.
    """
    n = s.shape[0]
    if chunk <= 0 or n < chunk:
        return logpsi(params, s)
    row = lambda x: logpsi(params, x[None])[0]  # noqa: E731
    if used is None or n % chunk:
        return jax.lax.map(row, s, batch_size=chunk)
    one = jax.vmap(row)

    def body(k: jax.Array, out: jax.Array) -> jax.Array:
        rows = jax.lax.dynamic_slice_in_dim(s, k * chunk, chunk)
        return jax.lax.dynamic_update_slice_in_dim(out, one(rows), k * chunk, 0)

    out = jnp.zeros(n, jax.eval_shape(one, s[:chunk]).dtype)
    return jax.lax.fori_loop(0, (used + chunk - 1) // chunk, body, out)


def local_energies(ham: Hamiltonian, logpsi: LogPsi, params, s: jax.Array,
                   logpsi_s: jax.Array, chunk: int = 0) -> jax.Array:
    """Complex local energies (total, not per site) of a batch of configurations s (C, N)."""
    bonds = jnp.asarray(ham.bonds)
    size = ham.bucket(s.shape[0], int(_count(s, bonds)), chunk)
    return _local(logpsi, params, s, logpsi_s, bonds, jnp.asarray(ham.J), jnp.asarray(ham.off),
                  size, chunk)
