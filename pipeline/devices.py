"""Process placement, decided from the environment before JAX is imported (no jax import here).

One GPU per rank: CUDA_VISIBLE_DEVICES is set from the node-local rank that SLURM or the MPI
launcher exports, unless the user set it. With several ranks on one CPU node, XLA and BLAS (the
host kernel solve, `sr.host_kernel_solve`) are kept to one thread per rank so that ranks do not
fight over cores. BLAS worker threads stop spinning soon after a call (OPENBLAS_THREAD_TIMEOUT):
spinning on, they took cores from the XLA work that follows (a 4x4 step's sampling 0.127 s with
the default, 0.090 s without the spin).
"""
from __future__ import annotations

import os

_LOCAL_RANK = ("SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMI_LOCAL_RANK")
_LOCAL_SIZE = ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "SLURM_NTASKS_PER_NODE")


def _first_int(names: tuple[str, ...]) -> int | None:
    for name in names:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return None


def local_rank() -> int:
    return _first_int(_LOCAL_RANK) or 0


def local_size() -> int:
    return _first_int(_LOCAL_SIZE) or 1


def pin() -> None:
    """Set CUDA_VISIBLE_DEVICES and XLA CPU threading for this rank (idempotent)."""
    if os.environ.get("VITNQS_NO_PIN"):
        return
    if _first_int(_LOCAL_RANK) is not None and "CUDA_VISIBLE_DEVICES" not in os.environ:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(local_rank())
    flags = os.environ.get("XLA_FLAGS", "")
    if local_size() > 1 and "intra_op_parallelism_threads" not in flags:
        os.environ["XLA_FLAGS"] = (flags + " --xla_cpu_multi_thread_eigen=false"
                                   " intra_op_parallelism_threads=1").strip()
    if local_size() > 1:
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
