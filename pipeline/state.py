"""The variational state: parameters, log psi (projected or not), the sampler and this rank's chains.

It knows how to sample |psi|^2, compute local energies and estimate any observable over all
ranks' samples; training, the final measurement and scripts use it alike. It is immutable:
`sample` and `thermalize` return a new state with advanced chains, `replace` one with new
parameters.

Randomness: the key of chain g for purpose p at step t is derived from (seed, p, t, g) (see
`sampler.chain_keys`), so the samples do not depend on the rank count, and a resumed run draws
the same numbers as an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from . import dist
from .hamiltonian import local_energies
from .sampler import (INIT, START, THERMALIZE, Samples, chain_keys, init_chains, ordered_patterns,
                      ordered_starts)
from .stats import Stats, energy_stats
from .system import System

# estimator(logpsi, params, s, logpsi_s) -> (n,) local values of an observable
Estimator = Callable[[Callable, Any, jax.Array, jax.Array], jax.Array]


@partial(jax.jit, static_argnums=(1, 2))
def _stats(values, n_per_chain, n_chains_total):
    return energy_stats(values, n_per_chain, n_chains_total)


@jax.jit
def _acceptance(accepted, proposed):
    return dist.allreduce_sum(accepted) / jnp.maximum(dist.allreduce_sum(proposed), 1)


@jax.jit
def _sign_structure(logpsi):
    z = jnp.exp(1j * logpsi.imag)
    n = z.size * dist.size()  # every rank holds as many samples (validated chain split)
    mean = dist.allreduce_sum(jnp.sum(z)) / n
    unit = mean / jnp.maximum(jnp.abs(mean), jnp.finfo(jnp.float64).tiny)
    minority = dist.allreduce_sum(jnp.sum((z * jnp.conj(unit)).real < 0).astype(jnp.float64))
    return jnp.abs(mean), minority / n


@dataclass(frozen=True, eq=False)
class VariationalState:
    """Parameters and this rank's Markov chains for one `System` (the rest is fixed)."""

    system: System
    params: Any
    chains: jax.Array  # (C_local, N) int8, this rank's chains in global chain order

    # ---- construction ----------------------------------------------------------------------
    @classmethod
    def fresh(cls, system: System, params=None, warm: bool = False) -> "VariationalState":
        """Parameters from the seed (or given), broadcast from rank 0, and thermalized chains.
        Chains start at random Sz = 0 configurations; for `warm` (trained) parameters each
        chain may start at an ordered pattern instead (`sampler.ordered_starts`)."""
        params = dist.bcast(system.init_params(system.cfg.run.seed) if params is None else params)
        chains = init_chains(_keys(system, INIT, 0), system.n_sites)
        if warm:
            chains = ordered_starts(system.logpsi, params, chains,
                                    jnp.asarray(ordered_patterns(system.lattice.coords)),
                                    _keys(system, START, 0), system.chunk)
        vs = cls(system, params, chains)
        return vs.thermalize(system.cfg.sampler.n_thermalize, THERMALIZE, 0)

    def replace(self, **changes: Any) -> "VariationalState":
        return dataclasses.replace(self, **changes)

    @property
    def n_params(self) -> int:
        return self.system.n_params(self.params)

    # ---- sampling --------------------------------------------------------------------------
    def sample(self, n_per_chain: int, purpose: int, step: int,
               block: int = 0) -> tuple["VariationalState", Samples]:
        """n_per_chain samples from every chain (one per sweep); returns the advanced state.
        `block` numbers the calls of a measurement drawn piece by piece (own random streams)."""
        chains, smp = self.system.sampler.run(self.params, self.chains,
                                              _keys(self.system, purpose, step, block), n_per_chain)
        return self.replace(chains=chains), smp

    def thermalize(self, n_sweeps: int, purpose: int, step: int) -> "VariationalState":
        """Advance every chain by n_sweeps sweeps and discard the samples (burn-in)."""
        return self.sample(n_sweeps, purpose, step)[0] if n_sweeps else self

    # ---- estimation ------------------------------------------------------------------------
    def local_energies(self, samples: Samples) -> jax.Array:
        """Complex local energies (total, not per site) of the samples (those the sampler
        computed with them, if it did)."""
        if samples.eloc is not None:
            return samples.eloc
        sys = self.system
        return local_energies(sys.hamiltonian, sys.logpsi, self.params, samples.s, samples.logpsi,
                              sys.chunk)

    def statistics(self, values: jax.Array, n_per_chain: int) -> Stats:
        """Mean, autocorrelation-aware error, variance and R-hat of sample-major local values
        over all ranks' chains."""
        return _stats(values, n_per_chain, self.system.cfg.sampler.n_chains)

    def expect(self, estimator: Estimator, samples: Samples, n_per_chain: int) -> Stats:
        """Statistics of any observable, given its local estimator, on these samples."""
        sys = self.system
        return self.statistics(estimator(sys.logpsi, self.params, samples.s, samples.logpsi),
                               n_per_chain)

    @staticmethod
    def acceptance(samples: Samples) -> float:
        """Accepted / proposed exchanges (whose spins differed), over all ranks."""
        return float(_acceptance(samples.accepted, samples.proposed))

    @staticmethod
    def sign_structure(samples: Samples) -> tuple[float, float]:
        """(phase coherence, minority sign) over all ranks' samples: |<exp(i phi)>| with phi =
        Im log psi, and the fraction of samples whose phase is more than pi/2 from the mean
        phase. A state with one sign everywhere (under `hamiltonian.marshall_sign`: exactly the
        Marshall signs) gives (1, 0); a state that has learned signs of its own has a minority
        of the weight with the other sign. Sampled from |psi|^2, both estimate the |psi|^2
        weighted quantities, so they show the sign plateau on lattices beyond exact sums."""
        coherence, minority = _sign_structure(samples.logpsi)
        return float(coherence), float(minority)


def _keys(system: System, purpose: int, step: int, block: int = 0) -> jax.Array:
    n_local = system.cfg.sampler.n_chains // dist.size()
    ids = np.arange(n_local) + dist.rank() * n_local
    return chain_keys(system.cfg.run.seed, purpose, step, ids, block)
