"""Measurements of a variational state on fresh samples (after a burn-in under its parameters)."""
from __future__ import annotations

from .sampler import FINAL, FINAL_BURN_IN
from .state import VariationalState


def energy(vstate: VariationalState, n_samples: int, step: int) -> dict[str, float]:
    """Energy per site (S.S units) with error, variance, V-score, R-hat and acceptance on
    `n_samples` fresh samples. The chains first discard sampler.n_thermalize sweeps under these
    parameters: they were equilibrated for the previous ones."""
    cfg = vstate.system.cfg
    n_per_chain = n_samples // cfg.sampler.n_chains
    vs = vstate.thermalize(cfg.sampler.n_thermalize, FINAL_BURN_IN, step)
    vs, smp = vs.sample(n_per_chain, FINAL, step)
    st = vs.statistics(vs.local_energies(smp), n_per_chain)
    N = vstate.system.n_sites
    mean = float(st.mean.real)
    return {"energy_per_site": mean / N, "energy_error": float(st.error) / N,
            "energy_imag": float(st.mean.imag) / N, "variance_per_site": float(st.variance) / N,
            "v_score": N * float(st.variance) / mean ** 2, "n_samples": n_samples,
            "r_hat": float(st.r_hat), "acceptance": vs.acceptance(smp), "step": step}
