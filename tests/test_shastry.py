"""The paper's analytic argument on the Shastry-Sutherland lattice: a translation-invariant factored
ViT with 2 x 2 patches represents the exact dimer-singlet ground state (E/N = -3/8 J', zero
variance), with the dimers that straddle patches joined through position-only attention.

The weights are set by hand (`dimer_weights`):
  embedding   each patch -> [c, -c, s_0, -s_0, ..., s_3, -s_3]: mean zero and fixed variance, so
              the pre-attention LayerNorm is an exact linear map (c keeps the final one linear)
  attention   head 0 copies spin k2 of the patch at displacement (1, 1) on the 2 x 2 patch grid,
              alpha_0(r) = [r = (1, 1)]: the partner of this patch's spin k1 in an odd dimer
  MLP         GELU(+-G t) with t = s_a + s_b for both dimers of the patch: |t| = 2 G exactly when a
              dimer is aligned, 0 otherwise (the tanh GELU saturates to machine precision)
  head        u_0 = K - lambda * (aligned dimers) + i pi * (dimers whose first site is down):
              log cosh u_0 = log prod_d (s_i - s_j) / 2 up to a constant and e^{-lambda} per
              aligned dimer
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pipeline import exact
from pipeline.hamiltonian import local_energies
from pipeline.state import VariationalState

from conftest import system_for

C, G, LAMBDA, K = 1e6, 20.0, 40.0, 400.0
SS = {"lattice.kind": "shastry_sutherland", "hamiltonian.J1": 0.5, "hamiltonian.J2": 1.0,
      "model.d": 16, "model.heads": 2, "model.layers": 1}


def _zero(params):
    return jax.tree_util.tree_map(np.zeros_like, params)


def dimer_weights(system) -> dict:
    """Parameters of the 4x4, b = 2, d = 16, 2-head, 1-layer factored ViT that give the
    product of dimer singlets."""
    p = jax.tree_util.tree_map(np.array, _zero(system.init_params(0)))
    d, n = 16, system.lattice.n_patches
    s_ch = lambda k: 2 + 2 * k  # noqa: E731  channel of +s_k; +1 holds -s_k
    P2, A = 10, 12  # partner's spin k2 (+-), aligned count (+-)
    # embedding: a patch's 4 spins (local k = ix * 2 + iy) and a large constant pair
    p["embed"]["bias"][:2] = [C, -C]
    for k in range(4):
        p["embed"]["kernel"][k, s_ch(k)], p["embed"]["kernel"][k, s_ch(k) + 1] = 1.0, -1.0
    for ln in ("LayerNorm_0", "LayerNorm_1"):
        p["block_0"][ln]["scale"][:] = 1.0
    p["final_norm"]["scale"][:] = 1.0
    # LayerNorm before attention: channels are +-c and +-s: variance exactly (2c^2 + 8) / d
    sigma1 = np.sqrt((2 * C ** 2 + 8) / d + 1e-6)
    att = p["attention_0"]
    att["W_V"]["kernel"][s_ch(2), 0] = sigma1  # head 0, component 0 = s_k2 of the patch
    att["alpha"][0, 3] = 1.0  # displacement index dx * 2 + dy = 3: (1, 1)
    att["W_O"]["kernel"][0, P2], att["W_O"]["kernel"][0, P2 + 1] = 1.0, -1.0
    # LayerNorm before the MLP: now also +-partner: variance (2c^2 + 10) / d
    sigma2 = np.sqrt((2 * C ** 2 + 10) / d + 1e-6)
    mlp0, mlp1 = p["block_0"]["Dense_0"], p["block_0"]["Dense_1"]
    for unit, (a, b) in enumerate([(s_ch(0), s_ch(3)), (s_ch(1), P2)]):  # inner, odd dimer
        for sign in (1, -1):
            h = 2 * unit + (sign < 0)
            mlp0["kernel"][a, h] = mlp0["kernel"][b, h] = sign * G * sigma2
            mlp1["kernel"][h, A], mlp1["kernel"][h, A + 1] = 1 / (2 * G), -1 / (2 * G)
    # final LayerNorm of the patch sum: dominated by the +-n c pair, linear to ~1e-11
    sigma_f = np.sqrt(2 * (n * C) ** 2 / d)
    p["head_re"]["kernel"][A, 0], p["head_re"]["bias"][0] = -LAMBDA * sigma_f, K
    for k in (0, 1):  # first sites of the patch's dimers: k0 (inner), k1 (odd)
        p["head_im"]["kernel"][s_ch(k), 0] = -np.pi / 2 * sigma_f
    p["head_im"]["bias"][0] = np.pi * n
    return jax.tree_util.tree_map(jnp.asarray, p)


def singlet_product(lattice, s: np.ndarray) -> np.ndarray:
    """prod over dimers of (s_i - s_j) / 2: the exact ground state's amplitudes."""
    d = lattice.bonds2
    return np.prod((s[:, d[:, 0]] - s[:, d[:, 1]]) / 2, axis=1)


def test_factored_vit_represents_the_dimer_singlet_ground_state() -> None:
    system = system_for(**SS)
    params = dimer_weights(system)
    states = exact.sz0_basis(16)
    s = exact.configs(states, 16)
    lp = np.asarray(system.logpsi(params, s))
    psi = np.exp(lp - lp.real.max())
    want = singlet_product(system.lattice, s.astype(float))
    good = want != 0
    # the same state: amplitude ratios equal on the singlet configurations, others suppressed
    ratio = psi[good] / want[good]
    np.testing.assert_allclose(ratio / ratio[0], 1.0, atol=1e-9)
    assert np.max(np.abs(psi[~good])) < 1e-15 * np.max(np.abs(psi))
    # exact energy over the whole Sz = 0 basis: -3/8 J' per site
    h, _ = exact.sparse_hamiltonian(system.hamiltonian)
    energy = np.vdot(psi, h @ psi).real / np.vdot(psi, psi).real / 16
    assert energy == pytest.approx(-0.375, abs=1e-9)
    # sampled: every local energy is -3/8 J' N (zero variance), measured on Metropolis samples
    vs = VariationalState.fresh(system, params)
    vs, smp = vs.sample(4, 3, 0)
    eloc = np.asarray(local_energies(system.hamiltonian, system.logpsi, params, smp.s, smp.logpsi))
    assert np.all(singlet_product(system.lattice, np.asarray(smp.s, float)) != 0)
    np.testing.assert_allclose(eloc / 16, -0.375, atol=1e-6)
    assert np.var(eloc.real) / 16 < 1e-12


def test_without_attention_the_straddling_dimers_are_missed() -> None:
    """The same weights with alpha = 0: the odd dimers (across patches) are not enforced, and the
    state is not the ground state: attention between patches is what the argument needs."""
    system = system_for(**SS)
    params = dimer_weights(system)
    params["attention_0"]["alpha"] = jnp.zeros_like(params["attention_0"]["alpha"])
    s = exact.configs(exact.sz0_basis(16), 16)
    lp = np.asarray(system.logpsi(params, s))
    psi = np.exp(lp - lp.real.max())
    h, _ = exact.sparse_hamiltonian(system.hamiltonian)
    energy = np.vdot(psi, h @ psi).real / np.vdot(psi, psi).real / 16
    assert energy > -0.375 + 1e-2
