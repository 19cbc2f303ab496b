"""Both samplers reproduce |psi|^2 (chi-square on the enumerable 4x4 Sz=0 space); the exact one's
local energies are those of the forward passes."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from pipeline import exact
from pipeline.hamiltonian import local_energies
from pipeline.lattice import Lattice
from pipeline.sampler import (INIT, START, STEP, THERMALIZE, chain_keys, init_chains, ordered_patterns,
                              ordered_starts)

from conftest import randomized, system_for

N_BINS = 24


def _probabilities(system, params):
    states = exact.sz0_basis(16)
    lp = np.asarray(system.logpsi(params, exact.configs(states, 16)))
    p = np.exp(2 * (lp.real - lp.real.max()))
    return states, p / p.sum()


def _bins(states, p):
    """Equal-probability bins over states sorted by probability: index per state, bin masses."""
    order = np.argsort(p)
    edges = np.searchsorted(np.cumsum(p[order]), np.linspace(0, 1, N_BINS + 1)[1:-1])
    bin_of = np.empty(len(p), np.int64)
    bin_of[order] = np.searchsorted(edges, np.arange(len(p)), side="right")
    return bin_of, np.bincount(bin_of, p, N_BINS)


def _sample(system, params, n_chains=4096, n_per_chain=8):
    ids = jnp.arange(n_chains)
    chains = init_chains(chain_keys(0, INIT, 0, ids), 16)
    chains, _ = system.sampler.run(params, chains, chain_keys(0, THERMALIZE, 0, ids), 30)
    _, smp = system.sampler.run(params, chains, chain_keys(0, STEP, 0, ids), n_per_chain)
    return np.asarray(smp.s), smp


@pytest.mark.parametrize("kind", ["exchange", "exact"])
def test_sampler_histogram_matches_psi_squared(kind: str) -> None:
    system = system_for(**{"sampler.sweep_size": 32, "sampler.kind": kind})
    params = randomized(system.init_params(0), jax.random.PRNGKey(5), 0.15)
    states, p = _probabilities(system, params)
    assert p.max() / p.min() > 100  # a far-from-uniform distribution
    s, smp = _sample(system, params)
    assert np.all(s.sum(axis=1) == 0)  # Sz = 0 conserved
    idx = np.searchsorted(states, (((s + 1) // 2).astype(np.int64) << np.arange(16)).sum(1))
    bin_of, mass = _bins(states, p)
    observed = np.bincount(bin_of[idx], minlength=N_BINS)
    _, pvalue = stats.chisquare(observed, mass * len(idx))
    assert pvalue > 1e-4, pvalue
    # The same test rejects the uniform distribution: it has power (it also rejects the sampler
    # without the Hastings factor m(s)/m(s') of anti-aligned-bond proposals: p ~ 1e-45).
    uniform = np.bincount(bin_of, minlength=N_BINS) / len(p)
    _, p_uniform = stats.chisquare(observed, uniform * len(idx))
    assert p_uniform < 1e-10
    if kind == "exchange":
        assert 0 < float(smp.accepted) / float(smp.proposed) < 1
    else:  # independent draws: every one is a new sample
        assert float(smp.accepted) == float(smp.proposed) == len(s)


def test_exact_sampler_local_energies_are_those_of_the_forward_passes() -> None:
    """The exact sampler's local energies (sparse Hamiltonian over the amplitude table) equal the
    exchange path's (a forward pass per connected configuration), Marshall sign on and off, and
    its log psi is that of the network."""
    for marshall in (True, False):
        system = system_for(**{"sampler.kind": "exact", "hamiltonian.marshall_sign": marshall})
        params = randomized(system.init_params(1), jax.random.PRNGKey(2), 0.3)
        ids = jnp.arange(16)
        _, smp = system.sampler.run(params, None, chain_keys(0, STEP, 0, ids), 4)
        np.testing.assert_allclose(smp.logpsi, system.logpsi(params, smp.s), rtol=0, atol=1e-10)
        reference = local_energies(system.hamiltonian, system.logpsi, params, smp.s, smp.logpsi)
        np.testing.assert_allclose(smp.eloc, reference, rtol=1e-10, atol=1e-10)
        assert np.ptp(np.asarray(reference).real) > 0.1  # not a trivial constant


@pytest.mark.parametrize("kind", ["exchange", "exact"])
def test_samples_do_not_depend_on_how_chains_are_split(kind: str) -> None:
    """Chain g gets the same stream whether simulated alone or in a batch: rank-count invariance."""
    system = system_for(**{"sampler.kind": kind})
    params = system.init_params(0)
    ids = jnp.arange(8)
    chains = init_chains(chain_keys(0, INIT, 0, ids), 16)
    _, all_at_once = system.sampler.run(params, chains, chain_keys(0, STEP, 3, ids), 2)
    halves = [system.sampler.run(params, chains[sl], chain_keys(0, STEP, 3, ids[sl]), 2)[1].s
              for sl in (slice(0, 4), slice(4, 8))]
    a = np.asarray(all_at_once.s).reshape(2, 8, 16)
    b = np.concatenate([np.asarray(h).reshape(2, 4, 16) for h in halves], axis=1)
    np.testing.assert_array_equal(a, b)


def test_chain_groups_give_the_samples_of_all_chains_at_once() -> None:
    """Running the chains in groups (the CPU's cache-sized forward chunks) changes nothing:
    the same samples in the same sample-major order, and the same acceptance counts."""
    system = system_for()
    params = system.init_params(0)
    ids = jnp.arange(12)
    chains = init_chains(chain_keys(0, INIT, 0, ids), 16)
    keys = chain_keys(0, STEP, 3, ids)
    runs = [dataclasses.replace(system.sampler, group=g).run(params, chains, keys, 3)
            for g in (0, 4, 5)]  # 5: not a divisor of 12, so groups of 4
    for end, smp in runs[1:]:
        np.testing.assert_array_equal(end, runs[0][0])
        np.testing.assert_array_equal(smp.s, runs[0][1].s)
        np.testing.assert_allclose(smp.logpsi, runs[0][1].logpsi, rtol=0, atol=1e-12)
        assert (int(smp.accepted), int(smp.proposed)) == (int(runs[0][1].accepted),
                                                          int(runs[0][1].proposed))


def test_ordered_patterns_are_the_neel_and_stripe_states() -> None:
    lat = Lattice(6, 2)
    p = ordered_patterns(lat.coords)
    assert p.shape == (6, 36) and not p.sum(axis=1).any()  # Sz = 0
    np.testing.assert_array_equal(p[3:], -p[:3])
    anti = lambda bonds: (p[:, bonds[:, 0]] != p[:, bonds[:, 1]]).mean(axis=1)  # noqa: E731
    # Neel: every nearest-neighbour bond anti-aligned, every diagonal one aligned; a stripe: half
    # of the nearest-neighbour bonds (one direction) and every diagonal one anti-aligned
    np.testing.assert_array_equal(anti(lat.bonds1), [1, 0.5, 0.5] * 2)
    np.testing.assert_array_equal(anti(lat.bonds2), [0, 1, 1] * 2)
    x, y = lat.coords.T
    np.testing.assert_array_equal(p[1], np.where(x % 2, -1, 1))
    np.testing.assert_array_equal(p[2], np.where(y % 2, -1, 1))


def test_ordered_starts_draw_each_candidate_with_its_psi_squared_weight() -> None:
    """A warm start's chain starts at its random configuration or at one of the six patterns
    with probability |psi|^2 / (sum over its 7 candidates): observed counts against those
    probabilities summed over 4096 chains, for a log psi favouring the Neel state weakly and
    strongly (then every chain starts there) and for a flat one; chunked evaluation alike."""
    lat = Lattice(4, 2)
    patterns = jnp.asarray(ordered_patterns(lat.coords))
    neel = np.asarray(patterns[0], np.float64)
    n = 4096
    chains = init_chains(chain_keys(0, INIT, 0, jnp.arange(n)), 16)
    keys = chain_keys(0, START, 0, jnp.arange(n))
    own = np.asarray(chains)
    fresh = ~(own[:, None, :] == np.asarray(patterns)[None]).all(axis=2).any(axis=1)

    def logpsi(a, s):
        return (a * (s.astype(jnp.float64) @ neel) / 4).astype(jnp.complex128)

    for a in (0.0, 0.3, 3.0):
        starts = np.asarray(ordered_starts(logpsi, a, chains, patterns, keys))
        np.testing.assert_array_equal(starts, ordered_starts(logpsi, a, chains, patterns, keys, 64))
        options = np.concatenate([own[:, None], np.broadcast_to(np.asarray(patterns), (n, 6, 16))], 1)
        w = 2 * a * options.astype(np.float64) @ neel / 4
        prob = np.exp(w - w.max(axis=1, keepdims=True))
        prob = (prob / prob.sum(axis=1, keepdims=True))[fresh]
        taken = (starts[:, None, :] == options).all(axis=2)[fresh]  # one candidate per chain
        assert (taken.sum(axis=1) == 1).all()
        expected, spread = prob.sum(axis=0), np.sqrt((prob * (1 - prob)).sum(axis=0))
        assert (np.abs(taken.sum(axis=0) - expected) <= 5 * spread + 1).all(), (a, taken.sum(0), expected)
        if a == 3.0:
            assert taken[:, 1].all()  # the Neel state outweighs everything else by e^12 or more
