"""`python -m pipeline [overrides]`: compose the config with Hydra, then run here or submit.

launcher=local (default) runs the job in this process, which may be one rank of `mpirun -n K`
or `srun`; launcher=slurm queues the job (or every point of a `-m` sweep) for submission to
SLURM with submitit, as one job array, when the composition ends.
"""
from __future__ import annotations

import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from .config import conf_dir, register
from .errors import RefusedRun, WriteFailed

register()


@hydra.main(version_base="1.3", config_path=conf_dir(), config_name="config")
def main(cfg: DictConfig) -> None:
    run_dir = HydraConfig.get().runtime.output_dir
    try:
        if cfg.launcher.kind == "slurm":
            from .launch import slurm

            slurm.enqueue(cfg, run_dir)
            return
        from .app import run_job

        code = run_job(cfg, run_dir, overrides=list(HydraConfig.get().overrides.task))
    except RefusedRun as e:
        _one_line(e, 2)
    except WriteFailed as e:
        # HDF5's state after a failed write can crash the interpreter's exit handlers (h5py
        # closes every id at exit): report, flush and leave without them.
        _one_line(e, 1, hard=True)
    if code:
        sys.exit(code)


def _one_line(e: Exception, code: int, hard: bool = False) -> None:
    """One line on stderr (rank 0) and exit status `code`: 2 for input the run cannot accept,
    1 for a failed write (`hard`: without the interpreter's exit handlers)."""
    from . import dist

    if dist.is_root():
        sys.stderr.write(f"error: {e}\n")
    if hard:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    main()
