"""The two attention kinds of the ViT: factored (positions only) and standard (query-key softmax).

Both act on x of shape (..., n, d) for n patches and mix values V = x W_V per head; W_O mixes
heads back. `displacement` is the (n, n) table of periodic patch displacements r_i - r_j used by
the translation-invariant weights and by the relative-position bias. Parameters are float64;
`dtype` is the arithmetic (model.dtype).
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from .. import backend  # noqa: F401  (device pinning, float64)

DT = jnp.float64


def _dense(d: int, dtype: jnp.dtype):
    """A bias-free d -> d map with float64 parameters computing in `dtype`, by name."""
    return lambda name: nn.Dense(d, use_bias=False, dtype=dtype, param_dtype=DT, name=name)


def _split_heads(v: jnp.ndarray, heads: int) -> jnp.ndarray:
    return v.reshape(*v.shape[:-1], heads, v.shape[-1] // heads)


def _heads_first(v: jnp.ndarray, heads: int) -> jnp.ndarray:
    """(..., n, d) -> (..., heads, n, d / heads): batched matrix products with the batch axes
    leading, which XLA on CPU runs 4.5x faster than the same einsum with heads after n."""
    return jnp.swapaxes(_split_heads(v, heads), -2, -3)


class FactoredAttention(nn.Module):
    """A_i = sum_j alpha_ij V_j with learned position-only weights (no queries, no keys, no softmax).

    translation_invariant: alpha_ij = alpha(r_i - r_j) (heads x n parameters), otherwise a free
    (heads x n x n) table. The (heads, n, n) weights are sown as 'attention' like the standard
    kind's maps, without a batch axis: they do not depend on the input.
    """

    heads: int
    displacement: np.ndarray
    translation_invariant: bool = True
    dtype: jnp.dtype = DT

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        n, d = x.shape[-2:]
        init = nn.initializers.normal(stddev=1.0 / np.sqrt(n))
        if self.translation_invariant:
            a = self.param("alpha", init, (self.heads, n), DT)
            alpha = a[:, self.displacement]
        else:
            alpha = self.param("alpha", init, (self.heads, n, n), DT)
        self.sow("intermediates", "attention", alpha)  # (heads, n, n): the same for every input
        dense = _dense(d, self.dtype)
        v = _split_heads(dense("W_V")(x), self.heads)
        out = jnp.einsum("hij,...jhk->...ihk", alpha.astype(self.dtype), v).reshape(*x.shape[:-1], d)
        return dense("W_O")(out)


class StandardAttention(nn.Module):
    """softmax_j(q_i.k_j / sqrt(d/h) + B(r_i - r_j)) V_j with a learned relative-position bias.

    The attention maps (..., heads, n, n) are sown into the 'intermediates' collection as
    'attention' for the input-dependence diagnostic (`pipeline.analysis`).
    The bias starts random, not zero: a zero bias starts from uniform attention and trains slowly.
    """

    heads: int
    displacement: np.ndarray
    dtype: jnp.dtype = DT

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        n, d = x.shape[-2:]
        dh = d // self.heads
        dense = _dense(d, self.dtype)
        q = _heads_first(dense("W_Q")(x), self.heads)
        k = _heads_first(dense("W_K")(x), self.heads)
        v = _heads_first(dense("W_V")(x), self.heads)
        bias = self.param("bias", nn.initializers.normal(stddev=1.0), (self.heads, n), DT)
        logits = (q @ jnp.swapaxes(k, -1, -2) / float(np.sqrt(dh))
                  + bias[:, self.displacement].astype(self.dtype))
        w = nn.softmax(logits, axis=-1)
        self.sow("intermediates", "attention", w)
        out = jnp.swapaxes(w @ v, -2, -3).reshape(*x.shape[:-1], d)
        return dense("W_O")(out)
