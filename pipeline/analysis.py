"""Attention maps of a ViT on samples, and how much they depend on the input.

For layer l and head h, A(s) is the (n x n) map over patches: the softmax weights of standard
attention on configuration s, or the fixed alpha_ij of factored attention. On a batch of samples
(all ranks together) we report

  mean map    <A>_ij (mean over samples)
  dependence  D = sqrt(< ||A(s) - <A>||_F^2 >) / ||<A>||_F   (0 exactly for factored attention)
  profile     a(r) = mean over pairs (i, j) with r_i - r_j = r of <A>_ij

The displacement r is indexed as the model indexes its translation-invariant weights: r = dx * m +
dy on the m x m periodic patch grid (m = L / b), the displacement of the attending patch i from the
attended patch j. So the profile of a translation-invariant factored model *is* its alpha(r).
"""
from __future__ import annotations

import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from . import dist

FIELDS = ("dependence", "profile", "mean_map")


def maps(model, params, s: jax.Array) -> list[jax.Array]:
    """Attention maps per layer: (B, heads, n, n) when they depend on the input s (B, N), or
    (heads, n, n) when they do not (factored attention)."""
    _, state = model.apply({"params": params}, s, mutable=["intermediates"])
    sown = state.get("intermediates", {})
    return [sown[f"attention_{layer}"]["attention"][0] for layer in range(model.layers)]


@partial(jax.jit, static_argnames=("model", "n_total"))
def _summary(model, params, s: jax.Array, displacement: jax.Array, n_total: int) -> dict:
    """mean_map (layers, heads, n, n), dependence (layers, heads), profile (layers, heads, n)."""
    means, deps = [], []
    for a in maps(model, params, s):
        if a.ndim == 3:  # input-independent: the map itself, D = 0 exactly
            means.append(a)
            deps.append(jnp.zeros(a.shape[0], a.dtype))
            continue
        mean = dist.allreduce_sum(a.sum(axis=0)) / n_total
        spread = dist.allreduce_sum(jnp.sum((a - mean) ** 2, axis=(0, 2, 3))) / n_total
        means.append(mean)
        deps.append(jnp.sqrt(spread) / jnp.sqrt(jnp.sum(mean ** 2, axis=(1, 2))))
    mean_map = jnp.stack(means)
    *lh, n, _ = mean_map.shape  # every displacement r has n pairs (i, j)
    profile = jnp.zeros((*lh, n), mean_map.dtype).at[..., displacement.ravel()].add(
        mean_map.reshape(*lh, n * n)) / n
    return {"dependence": jnp.stack(deps), "profile": profile, "mean_map": mean_map}


class AttentionProbe:
    """Measures the attention maps of the current parameters on the current chain positions
    (every rank passes its own chains; the result is the same on all ranks)."""

    def __init__(self, model, displacement: np.ndarray, n_chains_total: int) -> None:
        self.model, self.n_total = model, n_chains_total
        self.displacement = jnp.asarray(displacement)
        self.seconds = 0.0  # time of the last call

    @property
    def tables(self) -> dict[str, tuple[type, tuple[int, ...]]]:
        """The /attention datasets of results.h5: name -> (dtype, row shape)."""
        n = len(self.displacement)
        lh = (self.model.layers, self.model.heads)
        shapes = {"dependence": lh, "profile": lh + (n,), "mean_map": lh + (n, n)}
        return {"attention/step": (np.int64, ()), "attention/seconds": (np.float64, ()),
                **{f"attention/{k}": (np.float64, v) for k, v in shapes.items()}}

    def __call__(self, params, chains: jax.Array) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        out = _summary(self.model, params, chains, self.displacement, self.n_total)
        out = {k: np.asarray(v) for k, v in out.items()}
        self.seconds = time.perf_counter() - t0
        return out
