"""Symmetry projection psi_sym(s) = sum_g psi(g s) (trivial representation: amplitudes summed).

The ViT is exactly invariant only under translations by whole patches; projecting over the b^2
intra-patch translations ('translations') or additionally over C4v and the global spin flip
('full') restores the rest of the square lattice's symmetry.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from .. import backend  # noqa: F401  (device pinning, float64)
from ..lattice import Lattice


def group(lattice: Lattice, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """(G, N) site permutations and (G,) spin-flip signs of the projection group."""
    b = lattice.patch
    perms = [lattice.translation(dx, dy) for dx in range(b) for dy in range(b)]
    flips = [1]
    if mode == "full":
        perms = [t[r] for t in perms for r in lattice.point_group()]
        flips = [1, -1]
    if mode == "none":
        perms = perms[:1]
    perm = np.array([p for p in perms for _ in flips], dtype=np.int32)
    sign = np.array([f for _ in perms for f in flips], dtype=np.int8)
    return perm, sign


def project(logpsi: Callable, perm: np.ndarray, sign: np.ndarray) -> Callable:
    """log of sum_g psi(g s), as a complex log-sum-exp over the group images."""
    if len(perm) == 1:
        return logpsi

    def projected(params, s: jax.Array) -> jax.Array:
        images = s[..., perm] * sign[:, None].astype(s.dtype)  # (..., G, N)
        lp = logpsi(params, images)  # (..., G)
        m = jnp.max(lp.real, axis=-1, keepdims=True)
        return m[..., 0] + jnp.log(jnp.sum(jnp.exp(lp - m), axis=-1)) - np.log(len(perm))

    return projected
