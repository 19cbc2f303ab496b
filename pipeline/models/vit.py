"""The Vision-Transformer wave function: patches -> pre-LN encoder -> sum -> complex log-cosh head."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .. import backend  # noqa: F401  (device pinning, float64)
from ..lattice import Lattice
from .attention import DT, FactoredAttention, StandardAttention


def log_cosh(z: jnp.ndarray) -> jnp.ndarray:
    """log cosh(z) for complex z, stable for large |Re z|: uses cosh(z) = cosh(-z)."""
    sgn = jnp.where(z.real >= 0, 1.0, -1.0)
    z = sgn * z
    return z + jnp.log1p(jnp.exp(-2.0 * z)) - np.log(2.0)


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
        lc = log_cosh(head("head_re")(z) + 1j * head("head_im")(z))
        return jnp.sum(lc.astype(jnp.complex128), axis=-1)


def n_params(params) -> int:
    return int(sum(np.size(p) for p in jax.tree_util.tree_leaves(params)))
