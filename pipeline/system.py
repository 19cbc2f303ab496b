"""Assemble the physical system and the variational ansatz from a validated config."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial
from typing import Callable

import jax
import numpy as np

from .budget import forward_chunk, jacobian_chunk
from .config import Config, SamplerKind, Symmetry
from .hamiltonian import Hamiltonian
from .lattice import Lattice
from .models import ViT, group, n_params, project
from .sampler import ExactSampler, ExchangeSampler


def _apply(model: ViT, params, s):
    return model.apply({"params": params}, s)


@partial(jax.jit, static_argnums=(0, 1))
def _init(model: ViT, n_sites: int, key: jax.Array):
    """The model's initial parameters as one compiled program (run eagerly, its initializers and
    the traced forward pass are some sixty small executables to compile or load at every start)."""
    return model.init(key, np.ones((1, n_sites), np.int8))["params"]


def make_sampler(cfg: Config, lat: Lattice, ham: Hamiltonian, logpsi: Callable,
                 group: int) -> ExchangeSampler | ExactSampler:
    """The configured sampler of |exp(logpsi)|^2, evaluating `group` configurations at a time."""
    if cfg.sampler.kind == SamplerKind.exact:
        return ExactSampler.build(logpsi, ham, group)
    moves = lat.bonds1 if not cfg.sampler.next_nearest_moves else np.concatenate(
        [lat.bonds1, lat.bonds2])
    return ExchangeSampler(logpsi, moves, cfg.sampler.sweep_size or lat.n_sites, group)


@dataclass(frozen=True, eq=False)
class System:
    """Everything that is fixed for a run: geometry, Hamiltonian, model, log psi, sampler."""

    cfg: Config
    lattice: Lattice
    hamiltonian: Hamiltonian
    model: ViT
    logpsi: Callable
    sampler: ExchangeSampler | ExactSampler
    chunk: int  # configurations per forward pass (budget.forward_chunk)
    jacobian_chunk: int  # samples per Jacobian chunk, 0: all at once (budget.jacobian_chunk)

    @classmethod
    def build(cls, cfg: Config) -> "System":
        lat = Lattice(cfg.lattice.L, cfg.lattice.patch, str(cfg.lattice.kind))
        h = cfg.hamiltonian
        ham = Hamiltonian.build(lat, h.J1, h.J2, h.marshall_sign)
        m = cfg.model
        model = ViT(L=lat.L, patch=lat.patch, d=m.d, heads=m.heads, layers=m.layers,
                    attention=str(m.attention), translation_invariant=m.translation_invariant,
                    dtype=str(m.dtype))
        logpsi = project(partial(_apply, model), *group(lat, str(m.symmetry)))
        platform = jax.default_backend()
        chunk = forward_chunk(cfg, platform)
        return cls(cfg, lat, ham, model, logpsi, make_sampler(cfg, lat, ham, logpsi, chunk), chunk,
                   jacobian_chunk(cfg, platform))

    def with_symmetry(self, symmetry: str) -> "System":
        """The same system with log psi projected onto another group (this one if unchanged)."""
        if str(symmetry) == str(self.cfg.model.symmetry):
            return self
        model = dataclasses.replace(self.cfg.model, symmetry=Symmetry(str(symmetry)))
        return System.build(dataclasses.replace(self.cfg, model=model))

    @property
    def n_sites(self) -> int:
        return self.lattice.n_sites

    def init_params(self, seed: int):
        """Initial parameters, derived from the run seed (purpose stream 'params')."""
        key = jax.random.fold_in(jax.random.PRNGKey(seed), 1_000_003)
        return _init(self.model, self.n_sites, key)

    def n_params(self, params) -> int:
        return n_params(params)
