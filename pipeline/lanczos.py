"""One Lanczos step on a trained state: psi_1 = psi + a (H - h1) psi at (an estimate of) its best
a, a better variational state than psi at no training cost, and its energy.

With the moments h_k = <psi|H^k|psi> / <psi|psi> and m2 = h2 - h1^2, m3 = h3 - 3 h1 h2 + 2 h1^3,
H in the orthonormal pair psi, (H - h1) psi / sqrt(m2) is [[h1, sqrt(m2)], [sqrt(m2), h1 + m3/m2]];
its lower eigenvector gives the best a and its eigenvalue the best energy (`step`).

Sampled (`lanczos_within`), the local values e1(s) = (H psi)(s) / psi(s) (the local energy) and
e2(s) = (H^2 psi)(s) / psi(s) = sum_t H_st psi(t) e1(t) / psi(s) give the Rayleigh-Ritz problem in
that pair. Sampled from |psi|^2 they have heavy tails (|psi(t) / psi(s)|^2 at configurations s
of small amplitude: on a trained 4x4 state the moments' estimate of the step's energy got worse
from 1024 to 2048 samples, and the a they chose raised the energy), so the samples come from the
guiding distribution
  p(s) ~ |psi(s)|^2 + b |((H - h1) psi)(s)|^2 = |psi(s)|^2 (1 + b |e1(s) - h1|^2),   b = 1 / m2,
which covers both basis states, with weights w = |psi|^2 / p = 1 / (1 + b |e1 - h1|^2) <= 1. h1
and m2 come from the caller's measurement of psi's energy and variance. For psi_1 = psi + a u,
u = (H - h1) psi, f = psi_1 / psi = 1 + a (e1 - h1) and g = (H psi_1) / psi = e1 + a (e2 - h1 e1),
the energy <w Re conj(f) g> / <w |f|^2> and variance <w |g - E f|^2> / <w |f|^2> are quadratic
in a over ten weighted means (`_values`), and the same means give the 2 x 2 generalized
eigenproblem in {psi, u} whose lower vector is the best a (`fit_a`). Every sample serves both,
by cross-fitting: the guided chains fall in two halves (even and odd global index); the a
fitted on one half is measured on the other, and the result is the mean of the two energies
(and variances), each that of a state psi_1 chosen without its measuring samples, so it is
variational; minimizing on the samples that measure would bias it low. Errors: the jackknife
over chains of that whole function (bias-corrected; it accounts for the correlation along a
chain and for the noise of both fits). Any a gives a variational energy, so the noise of the
fits costs accuracy, never correctness.
Cost: e2 needs the local energy of every configuration connected to a sample (some 80^2 forward
passes per sample on 6x6), and every Metropolis proposal under p a local energy (one forward pass
per bond). The guided chains are therefore a subset (STEP_CHAINS), for rank-count independence
those whose global index is a multiple of C / STEP_CHAINS, started from the chains of |psi|^2.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
import scipy.sparse as sp

from . import dist, exact as exact_sums
from .hamiltonian import (Hamiltonian, _count, apply_chunked, connected_configs, local_energies,
                          local_energies_traced)
from .observables import draw_within
from .sampler import LANCZOS_BURN_IN, LANCZOS_STEP, Samples
from .state import VariationalState
from .system import make_sampler

LogPsi = Callable[[object, jax.Array], jax.Array]
STEP_CHAINS = 64  # chains under the guiding distribution (all of them when they do not divide)


def step(h1: float, h2: float, h3: float) -> tuple[float, float]:
    """(energy, a) of the best psi + a (H - h1) psi from the moments of a normalized psi."""
    m2 = h2 - h1 * h1
    if m2 <= 0.0:  # an eigenstate (or round-off around one): the step cannot move it
        return h1, 0.0
    m3 = h3 - 3 * h1 * h2 + 2 * h1 ** 3
    r = np.sqrt(m2)
    vals, vecs = np.linalg.eigh(np.array([[h1, r], [r, h1 + m3 / m2]]))
    return float(vals[0]), float(vecs[1, 0] / (vecs[0, 0] * r))


def exact(h: sp.csr_matrix, psi: np.ndarray, n_sites: int) -> dict[str, float]:
    """The best step on the normalized state `psi` under the sparse Hamiltonian `h`
    (`exact.sparse_hamiltonian`): exact moments, then psi_1 built and measured exactly
    (`exact.expectation`: energy, variance, V-score), plus `alpha` (a) and `shift` (h1)."""
    h_psi = h @ psi
    h1 = np.vdot(psi, h_psi).real
    _, a = step(h1, np.vdot(h_psi, h_psi).real, np.vdot(h_psi, h @ h_psi).real)
    psi1 = psi + a * (h_psi - h1 * psi)
    return exact_sums.expectation(h, psi1 / np.linalg.norm(psi1), n_sites) | {"alpha": a,
                                                                              "shift": h1}


# ---- local values ------------------------------------------------------------------------------
@partial(jax.jit, static_argnames=("logpsi", "size", "chunk"))
def _neighbours(logpsi: LogPsi, params, s: jax.Array, bonds: jax.Array, size: int, chunk: int):
    t, sample, bond, valid = connected_configs(s, bonds, size)
    return t, apply_chunked(logpsi, params, t, chunk, jnp.sum(valid)), sample, bond, valid


@jax.jit
def _e1_e2(ham_diag: jax.Array, logpsi_s: jax.Array, lp_t: jax.Array, e_t: jax.Array,
           sample: jax.Array, off: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    n = logpsi_s.shape[0]
    w = jnp.where(valid, off * jnp.exp(lp_t - logpsi_s[sample]), 0.0)  # H_st psi(t) / psi(s)
    e1 = ham_diag + jax.ops.segment_sum(w, sample, num_segments=n)
    return e1, ham_diag * e1 + jax.ops.segment_sum(w * e_t, sample, num_segments=n)


def local_pair(ham: Hamiltonian, logpsi: LogPsi, params, s: jax.Array, logpsi_s: jax.Array,
               chunk: int = 0) -> tuple[jax.Array, jax.Array]:
    """(e1, e2) = ((H psi)(s) / psi(s), (H^2 psi)(s) / psi(s)) for configurations s (n, N) with
    log psi `logpsi_s`: the local energies of all their connected configurations."""
    bonds = jnp.asarray(ham.bonds)
    size = ham.bucket(s.shape[0], int(_count(s, bonds)), chunk)
    t, lp_t, sample, bond, valid = _neighbours(logpsi, params, s, bonds, size, chunk)
    e_t = local_energies(ham, logpsi, params, t, lp_t, chunk)
    return _e1_e2(ham.diagonal(s), logpsi_s, lp_t, e_t, sample, jnp.asarray(ham.off)[bond], valid)


@dataclass(frozen=True, eq=False)
class GuidedAmplitude:
    """log sqrt(p) = log psi + log(1 + b |e1 - h1|^2) / 2 of a batch (B, N), the guiding
    distribution's amplitude (module doc), with the local energy of every configuration
    (`hamiltonian.local_energies_traced`: one forward pass per bond), `chunk` configurations at a
    time. Hashable by identity: a sampler compiles once per instance."""

    logpsi: LogPsi
    ham: Hamiltonian
    h1: float
    b: float
    chunk: int

    def __call__(self, params, s: jax.Array) -> jax.Array:
        lp = self.logpsi(params, s)
        e1 = local_energies_traced(self.ham, self.logpsi, params, s, lp, self.chunk)
        return lp + 0.5 * jnp.log1p(self.b * jnp.abs(e1 - self.h1) ** 2)


@jax.jit
def _values(e1: jax.Array, e2: jax.Array, h1: float, b: float) -> jax.Array:
    """(n, 10) weighted local values w (1, Re u, |u|^2, Re e1, Re hu, Re conj(u) e1,
    Re conj(u) hu, |e1|^2, Re conj(e1) hu, |hu|^2), u = e1 - h1 and hu = e2 - h1 e1: the
    2 x 2 Rayleigh-Ritz matrices and psi_1's energy and variance for any a are functions of
    their means."""
    u, hu = e1 - h1, e2 - h1 * e1
    w = 1 / (1 + b * jnp.abs(u) ** 2)
    return w[:, None] * jnp.stack([jnp.ones_like(w), u.real, jnp.abs(u) ** 2, e1.real, hu.real,
                                   (jnp.conj(u) * e1).real, (jnp.conj(u) * hu).real,
                                   jnp.abs(e1) ** 2, (jnp.conj(e1) * hu).real,
                                   jnp.abs(hu) ** 2], 1)


def fit_a(means: np.ndarray) -> float:
    """a of the lower Rayleigh-Ritz vector from the means of `_values`."""
    w, u, uu, e1, hu, ue1, uhu = means[:7]
    off = (hu + ue1) / 2
    _, vecs = scipy.linalg.eigh(np.array([[e1, off], [off, uhu]]), np.array([[w, u], [u, uu]]))
    return float(vecs[1, 0] / vecs[0, 0])


def psi1_energy(means: np.ndarray, a: float) -> np.ndarray:
    """(energy, variance) of psi_1 = psi + a u from the means of `_values`: |f|^2,
    Re conj(f) g and |g|^2 expanded in a."""
    w, u, uu, e1, hu, ue1, uhu, e1e1, e1hu, huhu = means
    ff = w + 2 * a * u + a * a * uu
    fg = e1 + a * (hu + ue1) + a * a * uhu
    gg = e1e1 + 2 * a * e1hu + a * a * huhu
    e = fg / ff
    return np.array([e, gg / ff - e * e])


def cross_fit(means: np.ndarray) -> np.ndarray:
    """(energy, variance, a_0, a_1) from the means (20,) of `_values` on the two halves of the
    chains (any common scale): each half's a measured on the other half, the two averaged."""
    m0, m1 = means[:10], means[10:]
    a0, a1 = fit_a(m0), fit_a(m1)
    return np.concatenate([(psi1_energy(m1, a0) + psi1_energy(m0, a1)) / 2, [a0, a1]])


