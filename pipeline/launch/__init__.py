"""Launchers: local (in this process, under any MPI launcher) and SLURM (submitit)."""
