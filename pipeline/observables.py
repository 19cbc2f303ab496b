"""Measurements of a variational state on fresh samples: the energy, and spin-spin and dimer-dimer
correlations with their local estimators (S.S units, spin 1/2).

Every measurement first discards burn-in sweeps under the parameters being measured (the chains
were equilibrated for earlier parameters, or for the unprojected state).

For a sample s and sites i != j,
  (S_i.S_j)_loc(s) = s_i s_j / 4 + [s_i != s_j] (sign_ij / 2) psi(s^{ij}) / psi(s),
with s^{ij} the configuration with spins i and j exchanged and sign_ij = -1 between the two
sublattices when the Marshall sign rule is on (the network's amplitudes are in the rotated basis,
exactly as in the local energy). In the Sz = 0 sector every sample has exactly (N/2)^2 exchanges
with s_i != s_j (each up spin with each down spin), so the whole N x N matrix costs a fixed
(N/2)^2 forward passes per sample: no padding, no recompilation.

Conventions (the layout of /measurements in results.h5):
  correlation[dx, dy]       C(r) = (1/N) sum_i <S_i . S_{i+r}>, r = (dx, dy); C(0) = 3/4
  correlation_zz[dx, dy]    the same for S^z_i S^z_{i+r}; sum_r of it is 0 in the Sz = 0 sector
  structure_factor[kx, ky]  S(q) = (1/N) sum_ij e^{i q.(r_i - r_j)} <S_i . S_j> = sum_r cos(q.r) C(r),
                            q = 2 pi (kx, ky) / L
  dimer_correlation[dx, dy] <B_b B_{b+r}> - <B>^2 for the bonds B_b = S_i . S_{i+(1,0)} along x,
                            averaged over the b^2 bonds that start in the first patch (the ViT and
                            its projections are exactly invariant under whole-patch translations,
                            so this is the translation average in expectation)
Local values are real parts (the imaginary parts average to zero for these Hermitian operators).
"""
from __future__ import annotations

import time
from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from . import backend, dist  # noqa: F401  (backend: device pinning, float64)
from .hamiltonian import apply_chunked
from .lattice import Lattice
from .sampler import FINAL, FINAL_BURN_IN, Samples
from .state import VariationalState
from .stats import mean_and_error

LogPsi = Callable[[object, jax.Array], jax.Array]


def pair_signs(lattice: Lattice, marshall_sign: bool) -> np.ndarray:
    """(N, N) sign of the exchange term between sites i and j in the network's basis."""
    sub = lattice.sublattice_sign
    if not marshall_sign:
        return np.ones((lattice.n_sites, lattice.n_sites))
    return np.where(sub[:, None] != sub[None, :], -1.0, 1.0)


def displaced(lattice: Lattice) -> np.ndarray:
    """(L*L, N) site index of i + r for displacement r = dx * L + dy."""
    x, y = lattice.coords.T
    L = lattice.L
    dx, dy = np.divmod(np.arange(L * L), L)
    return lattice.site(x[None, :] + dx[:, None], y[None, :] + dy[:, None]).astype(np.int32)


def _exchange(s: jax.Array, i: jax.Array, j: jax.Array) -> jax.Array:
    """s with the spins at sites i and j exchanged (batched over leading axes of i, j)."""
    si, sj = jnp.take(s, i), jnp.take(s, j)
    onehot = lambda k: jax.nn.one_hot(k, s.shape[-1], dtype=s.dtype)  # noqa: E731
    return s + (sj - si)[..., None] * onehot(i) + (si - sj)[..., None] * onehot(j)


@partial(jax.jit, static_argnames=("logpsi", "chunk"))
def spin_matrix(logpsi: LogPsi, params, s: jax.Array, logpsi_s: jax.Array, signs: jax.Array,
                chunk: int) -> jax.Array:
    """(B, N, N) local values of S_i . S_j for the samples s (B, N) with Sz = 0."""
    B, N = s.shape
    half = N // 2
    order = jnp.argsort(-s, axis=1, stable=True)
    up, down = order[:, :half], order[:, half:]  # (B, N/2) each
    u = jnp.broadcast_to(up[:, :, None], (B, half, half))
    d = jnp.broadcast_to(down[:, None, :], (B, half, half))
    moved = jax.vmap(_exchange)(s, u.reshape(B, -1), d.reshape(B, -1))  # (B, N^2/4, N)
    lp = apply_chunked(logpsi, params, moved.reshape(-1, N), chunk).reshape(B, -1)
    ratio = jnp.exp(lp - logpsi_s[:, None]).real
    rows = jnp.arange(B)[:, None]
    off = jnp.zeros((B, N, N)).at[rows, u.reshape(B, -1), d.reshape(B, -1)].set(ratio)
    off = (off + jnp.swapaxes(off, 1, 2)) * signs / 2
    sf = s.astype(jnp.float64)
    zz = sf[:, :, None] * sf[:, None, :] / 4
    return jnp.where(jnp.eye(N, dtype=bool), 0.75, zz + off)