def jackknife(chain_sums: np.ndarray, chain_counts: np.ndarray,
              f: Callable[[np.ndarray], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Bias-corrected estimate and error of f(means) from per-chain sums (C_local, K) and sample
    counts (C_local,) on every rank: each chain left out in turn."""
    total = dist.host_allreduce_sum(chain_sums.sum(0))
    n = float(dist.host_allreduce_sum(np.array([chain_counts.sum()], float))[0])
    g = float(dist.host_allreduce_sum(np.array([len(chain_counts)], float))[0])
    whole = np.asarray(f(total / n))
    loo = np.array([f((total - c) / (n - k)) for c, k in zip(chain_sums, chain_counts)])
    loo = loo.reshape(len(loo), whole.size)
    mean = dist.host_allreduce_sum(loo.sum(0)) / g
    spread = dist.host_allreduce_sum(((loo - mean) ** 2).sum(0))
    return g * whole - (g - 1) * mean, np.sqrt((g - 1) / g * spread)


def lanczos_within(vstate: VariationalState, step_no: int, measured: dict, burn_in: int,
                   most: int, until: float, safety: float, n_chains: int = STEP_CHAINS
                   ) -> dict[str, float]:
    """One Lanczos step on `vstate` inside a time budget (see the module doc), with h1 and m2
    from `measured` (psi's energy_per_site and variance_per_site, `observables.energy_of`):
    `n_chains` of the chains (all when they do not divide evenly) under the guiding distribution,
    `burn_in` sweeps, then one sweep at a time (`observables.draw_within`) on up to `most`
    samples, until the next sweep, at the last one's cost times `safety`, would end after
    `until`. Returns the energy per site (S.S units) of psi_1, cross-fitted, with its error,
    variance and V-score, `alpha_halves` (the a fitted on each half of the chains, in
    1 / total-energy units) and their mean `alpha`, `shift` (h1, total), `fit_samples` (each a's
    samples, half of them), `n_samples` and the acceptance under p."""
    sys = vstate.system
    ham, N = sys.hamiltonian, sys.n_sites
    h1 = measured["energy_per_site"] * N
    b = 1 / max(measured["variance_per_site"] * N, 1e-300)
    C, C_local = sys.cfg.sampler.n_chains, vstate.chains.shape[0]
    stride = C // n_chains if C % n_chains == 0 and C_local % (C // n_chains) == 0 else 1
    # The guided chains as a state of their own: C / stride chains in all, every rank keeping its
    # multiples of stride, so their random streams do not depend on the rank count either.
    cfg = dataclasses.replace(sys.cfg, sampler=dataclasses.replace(sys.cfg.sampler,
                                                                   n_chains=C // stride))
    guide = GuidedAmplitude(sys.logpsi, ham, h1, b, sys.chunk)
    sampler = make_sampler(sys.cfg, sys.lattice, ham, guide, max(1, sys.chunk // len(ham.J)))
    guided = vstate.replace(system=dataclasses.replace(sys, cfg=cfg, sampler=sampler),
                            chains=vstate.chains[::stride])

    def values(vs: VariationalState, smp: Samples) -> jax.Array:
        lp = sys.logpsi(vs.params, smp.s)
        return _values(*local_pair(ham, sys.logpsi, vs.params, smp.s, lp, sys.chunk), h1, b)

    _, drawn, acceptance = draw_within(guided, step_no, burn_in, 1, most, until, safety, values,
                                       (LANCZOS_BURN_IN, LANCZOS_STEP))
    sums = np.stack([np.asarray(v) for v in drawn]).sum(0)  # (local chains, 10)
    n_local = len(sums)
    odd = (np.arange(n_local) + dist.rank() * n_local) % 2 == 1  # the halves, by global index
    halves = np.concatenate([np.where(odd[:, None], 0.0, sums), np.where(odd[:, None], sums, 0.0)],
                            1)
    (energy, variance), (error, _) = jackknife(halves, np.full(n_local, len(drawn)),
                                               lambda m: cross_fit(m)[:2])
    a0, a1 = cross_fit(dist.host_allreduce_sum(halves.sum(0)))[2:]
    n = len(drawn) * cfg.sampler.n_chains
    return {"energy_per_site": energy / N, "energy_error": error / N,
            "variance_per_site": variance / N, "v_score": N * variance / energy ** 2,
            "alpha": (a0 + a1) / 2, "alpha_halves": np.array([a0, a1]), "shift": h1,
            "fit_samples": n // 2, "n_samples": n,
            "acceptance": acceptance}
