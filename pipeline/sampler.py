"""Metropolis sampling of |psi|^2 with spin-exchange moves (Sz is conserved).

A proposal picks one of the m(s) exchange bonds whose two spins differ, uniformly, and swaps them:
every proposal costs one forward pass and every one can move (picking among all bonds wastes the
pass on aligned pairs, a third to a half of them). The proposal is not symmetric when the swap
changes the number of anti-aligned bonds, so the move is accepted with the Metropolis-Hastings
probability min(1, |psi(s')/psi(s)|^2 m(s)/m(s')), which keeps |psi|^2 stationary. One sweep is
N proposals.

Randomness is derived, never drawn from global state: the key of chain g at step t for purpose p
is fold_in(fold_in(fold_in(PRNGKey(seed), p), t), g). A run with C chains in total therefore
produces the same samples on any number of ranks, and a resumed run the same as an uninterrupted
one. The chains themselves (the only sampler state) persist between steps and in checkpoints.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import backend  # noqa: F401  (device pinning, float64)
from .budget import rows_per_chunk

# Purposes of the random streams (the second fold_in). FINAL_BURN_IN: the sweeps discarded before
# a measurement, under the parameters being measured.
INIT, THERMALIZE, STEP, FINAL, FINAL_BURN_IN = 0, 1, 2, 3, 4


class Samples(NamedTuple):
    """Samples of one step: configurations (S*C, N) ordered sample-major, log psi, acceptance."""

    s: jax.Array
    logpsi: jax.Array
    accepted: jax.Array  # accepted exchanges, summed over local chains
    proposed: jax.Array  # proposals whose spins differed, summed over local chains


@partial(jax.jit, static_argnames=("seed",))
def chain_keys(seed: int, purpose: int, step: int, global_ids: jax.Array, block: int = 0) -> jax.Array:
    """One key per chain: fold_in(seed) -> purpose -> step [-> block, if not 0] -> global chain
    index. Blocks are the successive sampler calls of one measurement drawn piece by piece.
    Compiled once per seed (the step and block are arguments, not constants)."""
    k = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), purpose), step)
    k = jnp.where(block != 0, jax.random.fold_in(k, block), k)
    return jax.vmap(lambda g: jax.random.fold_in(k, g))(global_ids)


@partial(jax.jit, static_argnames=("n_sites",))
def init_chains(keys: jax.Array, n_sites: int) -> jax.Array:
    """Random Sz=0 configurations (int8), one per key."""
    base = jnp.where(jnp.arange(n_sites) < n_sites // 2, 1, -1).astype(jnp.int8)
    return jax.vmap(lambda k: jax.random.permutation(k, base))(keys)


@dataclass(frozen=True, eq=False)
class ExchangeSampler:
    """Exchange-move Metropolis over `bonds`, `sweep` proposals between recorded samples. The
    chains run in groups of at most `group` (a divisor of their number), one group after the
    other: on CPU a group's forward passes then stay in cache (`budget.forward_chunk`). Every
    chain's moves depend on its own key only, so the grouping does not change the samples."""

    logpsi: Callable
    bonds: np.ndarray
    sweep: int
    group: int = 0  # 0: all chains at once

    def run(self, params, chains: jax.Array, keys: jax.Array, n_per_chain: int) -> tuple[jax.Array, Samples]:
        """Advance every chain by n_per_chain sweeps, recording one sample after each."""
        group = rows_per_chunk(chains.shape[0], self.group)
        return _run(self.logpsi, jnp.asarray(self.bonds), self.sweep, n_per_chain, group, params,
                    chains, keys)


@partial(jax.jit, static_argnames=("logpsi", "sweep", "n_per_chain", "group"))
def _run(logpsi: Callable, bonds: jax.Array, sweep: int, n_per_chain: int, group: int, params,
         chains: jax.Array, keys: jax.Array) -> tuple[jax.Array, Samples]:
    n_chains, n_sites = chains.shape
    if group == n_chains:
        chains, s, lp, acc, prop = _sweeps(logpsi, bonds, sweep, n_per_chain, params, chains, keys)
    else:
        split = lambda x: x.reshape(n_chains // group, group, *x.shape[1:])  # noqa: E731
        chains, s, lp, acc, prop = jax.lax.map(
            lambda ck: _sweeps(logpsi, bonds, sweep, n_per_chain, params, *ck),
            (split(chains), split(keys)))
        # (groups, samples, group, ...) -> (samples, chains, ...): sample-major, chains in order
        chains, acc, prop = chains.reshape(n_chains, n_sites), acc.sum(), prop.sum()
        s, lp = (x.swapaxes(0, 1).reshape(n_per_chain, n_chains, *x.shape[3:]) for x in (s, lp))
    return chains, Samples(s.reshape(-1, n_sites), lp.reshape(-1), acc, prop)


def _sweeps(logpsi: Callable, bonds: jax.Array, sweep: int, n_per_chain: int, params,
            chains: jax.Array, keys: jax.Array):
    """n_per_chain sweeps of `chains`: (chains, samples (S, C, N), log psi (S, C), accepted,
    proposed)."""
    n_chains = chains.shape[0]
    n_prop = sweep * n_per_chain
    rows = jnp.arange(n_chains)

    def draws(k):
        kb, ku = jax.random.split(k)
        return (jax.random.uniform(kb, (n_prop,), dtype=jnp.float64),
                jax.random.uniform(ku, (n_prop,), dtype=jnp.float64))

    pick, uniform = jax.vmap(draws)(keys)  # (C, T) each

    def anti_aligned(s):
        return s[:, bonds[:, 0]] != s[:, bonds[:, 1]]  # (C, B)

    def propose(t, carry):
        s, lp, differ, acc, prop = carry
        m = differ.sum(axis=1)
        # the k-th anti-aligned bond, k uniform in [0, m): the first bond whose running count exceeds k
        k = jnp.floor(pick[:, t] * m).astype(m.dtype)
        b = bonds[jnp.argmax(jnp.cumsum(differ, axis=1) > k[:, None], axis=1)]
        si, sj = s[rows, b[:, 0]], s[rows, b[:, 1]]
        s_new = s.at[rows, b[:, 0]].set(sj).at[rows, b[:, 1]].set(si)
        differ_new = anti_aligned(s_new)
        m_new = differ_new.sum(axis=1)
        lp_new = logpsi(params, s_new)
        log_ratio = 2.0 * (lp_new.real - lp.real) + jnp.log(m) - jnp.log(m_new)
        ok = (m > 0) & (jnp.log(uniform[:, t]) < log_ratio)
        s = jnp.where(ok[:, None], s_new, s)
        return (s, jnp.where(ok, lp_new, lp), jnp.where(ok[:, None], differ_new, differ), acc + ok.sum(),
                prop + (m > 0).sum())

    def one_sample(carry, k):
        carry = jax.lax.fori_loop(k * sweep, (k + 1) * sweep, propose, carry)
        return carry, (carry[0], carry[1])

    zero = jnp.zeros((), jnp.int64)
    init = (chains, logpsi(params, chains), anti_aligned(chains), zero, zero)
    (chains, _, _, acc, prop), (s, lp) = jax.lax.scan(one_sample, init, jnp.arange(n_per_chain))
    return chains, s, lp, acc, prop
