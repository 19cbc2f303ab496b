"""Attention maps (input-dependence, profile) and the correlation estimators against exact
operators; measurements of a trained run against exact diagonalization, on 1 and 2 ranks."""
from __future__ import annotations

import os
import time

import jax
import numpy as np
import pytest

from pipeline import analysis, exact, observables, results
from pipeline.hamiltonian import Hamiltonian
from pipeline.lattice import Lattice

from conftest import mpirun, randomized, system_for
from test_jobs import job

MEASURE = ("-m", "pipeline.measure")


def random_sz0(n_samples: int, n_sites: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.repeat(np.array([1, -1], np.int8), n_sites // 2)
    return np.stack([rng.permutation(base) for _ in range(n_samples)])


# ---- attention maps ----------------------------------------------------------------------------
@pytest.mark.parametrize("layers", [1, 2])
def test_attention_dependence_is_zero_for_factored_and_positive_for_standard(layers: int) -> None:
    s = random_sz0(64, 16)
    for kind in ("factored", "standard"):
        system = system_for(**{"model.attention": kind, "model.layers": layers})
        params = randomized(system.init_params(0), jax.random.PRNGKey(1))
        probe = analysis.AttentionProbe(system.model, system.lattice.patch_displacement, 64)
        out = probe(params, s)
        assert out["dependence"].shape == (layers, 2)
        if kind == "factored":
            assert np.all(out["dependence"] == 0.0)
        else:
            assert np.all(out["dependence"] > 1e-3), out["dependence"]
            np.testing.assert_allclose(out["mean_map"].sum(-1), 1.0, atol=1e-12)  # softmax rows


def test_factored_profile_is_its_alpha_and_standard_dependence_by_hand() -> None:
    system = system_for(**{"model.layers": 2})
    params = randomized(system.init_params(0), jax.random.PRNGKey(2))
    probe = analysis.AttentionProbe(system.model, system.lattice.patch_displacement, 8)
    out = probe(params, random_sz0(8, 16))
    for layer in range(2):
        np.testing.assert_array_equal(out["profile"][layer], params[f"attention_{layer}"]["alpha"])
    std = system_for(**{"model.attention": "standard"})
    p = randomized(std.init_params(0), jax.random.PRNGKey(3))
    s = random_sz0(32, 16, seed=4)
    a = np.asarray(analysis.maps(std.model, p, s)[0])  # (32, heads, n, n)
    mean = a.mean(0)
    want = np.sqrt(((a - mean) ** 2).sum((2, 3)).mean(0)) / np.sqrt((mean ** 2).sum((1, 2)))
    got = analysis.AttentionProbe(std.model, std.lattice.patch_displacement, 32)(p, s)
    np.testing.assert_allclose(got["dependence"][0], want, rtol=1e-12)
    disp = std.lattice.patch_displacement
    for r in range(4):
        np.testing.assert_allclose(got["profile"][0, :, r], mean[:, disp == r].mean(-1), rtol=1e-12)


# ---- estimators against exact operators ----------------------------------------------------------
@pytest.mark.parametrize("marshall", [True, False])
def test_spin_and_bond_estimators_equal_exact_operators(marshall: bool) -> None:
    """(O psi)(s) / psi(s) per configuration for O = S_i.S_j and B_a B_c, to 1e-10."""
    system = system_for(**{"model.d": 4, "model.heads": 1, "hamiltonian.marshall_sign": marshall})
    params = randomized(system.init_params(0), jax.random.PRNGKey(5), 0.2)
    lat = system.lattice
    states = exact.sz0_basis(16)
    s_all = exact.configs(states, 16)
    lp_all = np.asarray(system.logpsi(params, s_all))
    psi = np.exp(lp_all - lp_all.real.max())
    pick = np.random.default_rng(0).choice(len(states), 40, replace=False)
    s, lp = s_all[pick], lp_all[pick]
    signs = observables.pair_signs(lat, marshall)
    m = np.asarray(observables.spin_matrix(system.logpsi, params, s, lp, signs, 0))
    for i, j in [(0, 1), (0, 5), (3, 12), (7, 9)]:
        op = exact.apply_exchange(psi, states, 16, i, j, signs[i, j])
        np.testing.assert_allclose(m[:, i, j], (op[pick] / psi[pick]).real, atol=1e-10)
    bonds = observables.x_bonds(lat)
    ref = bonds[observables.x_bond_starts(lat)]
    prod = np.asarray(observables.bond_products(system.logpsi, params, s, lp, ref, bonds, signs, 0))
    for a in range(len(ref)):
        inner = exact.apply_exchange(psi, states, 16, *bonds[3], signs[tuple(bonds[3])])
        both = exact.apply_exchange(inner, states, 16, *ref[a], signs[tuple(ref[a])])
        np.testing.assert_allclose(prod[:, a, 3], (both[pick] / psi[pick]).real, atol=1e-10)
    assert np.std(np.abs(psi)) > 1e-3


def test_exact_ground_state_correlations_obey_sum_rules() -> None:
    lat = Lattice(4, 2)
    ham_ed = Hamiltonian.build(lat, 1.0, 0.5, True)
    e0, vec, states = exact.ground_state(ham_ed)
    g = exact.correlation_matrix(vec, states, 16, observables.pair_signs(lat, True))
    energy = sum(J * g[i, j] for (i, j), J in zip(ham_ed.bonds, ham_ed.J)) / 16
    assert energy == pytest.approx(e0, abs=1e-10)
    assert abs(g.sum()) < 1e-10  # a singlet: S_tot^2 = 0


# ---- the time-boxed energy against the exact variational energy ---------------------------------
def test_energy_in_blocks_matches_the_exact_variational_energy_and_keeps_its_time_box() -> None:
    """`energy_within` on a random 4x4 state: with time to spare it draws exactly `most` samples
    in blocks with their own streams, and its mean is the exact <psi|H|psi>/<psi|psi> (all 12870
    Sz = 0 states) within 4 error bars; with no time left it draws one block only."""
    from pipeline.sampler import Samples
    from pipeline.state import VariationalState

    system = system_for(**{"model.d": 8, "model.heads": 2, "sampler.n_chains": 64,
                           "sampler.n_samples": 128, "sampler.n_thermalize": 30})
    params = randomized(system.init_params(0), jax.random.PRNGKey(1), 0.2)
    vs = VariationalState.fresh(system, params)
    s_all = jax.numpy.asarray(exact.configs(exact.sz0_basis(16), 16))
    lp = system.logpsi(params, s_all)
    e_loc = np.asarray(vs.local_energies(Samples(s_all, lp, 0, 0))).real
    w = np.exp(2 * (np.asarray(lp.real) - np.max(lp.real)))
    e_exact = float(np.sum(w * e_loc) / np.sum(w)) / 16

    got = observables.energy_within(vs, 0, 10, 2, 64 * 2 * 40, time.perf_counter() + 600, 1.3)
    assert got["n_samples"] == 64 * 2 * 40
    assert abs(got["energy_per_site"] - e_exact) < 4 * got["energy_error"], (got, e_exact)
    assert 0 < got["energy_error"] < 0.01 and 0 < got["acceptance"] < 1
    late = observables.energy_within(vs, 0, 10, 2, 64 * 2 * 40, time.perf_counter(), 1.3)
    assert late["n_samples"] == 64 * 2


def test_sign_records_of_a_step_equal_the_exact_weights_of_the_state() -> None:
    """A driver step's phase coherence and minority sign (`VariationalState.sign_structure`) on
    a 4x4 state with phases spread over every direction equal the |psi|^2-weighted values of the
    exact state (a sum over the 12870 Sz = 0 states) within 5 standard errors of its 4096
    independent draws (sampler.kind=exact); weighted by |psi| instead they are 0.26 and 0.34,
    far outside. A state whose imaginary head is zero has one phase: exactly (1, 0)."""
    from pipeline.driver import Driver

    system = system_for(**{"model.d": 8, "model.heads": 2, "sampler.kind": "exact",
                           "sampler.n_chains": 64, "sampler.n_samples": 4096,
                           "optimizer.solver": "dense"})
    params = randomized(system.init_params(0), jax.random.PRNGKey(3), 0.3)
    psi = exact.state_vector(system.logpsi, exact.sz0_basis(16), 16)(params)
    w, z = np.abs(psi) ** 2, psi / np.abs(psi)
    mean = np.sum(w * z)
    coherence, minority = abs(mean), np.sum(w[(z * np.conj(mean)).real < 0])
    assert 0.3 < coherence < 0.7 and 0.1 < minority < 0.2  # a state far from one sign
    driver = Driver(system)
    _, record = driver.step(driver.fresh_state(params))
    n = 4096
    assert abs(record.minority_sign - minority) < 5 * np.sqrt(minority * (1 - minority) / n)
    assert abs(record.phase_coherence - coherence) < 5 / np.sqrt(n)  # Var Re(z u*) <= 1

    real = jax.tree_util.tree_map(np.zeros_like, params["head_im"])
    _, record = driver.step(driver.fresh_state(params | {"head_im": real}))
    assert (record.phase_coherence, record.minority_sign) == (1.0, 0.0)


# ---- measurements of a trained run ---------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4x4 J2 = 0.5 run trained for a minute, then measured."""
    run_dir = tmp_path_factory.mktemp("trained")
    job(run_dir, "sampler.n_samples=512", "sampler.n_chains=128", "optimizer.warmup=5",
        "optimizer.lr=0.05", "run.n_iter=80", "checkpoint.every_steps=40", n=80)
    return run_dir


def measure_cli(run_dir, *args: str, launcher=()):
    from conftest import PYTHON, ROOT
    import subprocess

    return subprocess.run([*launcher, PYTHON, *MEASURE, str(run_dir), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600,
                          env=os.environ | {"PYTHONUNBUFFERED": "1"})


def test_measured_correlations_of_a_trained_state_match_exact_diagonalization(trained) -> None:
    before = {k: os.path.getmtime(os.path.join(trained, "checkpoints", k))
              for k in os.listdir(os.path.join(trained, "checkpoints"))}
    out = measure_cli(trained, "--n-samples", "4096", "--lanczos", "4096")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "measured step80_none: E/N = " in out.stdout and "one Lanczos step: E/N = " in out.stdout
    c = results.load(os.path.join(trained, "results.h5"))
    m, attrs = c.group("measurements/step80_none"), c.groups["measurements/step80_none"]
    assert attrs["n_samples"] == 4096 and attrs["step"] == 80 and attrs["symmetry"] == "none"
    # energy from the correlations on the bonds equals the measured energy (same samples)
    corr = m["correlation"]
    from_corr = corr[1, 0] + corr[0, 1] + 0.5 * (corr[1, 1] + corr[1, 3])
    assert from_corr == pytest.approx(attrs["energy_per_site"], abs=1e-10)
    assert abs(m["correlation_zz"].sum()) < 1e-12  # Sz = 0 sum rule, sample by sample
    assert abs(corr.sum()) < 0.1  # near a singlet: S(0) = <S_tot^2>/N
    # against ED, at the level the energy error allows: a wave-function error of order eps shifts
    # the energy by eps^2 but an observable by eps, so |dC(r)| is compared with sqrt(rel. error)
    lat = Lattice(4, 2)
    _, vec, states = exact.ground_state(Hamiltonian.build(lat, 1.0, 0.5, True))
    g = exact.correlation_matrix(vec, states, 16, observables.pair_signs(lat, True))
    shift = observables.displaced(lat)
    exact_corr = np.array([g[np.arange(16), shift[r]].mean() for r in range(16)]).reshape(4, 4)
    rel = (attrs["energy_per_site"] + 0.5286202095) / 0.5286202095
    assert 0 < rel < 0.05, f"the trained state is too poor for a meaningful comparison ({rel})"
    # the Lanczos step lowers the energy and the variance and stays above the ground state's
    # energy (its exact value: tests/test_lanczos.py)
    step, err = attrs["lanczos_energy_per_site"], attrs["lanczos_energy_error"]
    assert attrs["lanczos_n_samples"] == 2 * attrs["lanczos_fit_samples"] == 4096 and 0 < err < 2e-3
    assert -0.5286202095 - 4 * err < step < attrs["energy_per_site"] - 4 * err, (step, err)
    assert attrs["lanczos_variance_per_site"] < attrs["variance_per_site"]
    tol = np.sqrt(rel)
    err = np.abs(corr - exact_corr)
    assert np.all(err <= tol + 4 * m["correlation_error"]), (err, tol)
    exact_sq = np.fft.fft2(exact_corr).real
    assert np.all(np.abs(m["structure_factor"] - exact_sq) <= 16 * tol
                  + 4 * m["structure_factor_error"])
    assert np.argmax(m["structure_factor"]) == np.argmax(exact_sq) == 10  # q = (pi, pi)
    after = {k: os.path.getmtime(os.path.join(trained, "checkpoints", k))
             for k in os.listdir(os.path.join(trained, "checkpoints"))}
    assert after == before  # checkpoints untouched


@pytest.mark.mpi
def test_measurement_on_two_ranks_equals_one_rank(trained) -> None:
    one = measure_cli(trained, "--n-samples", "1024", "--name", "one", "--symmetry", "translations",
                      "--lanczos", "256")
    two = measure_cli(trained, "--n-samples", "1024", "--name", "two", "--symmetry", "translations",
                      "--lanczos", "256", launcher=mpirun(2))
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    again = measure_cli(trained, "--n-samples", "1024", "--name", "one", "--symmetry", "translations")
    assert "measured one_2:" in again.stdout  # a second measurement gets its own name
    c = results.load(os.path.join(trained, "results.h5"))
    a, b = c.group("measurements/one"), c.group("measurements/two")
    for key in ("structure_factor", "correlation", "dimer_correlation"):
        np.testing.assert_allclose(b[key], a[key], rtol=0, atol=1e-10, err_msg=key)
    for key in ("energy_per_site", "lanczos_energy_per_site", "lanczos_energy_error",
                "lanczos_alpha_halves"):
        ea, eb = (c.groups[f"measurements/{k}"][key] for k in ("one", "two"))
        np.testing.assert_allclose(eb, ea, rtol=0, atol=1e-12, err_msg=key)


def test_measure_refusals_are_one_line(trained, tmp_path) -> None:
    out = measure_cli(trained, "--n-samples", "100")
    assert out.returncode == 2 and "--n-samples=100: must be a positive multiple" in out.stderr
    out = measure_cli(trained, "--lanczos", "100")
    assert out.returncode == 2 and "--lanczos=100: must be 0 (none) or a positive" in out.stderr
    assert "Traceback" not in out.stderr
    out = measure_cli(tmp_path)
    assert out.returncode == 2 and "does not exist" in out.stderr and "Traceback" not in out.stderr
