"""ViT symmetries, the stable log-cosh, and the projected wave function."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pipeline.models.vit import log_cosh_sum

from conftest import randomized, system_for


def _random_configs(n: int, N: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.array([1] * (N // 2) + [-1] * (N // 2), np.int8)
    return np.stack([rng.permutation(base) for _ in range(n)])


def test_log_cosh_sum_is_stable_and_correct() -> None:
    z = jnp.array([[0.3 + 0.2j, -1.5 + 2.0j, 4.0 - 1.0j, 0.2 + 1.4j, -0.1 - 1.5j],
                   [-700.0 + 0.5j, 800.0 + 3.0j, 0.1 - 0.2j, 2.0 + 0.0j, -3.0 + 1.0j]])
    small = jnp.sum(jnp.log(jnp.cosh(z[0])))
    got = log_cosh_sum(z)
    assert got.dtype == jnp.complex128 and got.shape == (2,)
    np.testing.assert_allclose(got[0].real, small.real, atol=1e-13)
    # the phase is returned modulo 2 pi
    np.testing.assert_allclose(np.exp(1j * (got[0].imag - small.imag)), 1.0, atol=1e-13)
    assert jnp.all(jnp.isfinite(got[1]))
    tail = jnp.sum(jnp.log(jnp.cosh(z[1, 2:])))  # the large ones: log cosh z -> sign(Re z) z - log 2
    np.testing.assert_allclose(got[1].real, 1500.0 - 2 * np.log(2) + tail.real, rtol=1e-14)
    np.testing.assert_allclose(np.exp(1j * (got[1].imag - tail.imag - (-0.5 + 3.0))), 1.0, atol=1e-12)


def test_log_cosh_sum_in_float32_near_the_nodes_of_cosh() -> None:
    """32 features next to a zero of cosh: each factor 1 + exp(-2z) is about 2e-3, their
    product about 1e-86, below float32's range; the sum must still be finite and right."""
    z = np.full((1, 32), 1e-3 + 1j * np.pi / 2)
    want = np.sum(np.log(np.cosh(z)))
    got = log_cosh_sum(jnp.asarray(z, jnp.complex64))
    assert np.isfinite(got[0])
    np.testing.assert_allclose(got[0].real, want.real, rtol=1e-5)


@pytest.mark.parametrize("dx,dy", [(2, 0), (0, 2), (2, 2)])
def test_exact_invariance_under_patch_translations(attention: str, dx: int, dy: int) -> None:
    system = system_for(**{"model.attention": attention, "model.layers": 2})
    params = randomized(system.init_params(1), jax.random.PRNGKey(0))
    s = _random_configs(64)
    moved = s[:, system.lattice.translation(dx, dy)]
    np.testing.assert_allclose(system.logpsi(params, moved), system.logpsi(params, s), atol=1e-12)


def test_single_site_translation_is_not_a_symmetry_without_projection() -> None:
    """The check above can fail: a one-site shift changes the unprojected amplitude."""
    system = system_for()
    params = randomized(system.init_params(1), jax.random.PRNGKey(0))
    s = _random_configs(64)
    moved = s[:, system.lattice.translation(1, 0)]
    assert np.max(np.abs(system.logpsi(params, moved) - system.logpsi(params, s))) > 1e-3


def test_general_factored_weights_break_translation_invariance() -> None:
    system = system_for(**{"model.translation_invariant": False})
    params = randomized(system.init_params(1), jax.random.PRNGKey(0))
    s = _random_configs(32)
    moved = s[:, system.lattice.translation(2, 0)]
    assert np.max(np.abs(system.logpsi(params, moved) - system.logpsi(params, s))) > 1e-3


def test_projected_wave_function_is_invariant_under_the_full_group(attention: str) -> None:
    system = system_for(**{"model.attention": attention, "model.symmetry": "full"})
    params = randomized(system.init_params(2), jax.random.PRNGKey(1))
    s = _random_configs(32)
    ref = system.logpsi(params, s)
    lat = system.lattice
    ops = [lat.translation(1, 0), lat.translation(0, 1), *lat.point_group()]
    for perm in ops:
        np.testing.assert_allclose(system.logpsi(params, s[:, perm]), ref, atol=1e-11)
    np.testing.assert_allclose(system.logpsi(params, -s), ref, atol=1e-11)


def test_parameter_counts() -> None:
    """d=16, h=2, 1 layer, 4 patches of 4 sites: the count follows from the architecture."""
    d, n, b2, h = 16, 4, 4, 2
    block = 2 * 2 * d + d * d * 2 + (d * 4 * d + 4 * d) + (4 * d * d + d)  # 2 LN, W_V W_O, MLP
    common = (b2 * d + d) + block + 2 * d + 2 * (d * d + d)  # embed, block, final LN, head
    assert system_for().n_params(system_for().init_params(0)) == common + h * n
    std = system_for(**{"model.attention": "standard"})
    assert std.n_params(std.init_params(0)) == common + 2 * d * d + h * n


def test_float32_arithmetic_is_the_same_state_to_single_precision(attention: str) -> None:
    """model.dtype=float32 evaluates the same float64 parameters in single precision: log psi
    (complex128 either way) and its gradient agree with float64 to single-precision round-off,
    and the exact energy of the state to 1e-6 per site; the differences are not zero, so the
    passes did run in float32."""
    from pipeline import exact, sr

    keys = {"model.attention": attention, "model.symmetry": "translations"}
    s64, s32 = (system_for(**keys, **{"model.dtype": dt}) for dt in ("float64", "float32"))
    params = randomized(s64.init_params(3), jax.random.PRNGKey(2))
    s = jnp.asarray(_random_configs(64))
    lp64, lp32 = s64.logpsi(params, s), s32.logpsi(params, s)
    assert lp32.dtype == jnp.complex128
    gap = np.max(np.abs(lp32 - lp64))
    assert 1e-9 < gap < 1e-4, gap
    j64, j32 = (sr.jacobian(x.logpsi, params, s) for x in (s64, s32))
    assert 1e-9 < np.max(np.abs(j32 - j64)) < 1e-4 * np.max(np.abs(j64))
    h, states = exact.sparse_hamiltonian(s64.hamiltonian)
    e64, e32 = (exact.expectation(h, exact.state_vector(x.logpsi, states, 16)(params), 16)
                for x in (s64, s32))
    assert abs(e32["energy_per_site"] - e64["energy_per_site"]) < 1e-6