@jax.jit
def correlation(matrix: jax.Array, shift: jax.Array) -> jax.Array:
    """(B, L*L) translation average C(r) = (1/N) sum_i M[i, i+r] of per-sample (B, N, N) matrices."""
    N = matrix.shape[-1]
    return jnp.take_along_axis(matrix, jnp.broadcast_to(shift.T[None], (matrix.shape[0], N,
                                                                           shift.shape[0])),
                               axis=2).mean(axis=1)


def structure_factor(corr: jax.Array, L: int) -> jax.Array:
    """S(q) on the L x L grid from C(r) (..., L, L): sum_r cos(q.r) C(r) (C is even in r)."""
    return jnp.fft.fft2(corr, axes=(-2, -1)).real


@partial(jax.jit, static_argnames=("logpsi", "chunk"))
def bond_products(logpsi: LogPsi, params, s: jax.Array, logpsi_s: jax.Array, ref: jax.Array,
                  bonds: jax.Array, signs: jax.Array, chunk: int) -> jax.Array:
    """(B, R, M) local values of B_a B_c for reference bonds a (R, 2) and bonds c (M, 2), with
    B = S_i . S_j: sum over t in {s, X_a s}, u in {t, X_c t} of <s|B_a|t><t|B_c|u> psi(u)/psi(s)."""
    B, N = s.shape
    R, M = ref.shape[0], bonds.shape[0]

    def diag(x, b):  # (..., N), (K, 2) -> (..., K)
        return x[..., b[:, 0]].astype(jnp.float64) * x[..., b[:, 1]] / 4

    def hop(x, b):
        return jnp.where(x[..., b[:, 0]] != x[..., b[:, 1]], signs[b[:, 0], b[:, 1]] / 2, 0.0)

    def one(x, lp0):
        xa = jax.vmap(lambda a: _exchange(x, a[0], a[1]))(ref)  # (R, N)
        xc = jax.vmap(lambda c: _exchange(x, c[0], c[1]))(bonds)  # (M, N)
        xac = jax.vmap(lambda y: jax.vmap(lambda c: _exchange(y, c[0], c[1]))(bonds))(xa)  # (R, M, N)
        return xa, xc, xac

    xa, xc, xac = jax.vmap(one, in_axes=(0, None))(s, None)
    lp = lambda y: apply_chunked(logpsi, params, y.reshape(-1, N), chunk)  # noqa: E731
    r_a = jnp.exp(lp(xa).reshape(B, R) - logpsi_s[:, None]).real
    r_c = jnp.exp(lp(xc).reshape(B, M) - logpsi_s[:, None]).real
    r_ac = jnp.exp(lp(xac).reshape(B, R, M) - logpsi_s[:, None, None]).real
    d_a, h_a = diag(s, ref), hop(s, ref)  # (B, R)
    d_c, h_c = diag(s, bonds), hop(s, bonds)  # (B, M)
    d_c_a, h_c_a = diag(xa, bonds), hop(xa, bonds)  # (B, R, M)
    stay = d_a[:, :, None] * (d_c[:, None, :] + (h_c * r_c)[:, None, :])
    moved = h_a[:, :, None] * (d_c_a * r_a[:, :, None] + h_c_a * r_ac)
    return stay + moved


def x_bonds(lattice: Lattice) -> np.ndarray:
    """(N, 2) bonds (i, i + (1, 0)), one per site, in site order."""
    x, y = lattice.coords.T
    return np.stack([np.arange(lattice.n_sites), lattice.site(x + 1, y)], axis=1).astype(np.int32)


def x_bond_starts(lattice: Lattice) -> np.ndarray:
    """Sites of the first patch: the starts of the reference bonds of the dimer correlation."""
    return lattice.patch_sites[0]


