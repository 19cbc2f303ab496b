"""The Lanczos step (`pipeline.lanczos`) against exact linear algebra on 4x4: the local values
e1, e2 configuration by configuration, psi_1's amplitude, the exact step against a Rayleigh-Ritz
solve in the Krylov space {psi, H psi}, and the sampled energy of psi_1 against its exact value
(independent draws and Metropolis chains)."""
from __future__ import annotations

import time

import jax
import numpy as np
import pytest
import scipy.linalg

from pipeline import exact, lanczos
from pipeline.state import VariationalState

from conftest import randomized, system_for

SMALL = {"hamiltonian.J2": 0.5, "model.d": 8, "model.heads": 2}


@pytest.fixture(scope="module")
def setup():
    system = system_for(**SMALL)
    params = randomized(system.init_params(0), jax.random.PRNGKey(5), 0.2)
    h, states = exact.sparse_hamiltonian(system.hamiltonian)
    psi = exact.state_vector(system.logpsi, states, system.n_sites)(params)
    return system, params, h, states, psi


def test_local_values_and_the_guiding_amplitude_are_exact(setup) -> None:
    system, params, h, states, psi = setup
    pick = np.random.default_rng(0).choice(len(states), 64, replace=False)
    s = exact.configs(states[pick], system.n_sites)
    lp = system.logpsi(params, s)
    e1, e2 = lanczos.local_pair(system.hamiltonian, system.logpsi, params, s, lp)
    h_psi = h @ psi
    np.testing.assert_allclose(np.asarray(e1), h_psi[pick] / psi[pick], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(np.asarray(e2), (h @ h_psi)[pick] / psi[pick], rtol=1e-9, atol=1e-9)
    b, h1 = 0.3, -5.0
    guide = lanczos.GuidedAmplitude(system.logpsi, system.hamiltonian, h1, b, 0)
    p = abs(psi) ** 2 + b * abs(h_psi - h1 * psi) ** 2
    ratio = np.exp(2 * np.asarray(guide(params, s)).real) / p[pick]  # one constant for every s
    np.testing.assert_allclose(ratio / ratio[0], 1.0, rtol=1e-9)


def test_exact_step_is_the_krylov_minimum(setup) -> None:
    system, _, h, _, psi = setup
    N = system.n_sites
    got = lanczos.exact(h, psi, N)
    basis = np.stack([psi, h @ psi], 1)
    vals, vecs = scipy.linalg.eigh(basis.conj().T @ (h @ basis), basis.conj().T @ basis)
    phi = basis @ vecs[:, 0]
    phi /= np.linalg.norm(phi)
    h_phi = h @ phi
    assert got["energy_per_site"] == pytest.approx(vals[0] / N, rel=1e-10)
    assert got["variance_per_site"] == pytest.approx(
        (np.vdot(h_phi, h_phi).real - vals[0] ** 2) / N, rel=1e-6)
    e0, gs = exact.lowest_state(h, N)
    assert e0 < got["energy_per_site"] < exact.expectation(h, psi, N)["energy_per_site"] - 1e-3
    assert lanczos.exact(h, gs, N)["energy_per_site"] == pytest.approx(e0, abs=1e-9)  # stays


@pytest.mark.parametrize("kind", ["exact", "exchange"])
def test_sampled_step_matches_the_exact_energy_of_its_states(setup, kind: str) -> None:
    """Each half's a is noisy, so the sampled (cross-fitted) energy is compared with the mean
    exact energy of the two psi_1 it chose (the a of each half and h1, as returned), which must
    also be near the best step's; all 256 chains run under the guiding distribution."""
    _, params, h, _, psi = setup
    system = system_for(**SMALL, **{"sampler.kind": kind, "sampler.n_chains": 256,
                                    "sampler.n_thermalize": 20})
    N = system.n_sites
    vs = VariationalState.fresh(system, params)
    measured = exact.expectation(h, psi, N)  # psi's energy and variance, for h1 and b
    got = lanczos.lanczos_within(vs, 0, measured, 10, 256 * 10, time.perf_counter() + 600, 1.3, 256)
    assert got["n_samples"] == 2 * got["fit_samples"] == 256 * 10
    states = [psi + a * (h @ psi - got["shift"] * psi) for a in got["alpha_halves"]]
    exact_of = [exact.expectation(h, p / np.linalg.norm(p), N) for p in states]
    want = {k: np.mean([e[k] for e in exact_of]) for k in ("energy_per_site", "variance_per_site")}
    assert got["alpha"] == pytest.approx(np.mean(got["alpha_halves"]), rel=1e-12)
    assert 0 < got["energy_error"] < 5e-3
    assert abs(got["energy_per_site"] - want["energy_per_site"]) < 4 * got["energy_error"], got
    assert got["variance_per_site"] == pytest.approx(want["variance_per_site"], rel=0.25)
    best = lanczos.exact(h, psi, N)["energy_per_site"]
    gain = exact.expectation(h, psi, N)["energy_per_site"] - best
    assert max(e["energy_per_site"] for e in exact_of) < best + 0.1 * gain


def test_cross_fit_measures_each_half_s_a_on_the_other_half() -> None:
    """`cross_fit` on synthetic means: the energy of a at a = 0 is e1 / w, each half's a is the
    Rayleigh-Ritz vector of its own means, and the energy is the mean of each a measured on the
    other half (so swapping the halves changes nothing)."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 4, 3))  # two halves: 4 'samples' of (psi, u, H psi, H u) weights
    halves = []
    for v in x:
        w, u = 1.0 + 0 * v[:, 0], v[:, 0]
        e1, hu = -1.0 + 0.3 * v[:, 1], 0.5 * v[:, 2]
        halves.append(np.mean([w, u, u * u, e1, hu, u * e1, u * hu, e1 * e1, e1 * hu, hu * hu], 1))
    m0, m1 = halves
    assert lanczos.psi1_energy(m0, 0.0)[0] == pytest.approx(m0[3] / m0[0])
    a0, a1 = lanczos.fit_a(m0), lanczos.fit_a(m1)
    for a, m in ((a0, m0), (a1, m1)):  # the fitted a minimizes its own half's energy
        e = lambda x: lanczos.psi1_energy(m, x)[0]
        assert e(a) <= min(e(a - 1e-3), e(a + 1e-3))
    got = lanczos.cross_fit(np.concatenate([m0, m1]))
    want = (lanczos.psi1_energy(m1, a0) + lanczos.psi1_energy(m0, a1)) / 2
    np.testing.assert_allclose(got, [*want, a0, a1], rtol=1e-12)
    np.testing.assert_allclose(lanczos.cross_fit(np.concatenate([m1, m0])), [*want, a1, a0],
                               rtol=1e-12)
