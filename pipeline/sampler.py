"""Sampling of |psi|^2 in the Sz = 0 sector: Metropolis with spin-exchange moves (`ExchangeSampler`),
or, for at most 20 sites, independent draws over the whole sector (`ExactSampler`).

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
from .exact import configs, sparse_hamiltonian
from .hamiltonian import Hamiltonian, apply_chunked

# Purposes of the random streams (the second fold_in). FINAL_BURN_IN: the sweeps discarded before
# a measurement, under the parameters being measured.
INIT, THERMALIZE, STEP, FINAL, FINAL_BURN_IN = 0, 1, 2, 3, 4
# A Lanczos step's measurement (`lanczos`): the guided chains' burn-in and samples.
LANCZOS_BURN_IN, LANCZOS_STEP = 5, 6
# A warm start's choice of each chain's first configuration (`ordered_starts`).
START = 7


class Samples(NamedTuple):
    """Samples of one step: configurations (S*C, N) ordered sample-major, log psi, acceptance."""

    s: jax.Array
    logpsi: jax.Array
    accepted: jax.Array  # accepted exchanges, summed over local chains
    proposed: jax.Array  # proposals whose spins differed, summed over local chains
    eloc: jax.Array | None = None  # complex local energies, where the sampler has them (exact)


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


def ordered_patterns(coords: np.ndarray) -> np.ndarray:
    """The product states of the square lattice's two classical orders and their spin flips,
    from the sites' (x, y): Neel (-1)^(x+y) and the columnar stripes (-1)^x, (-1)^y; (6, N) int8,
    all in the Sz = 0 sector for even L."""
    x, y = coords.T
    base = np.stack([(-1) ** (x + y), (-1) ** x, (-1) ** y])
    return np.concatenate([base, -base]).astype(np.int8)


@partial(jax.jit, static_argnames=("logpsi", "chunk"))
def ordered_starts(logpsi: Callable, params, chains: jax.Array, patterns: jax.Array,
                   keys: jax.Array, chunk: int = 0) -> jax.Array:
    """Each chain's first configuration for trained parameters: its own (random) one or one of
    `patterns`, drawn with probability proportional to |psi|^2 among these 1 + K candidates
    (Gumbel-max with the chain's key). From random configurations an ordered state's chains
    coarsen their domains slowly under local exchanges (a trained 6x6 state: E/N about 5e-3
    too high after 20 sweeps, 2e-3 after 40, `scripts/bench_burnin`); from the pattern of its order
    they are at equilibrium within 5 sweeps. A nearly uniform |psi|^2 (a fresh network) mixes
    fast from any start."""
    n_chains, n_patterns = chains.shape[0], patterns.shape[0]
    own = 2.0 * apply_chunked(logpsi, params, chains, chunk).real  # (C,)
    ordered = 2.0 * logpsi(params, patterns).real  # (K,)
    weights = jnp.concatenate([own[:, None], jnp.broadcast_to(ordered, (n_chains, n_patterns))], 1)
    noise = jax.vmap(lambda k: jax.random.gumbel(k, (1 + n_patterns,), weights.dtype))(keys)
    pick = jnp.argmax(weights + noise, axis=1)  # 0: the chain's own configuration
    return jnp.where((pick == 0)[:, None], chains, patterns[jnp.maximum(pick - 1, 0)])


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


@dataclass(frozen=True, eq=False)
class ExactSampler:
    """Independent draws from |psi|^2 over the whole Sz = 0 sector (small lattices: 12870 states
    on 4x4). Each call evaluates log psi on every basis configuration (`group` at a time) and
    draws every chain's samples by inverse transform sampling with that chain's own key, so the
    samples do not depend on the rank count (every rank evaluates the same table). The local
    energies come with the samples: E_loc(x) = sum_y H_xy psi(y) / psi(x) over the nonzeros of
    the sparse Hamiltonian (`exact.sparse_hamiltonian`, the network's basis), with no forward pass
    per connected configuration. No burn-in and no autocorrelation; a chain holds its last draw
    only. Acceptance is 1 by construction."""

    logpsi: Callable
    basis: jax.Array  # (D, N) int8
    rows: jax.Array  # nonzeros of H, diagonal included
    cols: jax.Array
    vals: jax.Array
    group: int

    @classmethod
    def build(cls, logpsi: Callable, ham: Hamiltonian, group: int) -> "ExactSampler":
        h, states = sparse_hamiltonian(ham)
        h = h.tocoo()  # rows sorted (from CSR)
        return cls(logpsi, jnp.asarray(configs(states, ham.n_sites)), jnp.asarray(h.row),
                   jnp.asarray(h.col), jnp.asarray(h.data), group)

    def run(self, params, chains: jax.Array, keys: jax.Array, n_per_chain: int) -> tuple[jax.Array, Samples]:
        """n_per_chain independent samples per chain; the chains become their last samples."""
        return _draw(self.logpsi, n_per_chain, self.group, self.basis, self.rows, self.cols,
                     self.vals, params, keys)


@partial(jax.jit, static_argnames=("logpsi", "n_per_chain", "group"))
def _draw(logpsi: Callable, n_per_chain: int, group: int, basis: jax.Array, rows: jax.Array,
          cols: jax.Array, vals: jax.Array, params, keys: jax.Array) -> tuple[jax.Array, Samples]:
    lp = apply_chunked(logpsi, params, basis, group)
    cdf = jnp.cumsum(jnp.exp(2.0 * (lp.real - lp.real.max())))
    u = jax.vmap(lambda k: jax.random.uniform(k, (n_per_chain,), dtype=jnp.float64))(keys)
    idx = jnp.minimum(jnp.searchsorted(cdf, u.T * cdf[-1], side="right"), len(cdf) - 1)  # (S, C)
    eloc = jax.ops.segment_sum(vals * jnp.exp(lp[cols] - lp[rows]), rows,
                               num_segments=len(cdf), indices_are_sorted=True)
    s = basis[idx]
    n = jnp.asarray(idx.size, jnp.int64)
    return s[-1], Samples(s.reshape(-1, basis.shape[1]), lp[idx].reshape(-1), n, n,
                          eloc[idx].reshape(-1))