# ---- measurements on a variational state --------------------------------------------------------
def fresh_samples(vstate: VariationalState, n_samples: int, step: int,
                  burn_in: int | None = None) -> tuple[VariationalState, Samples, int]:
    """(state, samples, samples per chain): `burn_in` sweeps (default sampler.n_thermalize) under
    these parameters are discarded first."""
    n_per_chain = n_samples // vstate.system.cfg.sampler.n_chains
    vs, smp = burned_in(vstate, step, burn_in).sample(n_per_chain, FINAL, step)
    return vs, smp, n_per_chain


def burned_in(vstate: VariationalState, step: int, sweeps: int | None = None) -> VariationalState:
    """The state after `sweeps` (default sampler.n_thermalize) discarded sweeps of every chain
    under these parameters (and this projection): the burn-in before a measurement."""
    burn = vstate.system.cfg.sampler.n_thermalize if sweeps is None else sweeps
    return vstate.thermalize(burn, FINAL_BURN_IN, step)


def energy_of(vs: VariationalState, smp: Samples, n_per_chain: int) -> dict[str, float]:
    """Energy per site (S.S units) with error, variance, V-score, R-hat and acceptance."""
    return _energy_summary(vs, vs.local_energies(smp), n_per_chain, vs.acceptance(smp))


def _energy_summary(vs: VariationalState, e_loc: jax.Array, n_per_chain: int,
                    acceptance: float) -> dict[str, float]:
    st = vs.statistics(e_loc, n_per_chain)
    N = vs.system.n_sites
    mean = float(st.mean.real)
    return {"energy_per_site": mean / N, "energy_error": float(st.error) / N,
            "energy_imag": float(st.mean.imag) / N, "variance_per_site": float(st.variance) / N,
            "v_score": N * float(st.variance) / mean ** 2, "r_hat": float(st.r_hat),
            "acceptance": acceptance, "n_samples": n_per_chain * vs.system.cfg.sampler.n_chains}


