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
and m2 come from the caller's measurement of psi's energy and variance. Then
1. a: the 2 x 2 generalized eigenproblem of the weighted means of conj(u_i) (H u_j) / psi and
   conj(u_i) u_j with u_0 = psi, u_1 = (H - h1) psi (real parts, symmetrized), on the first
   FIT_SHARE of the time;
2. the energy of psi_1 = psi + a (H - h1) psi for that a on the rest, fresh samples:
   <w Re conj(f) g> / <w |f|^2> with f = psi_1 / psi = 1 + a (e1 - h1) and g = (H psi_1) / psi =
   e1 + a (e2 - h1 e1), and its variance <w |g - E f|^2> / <w |f|^2>; ratios of means, with the
   jackknife over chains (bias-corrected; its error bar accounts for the correlation along a chain).
Any a gives a variational energy, so the noise of stage 1 costs accuracy, never correctness; the
energy is not minimized on the samples that measure it.
Cost: e2 needs the local energy of every configuration connected to a sample (some 80^2 forward
passes per sample on 6x6), and every Metropolis proposal under p a local energy (one forward pass
per bond). The guided chains are therefore a subset (STEP_CHAINS), for rank-count independence
those whose global index is a multiple of C / STEP_CHAINS, started from the chains of |psi|^2.
"""
from __future__ import annotations

import dataclasses
import time
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
from .sampler import LANCZOS_BURN_IN, LANCZOS_FIT, LANCZOS_STEP, Samples
from .state import VariationalState
from .system import make_sampler

LogPsi = Callable[[object, jax.Array], jax.Array]
STEP_CHAINS = 64  # chains under the guiding distribution (all of them when they do not divide)
FIT_SHARE = 0.3  # of the time, at most, for stage 1 (a)


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
    return t, apply_chunked(logpsi, params, t, chunk), sample, bond, valid


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
def _fit_values(e1: jax.Array, e2: jax.Array, h1: float, b: float) -> jax.Array:
    """(n, 7) weighted local values of the 2 x 2 Rayleigh-Ritz matrices (stage 1)."""
    u, hu = e1 - h1, e2 - h1 * e1
    w = 1 / (1 + b * jnp.abs(u) ** 2)
    return w[:, None] * jnp.stack([jnp.ones_like(w), u.real, jnp.abs(u) ** 2, e1.real, hu.real,
                                   (jnp.conj(u) * e1).real, (jnp.conj(u) * hu).real], 1)


@jax.jit
def _energy_values(e1: jax.Array, e2: jax.Array, h1: float, b: float, a: float) -> jax.Array:
    """(n, 3) weighted local values w (|f|^2, Re conj(f) g, |g|^2) of psi_1 (stage 2)."""
    u = e1 - h1
    w = 1 / (1 + b * jnp.abs(u) ** 2)
    f, g = 1 + a * u, e1 + a * (e2 - h1 * e1)
    return w[:, None] * jnp.stack([jnp.abs(f) ** 2, (jnp.conj(f) * g).real, jnp.abs(g) ** 2], 1)


def fit_a(means: np.ndarray) -> float:
    """a of the lower Rayleigh-Ritz vector from the means of `_fit_values`."""
    w, u, uu, e1, hu, ue1, uhu = means
    S = np.array([[w, u], [u, uu]])
    off = (hu + ue1) / 2
    vals, vecs = scipy.linalg.eigh(np.array([[e1, off], [off, uhu]]), S)
    return float(vecs[1, 0] / vecs[0, 0])


def psi1_energy(means: np.ndarray) -> np.ndarray:
    """(energy, variance) of psi_1 from the means of `_energy_values`."""
    ff, fg, gg = means
    e = fg / ff
    return np.array([e, gg / ff - e * e])


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
    `burn_in` sweeps, then one sweep at a time (`observables.draw_within`): stage 1 on up to
    `most` samples within FIT_SHARE of the time, stage 2 on up to `most` until the next sweep,
    at the last one's cost times `safety`, would end after `until`. Returns the energy per site
    (S.S units) of psi_1 with its error, variance and V-score, `alpha` (a, in 1 / total-energy
    units), `shift` (h1, total), `fit_samples` and `n_samples` (stages 1 and 2) and stage 2's
    acceptance under p."""
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

    def local(values_of: Callable) -> Callable[[VariationalState, Samples], jax.Array]:
        return lambda vs, smp: values_of(*local_pair(ham, sys.logpsi, vs.params, smp.s,
                                                     sys.logpsi(vs.params, smp.s), sys.chunk))

    now = time.perf_counter()
    guided, fit, _ = draw_within(guided, step_no, burn_in, 1, most, now + FIT_SHARE * (until - now),
                                 safety, local(lambda e1, e2: _fit_values(e1, e2, h1, b)),
                                 (LANCZOS_BURN_IN, LANCZOS_FIT))
    n_fit = len(fit) * cfg.sampler.n_chains
    a = fit_a(dist.host_allreduce_sum(np.concatenate([np.asarray(v) for v in fit]).sum(0)) / n_fit)
    _, measured_1, acceptance = draw_within(
        guided, step_no, 0, 1, most, until, safety,
        local(lambda e1, e2: _energy_values(e1, e2, h1, b, a)), (LANCZOS_BURN_IN, LANCZOS_STEP))
    values = np.stack([np.asarray(v) for v in measured_1])  # (sweeps, local chains, 3)
    (energy, variance), (error, _) = jackknife(values.sum(0), np.full(values.shape[1], len(values)),
                                               psi1_energy)
    return {"energy_per_site": energy / N, "energy_error": error / N,
            "variance_per_site": variance / N, "v_score": N * variance / energy ** 2,
            "alpha": a, "shift": h1, "fit_samples": n_fit, "n_samples": values.size // 3,
            "acceptance": acceptance}
