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
    e0, gs, _ = exact.ground_state(system.hamiltonian)
    assert e0 < got["energy_per_site"] < exact.expectation(h, psi, N)["energy_per_site"] - 1e-3
    assert lanczos.exact(h, gs, N)["energy_per_site"] == pytest.approx(e0, abs=1e-9)  # stays


@pytest.mark.parametrize("kind", ["exact", "exchange"])
def test_sampled_step_matches_the_exact_energy_of_its_state(setup, kind: str) -> None:
    """Stage 1's a is noisy, so the sampled energy is compared with the exact energy of the
    psi_1 it chose (a and h1 as returned), which must also be near the best step's; all 256
    chains run under the guiding distribution."""
    _, params, h, _, psi = setup
    system = system_for(**SMALL, **{"sampler.kind": kind, "sampler.n_chains": 256,
                                    "sampler.n_thermalize": 20})
    N = system.n_sites
    vs = VariationalState.fresh(system, params)
    measured = exact.expectation(h, psi, N)  # psi's energy and variance, for h1 and b
    got = lanczos.lanczos_within(vs, 0, measured, 10, 256 * 10, time.perf_counter() + 600, 1.3, 256)
    assert got["n_samples"] == got["fit_samples"] == 256 * 10
    psi1 = psi + got["alpha"] * (h @ psi - got["shift"] * psi)
    want = exact.expectation(h, psi1 / np.linalg.norm(psi1), N)
    assert 0 < got["energy_error"] < 5e-3
    assert abs(got["energy_per_site"] - want["energy_per_site"]) < 4 * got["energy_error"], got
    assert got["variance_per_site"] == pytest.approx(want["variance_per_site"], rel=0.25)
    best = lanczos.exact(h, psi, N)["energy_per_site"]
    gain = exact.expectation(h, psi, N)["energy_per_site"] - best
    assert want["energy_per_site"] < best + 0.1 * gain
