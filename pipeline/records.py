"""The record of one SR step: what the loop returns and, field for field, the /history layout of
results.h5 (one 1-D dataset per field, one row per step). No JAX here: readers import it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np


@dataclass(frozen=True)
class StepRecord:
    """One SR step, measured on the parameters *before* the update. Energies per site, S.S units."""

    step: int  # index of the step (0-based)
    energy: float  # Re <E_loc> / N
    energy_error: float  # autocorrelation-aware standard error of `energy`
    energy_imag: float  # Im <E_loc> / N (zero up to noise for a good estimator)
    variance: float  # Var(E_loc) / N
    acceptance: float  # accepted / proposed exchanges whose spins differed
    r_hat: float  # split-chain R-hat of E_loc (NaN with fewer than 4 samples per chain)
    phase_coherence: float  # |<exp(i Im log psi)>| over the samples: 1 when all share one phase
    minority_sign: float  # fraction of samples whose phase is over pi/2 from the mean phase
    seconds: float  # wall time of the whole step
    t_sample: float  # of which sampling
    t_energy: float  # local energies and their statistics
    t_sr: float  # log-derivatives, SR solve and update
    lr: float  # learning rate applied (schedule x rollback scale x trust-region factor)
    step_length: float  # Fubini-Study length of the update, lr sqrt(d^T S d) (optimizer.max_step)
    diag_shift: float  # lambda of (S + lambda I)
    phase_scale: float  # kappa: phase step / amplitude step
    cg_iterations: int  # CG iterations (0 for the direct solvers)
    sr_residual: float  # relative residual of the solve (kernel solvers: of the kernel system)
    bytes_comm: int  # bytes each rank received from SR collectives (0 on one rank)

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


HISTORY = tuple(f.name for f in fields(StepRecord))
DTYPES = {f.name: np.int64 if f.type == "int" else np.float64 for f in fields(StepRecord)}
