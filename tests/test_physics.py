"""Lattice, Hamiltonian and exact diagonalization against the reference table and dense H."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from pipeline import exact
from pipeline.hamiltonian import Hamiltonian, local_energies
from pipeline.lattice import Lattice

from conftest import randomized, system_for


def test_bond_counts() -> None:
    lat = Lattice(4, 2)
    assert len(lat.bonds1) == 2 * 16 and len(lat.bonds2) == 2 * 16
    ss = Lattice(4, 2, "shastry_sutherland")
    dimers = ss.bonds2
    assert len(dimers) == 8
    assert sorted(dimers.ravel().tolist()) == list(range(16))  # every site in exactly one dimer


@pytest.mark.parametrize("J2", [0.0, 0.5, 0.8])
def test_exact_energy_matches_reference_table(J2: float) -> None:
    ref, is_exact, _ = exact.reference_energy(4, J2)
    assert is_exact
    for marshall in (False, True):
        e0, _, _ = exact.ground_state(Hamiltonian.build(Lattice(4, 2), 1.0, J2, marshall))
        assert abs(e0 - ref) < 1e-9


def test_shastry_sutherland_dimer_phase_is_exact() -> None:
    """For J/J' = 0.5 < 0.675 the product of dimer singlets is the ground state: -3/8 J'."""
    ham = Hamiltonian.build(Lattice(4, 2, "shastry_sutherland"), 1.0, 2.0, False)
    e0, _, _ = exact.ground_state(ham)
    assert abs(e0 - (-3 / 8 * 2.0)) < 1e-10


@pytest.mark.parametrize("kind,marshall", [("square", True), ("square", False),
                                           ("shastry_sutherland", False)])
def test_local_energy_equals_dense_hamiltonian(attention: str, kind: str, marshall: bool) -> None:
    """E_loc(s) = <s|H|psi>/<s|psi> on the whole 4x4 Sz=0 basis, to 1e-10."""
    system = system_for(**{"model.attention": attention, "lattice.kind": kind,
                           "hamiltonian.marshall_sign": marshall, "hamiltonian.J2": 0.7})
    params = randomized(system.init_params(0), jax.random.PRNGKey(3), 0.1)
    h, states = exact.sparse_hamiltonian(system.hamiltonian)
    s = exact.configs(states, 16)
    logpsi = np.asarray(system.logpsi(params, s))
    psi = np.exp(logpsi - logpsi.real.max())
    expected = (h @ psi) / psi
    sample = np.random.default_rng(0).choice(len(states), 300, replace=False)
    got = np.asarray(local_energies(system.hamiltonian, system.logpsi, params, s[sample],
                                    logpsi[sample]))
    np.testing.assert_allclose(got, expected[sample], rtol=1e-12, atol=1e-10)
    assert np.std(np.abs(psi)) > 1e-3  # a non-trivial wave function


def test_local_energy_is_exact_for_the_ground_state() -> None:
    """With psi = the ED ground state, every local energy equals E0 (zero variance)."""
    ham = Hamiltonian.build(Lattice(4, 2), 1.0, 0.5, True)
    e0, vec, states = exact.ground_state(ham)
    table = {int(st): v for st, v in zip(states, vec)}

    def logpsi(_, s):
        bits = ((np.asarray(s) + 1) // 2).astype(np.int64)
        idx = (bits << np.arange(16)).sum(-1)
        return np.log(np.array([table[int(i)] for i in idx]).astype(complex))

    s = exact.configs(states[:50], 16)
    sample, bond = ham.connected(s)
    flipped = s[sample].copy()
    rows = np.arange(len(sample))
    flipped[rows, ham.bonds[bond, 0]] *= -1
    flipped[rows, ham.bonds[bond, 1]] *= -1
    ratio = np.exp(logpsi(None, flipped) - logpsi(None, s)[sample])
    eloc = np.asarray(ham.diagonal(s)) + np.bincount(sample, ham.off[bond] * ratio.real, len(s))
    np.testing.assert_allclose(eloc / 16, e0, atol=1e-9)


def test_sign_rule_bound_is_exact_without_frustration_and_a_gap_with_it() -> None:
    """`exact.sign_rule_bound`: at J2 = 0 the Marshall signs are the ground state's, so the bound
    is E0; at J2 = 0.5 it lies above E0 and below |ground state| with the Marshall signs (its
    start), with non-negative amplitudes whose exact energy is the reported one."""
    lat = Lattice(4, 2)
    free = Hamiltonian.build(lat, 1.0, 0.0, True)
    h_free, _ = exact.sparse_hamiltonian(free)
    e_free, v_free = exact.lowest_state(h_free, 16)
    assert abs(exact.sign_rule_bound(h_free, v_free, 16)[0] - e_free) < 1e-9
    ham = Hamiltonian.build(lat, 1.0, 0.5, True)
    h, _ = exact.sparse_hamiltonian(ham)
    e0, v = exact.lowest_state(h, 16)
    bound, x = exact.sign_rule_bound(h, v, 16)
    start = exact.expectation(h, np.abs(v), 16)["energy_per_site"]
    assert np.all(x >= 0)
    assert abs(exact.expectation(h, x, 16)["energy_per_site"] - bound) < 1e-12
    assert e0 + 1e-3 < bound < start - 1e-4, (e0, bound, start)
