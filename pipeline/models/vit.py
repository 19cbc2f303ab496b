"""The Vision-Transformer wave function: patches -> pre-LN encoder -> sum -> complex log-cosh head."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .. import backend  # noqa: F401  (device pinning, float64)
from ..lattice import Lattice
from .attention import DT, FactoredAttention, StandardAttention


def log_cosh_sum(z: jnp.ndarray) -> jnp.ndarray:
    """sum_k log cosh(z_k) over the last axis of complex z, in complex128.

    Written as sum_k z_k - K log 2 + log prod_k (1 + exp(-2 z_k)) after z_k -> -z_k where
    Re z_k < 0 (cosh is even), so no exponential grows and each factor lies in the disc |w - 1|
    <= 1: one complex logarithm per configuration instead of one per feature (the per-feature
    logarithms were a fifth of a 6x6 forward pass on CPU). The sum of the z_k and the product
    are taken in float64 whatever the pass's dtype (in float32, a product of 32 factors near a
    node of cosh could underflow). The imaginary part, the phase of psi, comes
    back modulo 2 pi (the principal value of the product's logarithm).
    """
    z = jnp.where(z.real >= 0, z, -z)
    factors = (1.0 + jnp.exp(-2.0 * z)).astype(jnp.complex128)  # the product cannot underflow
    return (jnp.sum(z.astype(jnp.complex128), axis=-1) - z.shape[-1] * np.log(2.0)
            + jnp.log(jnp.prod(factors, axis=-1)))


class EncoderBlock(nn.Module):
    """x <- x + Attention(LN(x)); x <- x + MLP(LN(x)) with a d -> 4d -> d GELU MLP."""

    attention: nn.Module
    dtype: jnp.dtype = DT

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        d, dt = x.shape[-1], self.dtype
        x = x + self.attention(nn.LayerNorm(dtype=dt, param_dtype=DT)(x))
        y = nn.LayerNorm(dtype=dt, param_dtype=DT)(x)
        y = nn.Dense(4 * d, dtype=dt, param_dtype=DT)(y)
        y = nn.Dense(d, dtype=dt, param_dtype=DT)(nn.gelu(y))
        return x + y


class ViT(nn.Module):
    """log psi(s) for a batch s of shape (..., N) with entries +-1.

    attention: 'factored' or 'standard'; translation_invariant applies to factored weights (the
    standard kind always uses a relative-position bias). All parameters are real float64; the
    output is complex128. dtype: the arithmetic of the pass ('float64', or 'float32': local
    energies a quarter faster on CPU, log psi then carries single-precision round-off, ~1e-5).
    """

    L: int
    patch: int
    d: int
    heads: int
    layers: int
    attention: str = "factored"
    translation_invariant: bool = True
    dtype: str = "float64"

    @nn.compact
    def __call__(self, s: jnp.ndarray) -> jnp.ndarray:
        lat = Lattice(self.L, self.patch)
        disp = lat.patch_displacement
        dt = jnp.dtype(self.dtype)
        x = s.astype(dt)[..., lat.patch_sites]  # (..., n, b*b)
        x = nn.Dense(self.d, dtype=dt, param_dtype=DT, name="embed")(x)
        for layer in range(self.layers):
            if self.attention == "factored":
                att = FactoredAttention(self.heads, disp, self.translation_invariant, dt,
                                        name=f"attention_{layer}")
            else:
                att = StandardAttention(self.heads, disp, dt, name=f"attention_{layer}")
            x = EncoderBlock(att, dt, name=f"block_{layer}")(x)
        z = nn.LayerNorm(dtype=dt, param_dtype=DT, name="final_norm")(x.sum(axis=-2))
        head_init = nn.initializers.normal(stddev=1.0 / self.d)
        head = lambda name: nn.Dense(self.d, dtype=dt, param_dtype=DT, kernel_init=head_init,  # noqa: E731
                                     name=name)
        return log_cosh_sum(head("head_re")(z) + 1j * head("head_im")(z))


def n_params(params) -> int:
    return int(sum(np.size(p) for p in jax.tree_util.tree_leaves(params)))
