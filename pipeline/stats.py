"""Energy statistics over all ranks' samples: mean, autocorrelation-aware error, variance, R-hat.

Local energies arrive sample-major, (S * C_local,), from C_local chains with S samples each. The
error bar is the spread of the per-chain means (a blocking estimate that accounts for correlation
along a chain; with S = 1 it is the plain standard error). R-hat is the split-chain Gelman-Rubin
statistic (NaN when chains hold fewer than 4 samples).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from . import dist


class Stats(NamedTuple):
    mean: jax.Array  # complex mean of E_loc (total energy)
    error: jax.Array  # standard error of the real part
    variance: jax.Array  # Var(E_loc) of the total energy
    r_hat: jax.Array


def _global_mean(x: jax.Array, n: int) -> jax.Array:
    return dist.allreduce_sum(x.sum(axis=0)) / n


def energy_stats(eloc: jax.Array, n_per_chain: int, n_chains_total: int) -> Stats:
    """Statistics of local energies; call inside jit (uses all-reduces)."""
    n_total = n_per_chain * n_chains_total
    mean = _global_mean(eloc, n_total)
    variance = _global_mean(jnp.abs(eloc - mean) ** 2, n_total)
    per_chain = eloc.real.reshape(n_per_chain, -1)
    error = _chain_error(per_chain, mean.real, n_chains_total)
    return Stats(mean, error, variance, _split_r_hat(per_chain, n_chains_total))


def _chain_error(per_chain: jax.Array, mean: jax.Array, n_chains_total: int) -> jax.Array:
    """Standard error of `mean` from the spread of the chain means of (S, C_local, ...) values."""
    chain_means = per_chain.mean(axis=0)
    var_means = (_global_mean((chain_means - mean) ** 2, n_chains_total)
                 * n_chains_total / max(n_chains_total - 1, 1))
    return jnp.sqrt(var_means / n_chains_total)


def mean_and_error(values: jax.Array, n_per_chain: int, n_chains_total: int
                   ) -> tuple[jax.Array, jax.Array]:
    """Mean and chain-blocked standard error over all ranks of sample-major real values
    (S * C_local, ...) of any shape; call inside jit (uses all-reduces)."""
    mean = _global_mean(values, n_per_chain * n_chains_total)
    per_chain = values.reshape(n_per_chain, -1, *values.shape[1:])
    return mean, _chain_error(per_chain, mean, n_chains_total)


def _split_r_hat(x: jax.Array, n_chains_total: int) -> jax.Array:
    """Split R-hat from (S, C_local) samples; NaN for S < 4."""
    S = x.shape[0]
    if S < 4:
        return jnp.asarray(jnp.nan)
    h = S // 2
    halves = jnp.concatenate([x[:h], x[S - h:S]], axis=1)  # (h, 2C)
    m = 2 * n_chains_total
    means = halves.mean(axis=0)
    grand = _global_mean(means, m)
    W = _global_mean(halves.var(axis=0, ddof=1), m)
    B_over_n = _global_mean((means - grand) ** 2, m) * m / (m - 1)
    return jnp.sqrt(((h - 1) / h * W + B_over_n) / W)
