"""ViT symmetries, the stable log-cosh, and the projected wave function."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pipeline.models.vit import log_cosh

from conftest import randomized, system_for


def _random_configs(n: int, N: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.array([1] * (N // 2) + [-1] * (N // 2), np.int8)
    return np.stack([rng.permutation(base) for _ in range(n)])


def test_log_cosh_is_stable_and_correct() -> None:
    z = jnp.array([0.3 + 0.2j, -1.5 + 2.0j, 4.0 - 1.0j, -700.0 + 0.5j, 800.0 + 3.0j])
    small = jnp.log(jnp.cosh(z[:3]))
    np.testing.assert_allclose(log_cosh(z[:3]), small, atol=1e-13)
    big = log_cosh(z[3:])
    assert jnp.all(jnp.isfinite(big))
    np.testing.assert_allclose(big.real, jnp.abs(z[3:].real) - np.log(2), rtol=1e-12)


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