def draw_within(vstate: VariationalState, step: int, burn_in: int, block: int, most: int,
                until: float, safety: float,
                evaluate: Callable[[VariationalState, Samples], jax.Array],
                purposes: tuple[int, int] = (FINAL_BURN_IN, FINAL)
                ) -> tuple[VariationalState, list[jax.Array], float]:
    """Fresh samples evaluated inside a time budget: after `burn_in` discarded sweeps (rounded up
    to whole blocks), samples are drawn `block` sweeps of every chain at a time, each block with
    its own random streams, and `evaluate(state, samples)` is applied to each block, until
    `most` samples or until the next block, at the last one's cost times `safety`, would end
    after `until` (a time.perf_counter() value). The first block is always drawn: it pays any
    compilation, so its cost over-estimates the next. Stopping on the clock does not bias the
    estimates (it depends on the clock, not on the values); rank 0's clock decides for every
    rank. `purposes`: the random streams of the burn-in and of the samples. Returns the state,
    the evaluated values block by block (sample-major) and the acceptance of the blocks."""
    C = vstate.system.cfg.sampler.n_chains
    vs = vstate
    for k in range(-(-burn_in // block)):  # the burn-in in blocks too: one sampler to compile
        vs, _ = vs.sample(block, purposes[0], step, k)
    values: list[jax.Array] = []
    accepted, proposed = 0, 0
    while True:
        t0 = time.perf_counter()
        vs, smp = vs.sample(block, purposes[1], step, len(values))
        values.append(jax.block_until_ready(evaluate(vs, smp)))
        accepted, proposed = accepted + smp.accepted, proposed + smp.proposed
        now = time.perf_counter()
        full = (len(values) + 1) * block * C > most
        if dist.bcast_object(full or now + safety * (now - t0) > until):
            break
    return vs, values, VariationalState.acceptance(smp._replace(accepted=accepted,
                                                                proposed=proposed))


def energy_within(vstate: VariationalState, step: int, burn_in: int, block: int, most: int,
                  until: float, safety: float) -> dict[str, float]:
    """The energy (as `energy_of`) inside a time budget (`draw_within`, one block at a time).
    A `block` equal to the training steps' sweeps reuses their compiled sampler and local
    energies."""
    vs, energies, acceptance = draw_within(vstate, step, burn_in, block, most, until, safety,
                                           lambda v, smp: v.local_energies(smp))
    return _energy_summary(vs, jnp.concatenate(energies), len(energies) * block, acceptance)


def energy(vstate: VariationalState, n_samples: int, step: int) -> dict[str, float]:
    """The final measurement of a run: energy_of on `n_samples` fresh samples."""
    vs, smp, n_per_chain = fresh_samples(vstate, n_samples, step)
    return energy_of(vs, smp, n_per_chain) | {"step": step}


@partial(jax.jit, static_argnums=(1, 2))
def _stats(values: jax.Array, n_per_chain: int, n_chains_total: int):
    return mean_and_error(values, n_per_chain, n_chains_total)


def _block(n: int, target: int) -> int:
    """The largest divisor of n that is at most target (samples per evaluation block)."""
    return max(b for b in range(1, min(n, max(target, 1)) + 1) if n % b == 0)


def correlations(vs: VariationalState, smp: Samples, n_per_chain: int,
                 chunk: int) -> dict[str, np.ndarray | float]:
    """C(r), C_zz(r), S(q) and the x-bond dimer correlation with their errors (see the module
    doc), and for the Shastry-Sutherland lattice the singlet weight 1/4 - <S_i.S_j> on its dimers.
    Samples are evaluated in blocks of about `chunk` / (N/2)^2, so that one block's exchanged
    configurations are about one forward chunk (`System.chunk`) and memory stays bounded."""
    sys = vs.system
    lat, N, L = sys.lattice, sys.n_sites, sys.lattice.L
    signs = jnp.asarray(pair_signs(lat, sys.cfg.hamiltonian.marshall_sign))
    shift = displaced(lat)
    bonds, starts = x_bonds(lat), x_bond_starts(lat)
    ref = jnp.asarray(bonds[starts])
    shift_ref = jnp.asarray(shift[:, starts])  # (L*L, R): start of the bond at ref + r
    dimers = lat.bonds2 if lat.kind == "shastry_sutherland" else None
    block = _block(smp.s.shape[0], max(1, chunk // (N * N // 4)))
    per_sample: dict[str, list] = {"correlation": [], "correlation_zz": [], "bond_product": [],
                                   "singlet": []}
    for k in range(0, smp.s.shape[0], block):
        s, lp = smp.s[k:k + block], smp.logpsi[k:k + block]
        m = spin_matrix(sys.logpsi, vs.params, s, lp, signs, chunk)
        per_sample["correlation"].append(correlation(m, jnp.asarray(shift)))
        sf = s.astype(jnp.float64)
        zz = sf[:, :, None] * sf[:, None, :] / 4
        per_sample["correlation_zz"].append(correlation(zz, jnp.asarray(shift)))
        prod = bond_products(sys.logpsi, vs.params, s, lp, ref, jnp.asarray(bonds), signs, chunk)
        per_sample["bond_product"].append(jnp.mean(jnp.take_along_axis(
            prod, jnp.broadcast_to(shift_ref.T[None], (s.shape[0],) + shift_ref.T.shape), axis=2),
            axis=1))
        if dimers is not None:
            per_sample["singlet"].append(0.25 - m[:, dimers[:, 0], dimers[:, 1]].mean(axis=1))
    C = sys.cfg.sampler.n_chains
    out: dict[str, np.ndarray | float] = {}
    values = {k: jnp.concatenate(v) for k, v in per_sample.items() if v}
    values["structure_factor"] = structure_factor(
        values["correlation"].reshape(-1, L, L), L).reshape(-1, L * L)
    for name, v in values.items():
        mean, err = _stats(v, n_per_chain, C)
        out[name], out[name + "_error"] = np.asarray(mean), np.asarray(err)
    x_bond = float(out["correlation"][L])  # C at r = (1, 0): <B>
    out["dimer_correlation"] = (out.pop("bond_product") - x_bond ** 2).reshape(L, L)
    out["dimer_correlation_error"] = out.pop("bond_product_error").reshape(L, L)
    for name in ("correlation", "correlation_zz", "structure_factor"):
        out[name] = out[name].reshape(L, L)
        out[name + "_error"] = out[name + "_error"].reshape(L, L)
    out.pop("correlation_zz_error")
    if "singlet" in out:
        out["singlet_weight"] = float(out.pop("singlet"))
        out["singlet_weight_error"] = float(out.pop("singlet_error"))
    return out
