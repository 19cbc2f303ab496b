"""The distributed edge: the only module that imports mpi4py and mpi4jax.

Collectives used inside jitted code (`allreduce_sum`, `allgather`, `alltoall`) go through mpi4jax on a cloned
communicator and are the identity at size 1. Host-side operations (broadcast of parameters,
gathering chains for a checkpoint, agreeing on a stop flag) use mpi4py on COMM_WORLD, never
concurrently with the clone.
"""
from __future__ import annotations

import contextlib
import socket
import sys
import traceback
from functools import lru_cache
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from . import backend  # noqa: F401  (device pinning, float64)
from .errors import ConfigError, RefusedRun


@lru_cache(maxsize=None)
def _mpi():
    from mpi4py import MPI

    return MPI


@lru_cache(maxsize=None)
def _jax_comm():
    return _mpi().COMM_WORLD.Clone()


def world():
    return _mpi().COMM_WORLD


def rank() -> int:
    return world().Get_rank()


def size() -> int:
    return world().Get_size()


def is_root() -> bool:
    return rank() == 0


def allreduce_sum(x: jax.Array) -> jax.Array:
    """Sum over ranks, usable inside jit (mpi4jax); identity at size 1."""
    if size() == 1:
        return x
    import mpi4jax

    return mpi4jax.allreduce(x, op=_mpi().SUM, comm=_jax_comm())


def allgather(x: jax.Array) -> jax.Array:
    """Stack every rank's x along a new leading axis (rank order), usable inside jit."""
    if size() == 1:
        return x[None]
    import mpi4jax

    return mpi4jax.allgather(x, comm=_jax_comm())


def alltoall(x: jax.Array) -> jax.Array:
    """x (K, ...): block k goes to rank k; returns the K blocks received, in rank order. Usable
    inside jit; the identity at size 1."""
    if size() == 1:
        return x
    import mpi4jax

    return mpi4jax.alltoall(x, comm=_jax_comm())


def ranks_on_this_node() -> int:
    """How many ranks of the world share this node (and its memory)."""
    if size() == 1:
        return 1
    return world().Split_type(_mpi().COMM_TYPE_SHARED).Get_size()


def bcast(tree: Any, root: int = 0) -> Any:
    """Host-side broadcast of a pytree (parameters, restored state) from `root`."""
    if size() == 1:
        return tree
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    leaves = world().bcast([np.asarray(x) for x in leaves] if rank() == root else None, root=root)
    return jax.tree_util.tree_unflatten(treedef, [jnp.asarray(x) for x in leaves])


def bcast_object(obj: Any, root: int = 0) -> Any:
    """Host-side broadcast of any picklable object from `root`."""
    return obj if size() == 1 else world().bcast(obj, root=root)


def root_decides(decide: Callable[[], Any]) -> Any:
    """Run `decide` on rank 0 (file-system checks, reading files) and give every rank its value,
    or raise its RefusedRun on every rank alike (marked so `abort_on_error` lets it through)."""
    outcome: tuple[str, Any] = ("ok", None)
    if is_root():
        try:
            outcome = ("ok", decide())
        except RefusedRun as e:
            outcome = ("refused", e)
    kind, value = bcast_object(outcome)
    if kind == "refused":
        value.agreed_by_all_ranks = True
        raise value
    return value


def host_allreduce_sum(a: np.ndarray) -> np.ndarray:
    """Sum of a contiguous host array over ranks, in place (outside jit); identity at size 1."""
    if size() > 1:
        world().Allreduce(_mpi().IN_PLACE, a.T if a.flags.f_contiguous else a, op=_mpi().SUM)
    return a


def gather_rows(x: np.ndarray) -> np.ndarray | None:
    """Concatenate every rank's rows on rank 0 (rank order); None elsewhere."""
    if size() == 1:
        return np.asarray(x)
    parts = world().gather(np.asarray(x), root=0)
    return np.concatenate(parts) if parts is not None else None


def any_flag(flag: bool) -> bool:
    """True on every rank if any rank's flag is set (host-side, at a step boundary)."""
    if size() == 1:
        return flag
    return bool(world().allreduce(int(flag), op=_mpi().MAX))


def assert_same(name: str, x: np.ndarray, rtol: float = 1e-12) -> None:
    """Raise if this rank's array differs from rank 0's (e.g. parameters after an update)."""
    if size() == 1:
        return
    ref = world().bcast(np.asarray(x) if is_root() else None, root=0)
    diff = float(np.max(np.abs(np.asarray(x) - ref), initial=0.0))
    scale = float(np.max(np.abs(ref), initial=0.0)) or 1.0
    worst = world().allreduce(diff / scale, op=_mpi().MAX)
    if worst > rtol:
        raise RuntimeError(f"{name} differ across ranks (max relative difference {worst:.3g})")


def barrier() -> None:
    if size() > 1:
        world().Barrier()


def print0(*args: Any, **kwargs: Any) -> None:
    if is_root():
        print(*args, **kwargs, flush=True)


def startup_report() -> list[str]:
    """Each rank's rank, host, JAX device and a test all-reduce (sum of ranks); printed by rank 0."""
    total = float(jax.jit(allreduce_sum)(jnp.asarray(float(rank()))))
    expected = size() * (size() - 1) / 2
    line = (f"rank {rank()}/{size()} host={socket.gethostname()} device={jax.devices()[0]} "
            f"allreduce(sum of ranks)={total:g} (expected {expected:g})")
    lines = world().gather(line, root=0) if size() > 1 else [line]
    if total != expected:
        raise RuntimeError(f"all-reduce check failed on rank {rank()}: {total} != {expected}")
    return lines or [line]  # rank 0: every rank's line; others: their own


@contextlib.contextmanager
def abort_on_error() -> Iterator[None]:
    """An exception on one rank aborts the whole world, so no rank hangs in a collective."""
    try:
        yield
    except ConfigError:
        raise  # raised identically on every rank before any collective: no need to abort
    except Exception as e:
        if getattr(e, "agreed_by_all_ranks", False):
            raise  # a `root_decides` refusal: every rank raises it
        if size() > 1:
            sys.stderr.write(f"[rank {rank()}] fatal error, aborting all {size()} ranks:\n"
                             + traceback.format_exc())
            sys.stderr.flush()
            world().Abort(1)
        raise
