"""Geometry of the L x L periodic square lattice: sites, bonds, patches and symmetry maps.

Sites are numbered i = x * L + y. Everything here is plain numpy: it is built once per run.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Lattice:
    """An L x L periodic lattice cut into b x b patches, with its two bond families (the values
    are checked by `config.validate`).

    `bonds1` are the nearest-neighbour bonds (coupling J1). `bonds2` are the second family: the
    diagonal next-nearest neighbours (J2) for `square`, or the orthogonal dimers (J') for
    `shastry_sutherland`. Each bond is listed once as (i, j) with i != j.
    """

    L: int
    patch: int
    kind: str = "square"

    @property
    def n_sites(self) -> int:
        return self.L * self.L

    def site(self, x: np.ndarray | int, y: np.ndarray | int) -> np.ndarray:
        """Site index of (x, y), periodic."""
        return (np.asarray(x) % self.L) * self.L + (np.asarray(y) % self.L)

    @property
    def coords(self) -> np.ndarray:
        """(N, 2) array of (x, y) per site."""
        x, y = np.divmod(np.arange(self.n_sites), self.L)
        return np.stack([x, y], axis=1)

    def _unique(self, pairs: list[tuple[int, int]]) -> np.ndarray:
        """Drop duplicate bonds (small periodic lattices wrap onto themselves) and self-bonds."""
        seen, out = set(), []
        for i, j in pairs:
            key = (min(i, j), max(i, j))
            if i != j and key not in seen:
                seen.add(key)
                out.append(key)
        return np.array(out, dtype=np.int32).reshape(-1, 2)

    @property
    def bonds1(self) -> np.ndarray:
        x, y = self.coords.T
        pairs = [(int(i), int(j)) for dx, dy in ((1, 0), (0, 1))
                 for i, j in zip(self.site(x, y), self.site(x + dx, y + dy))]
        return self._unique(pairs)

    @property
    def bonds2(self) -> np.ndarray:
        x, y = self.coords.T
        if self.kind == "square":
            pairs = [(int(i), int(j)) for dx, dy in ((1, 1), (1, -1))
                     for i, j in zip(self.site(x, y), self.site(x + dx, y + dy))]
            return self._unique(pairs)
        # Shastry-Sutherland: diagonal dimer on plaquettes with (x, y) both even, anti-diagonal on
        # plaquettes with both odd: every site sits in exactly one dimer, neighbouring dimers are
        # orthogonal.
        pairs = []
        for px, py in self.coords:
            if px % 2 == 0 and py % 2 == 0:
                pairs.append((int(self.site(px, py)), int(self.site(px + 1, py + 1))))
            elif px % 2 == 1 and py % 2 == 1:
                pairs.append((int(self.site(px + 1, py)), int(self.site(px, py + 1))))
        return self._unique(pairs)

    @property
    def sublattice_sign(self) -> np.ndarray:
        """+1 on sublattice A ((x + y) even), -1 on B: the Marshall sign rule's bipartition."""
        x, y = self.coords.T
        return np.where((x + y) % 2 == 0, 1, -1).astype(np.int8)

    # ---- patches ---------------------------------------------------------------------------
    @property
    def n_patches(self) -> int:
        return (self.L // self.patch) ** 2

    @property
    def patch_sites(self) -> np.ndarray:
        """(n_patches, b*b) site indices: patch p = px * (L/b) + py, sites row-major inside."""
        b, m = self.patch, self.L // self.patch
        px, py, ix, iy = np.meshgrid(np.arange(m), np.arange(m), np.arange(b), np.arange(b),
                                     indexing="ij")
        return self.site(px * b + ix, py * b + iy).reshape(m * m, b * b).astype(np.int32)

    @property
    def patch_displacement(self) -> np.ndarray:
        """(n, n) index of the periodic displacement r_i - r_j between patches on the patch grid."""
        m = self.L // self.patch
        p = np.arange(m * m)
        px, py = np.divmod(p, m)
        dx = (px[:, None] - px[None, :]) % m
        dy = (py[:, None] - py[None, :]) % m
        return (dx * m + dy).astype(np.int32)

    # ---- symmetry maps (site permutations: (g s)_i = s_{perm[i]}) ---------------------------
    def translation(self, dx: int, dy: int) -> np.ndarray:
        x, y = self.coords.T
        return self.site(x - dx, y - dy).astype(np.int32)

    def point_group(self) -> list[np.ndarray]:
        """The 8 elements of C4v about the origin, as site permutations."""
        x, y = self.coords.T
        maps = [(x, y), (-y, x), (-x, -y), (y, -x), (y, x), (-x, y), (x, -y), (-y, -x)]
        return [self.site(a, b).astype(np.int32) for a, b in maps]
