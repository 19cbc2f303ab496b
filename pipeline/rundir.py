"""Owning a run directory: one job at a time, shown by an `fcntl.flock` on <run dir>/.lock held for
the whole job (the kernel drops it when the process dies, even by kill -9, so a requeued job can
always take it back), with the holder's pid and host written in the lock file.

The lock is advisory and per open file description: a second process (or a second open in the
same process) that tries it is refused at once. On network file systems flock needs locks that
reach across nodes (NFSv4, Lustre mounted with `flock`); where the file system has no flock at
all the job runs unlocked (it says so), and `held` judges a holder on this host by its pid.
"""
from __future__ import annotations

import fcntl
import glob
import json
import os
import socket
from contextlib import contextmanager
from typing import Iterator

from .errors import RunDirError, RunDirInUse

LOCK = ".lock"


def check(directory: str, what: str = "run directory (hydra.run.dir)") -> str:
    """The absolute directory, created if needed; RunDirError (one line naming `what`) when it
    is a file, lies under a file, or cannot be written."""
    path = os.path.abspath(directory)
    if os.path.exists(path) and not os.path.isdir(path):
        raise RunDirError(f"{what} {path} is a file, not a directory")
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise RunDirError(f"{what} {path} cannot be used: {e.strerror or e}") from None
    return path


def _holder_of(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}


@contextmanager
def owned(run_dir: str) -> Iterator[dict]:
    """Hold the run directory's lock for the block; yields {"pid", "host", "locked"} of this
    process ("locked" is False where the file system has no flock).
    Raises RunDirInUse naming the holder when another process holds it. On entry, temporaries
    left by killed writers (`*.tmp-<pid>`) are removed: nobody else can be writing them."""
    fd = os.open(os.path.join(run_dir, LOCK), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "locked": True}
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            h = _holder_of(fd)
            raise RunDirInUse(f"run directory {run_dir} in use by pid {h.get('pid', '?')} on host "
                              f"{h.get('host', '?')}; nothing was changed") from None
        except OSError:  # no flock on this file system
            me["locked"] = False
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        for tmp in glob.glob(os.path.join(run_dir, "*.tmp-*")) + glob.glob(
                os.path.join(run_dir, "checkpoints", "*.tmp-*")):
            os.remove(tmp)
        yield me
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def held(run_dir: str, pid: int | None = None, host: str | None = None) -> bool:
    """Whether a live process holds the run directory (by trying its lock; where the file system
    has no flock, by the recorded pid when it ran on this host, else assumed held)."""
    try:
        fd = os.open(os.path.join(run_dir, LOCK), os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    except OSError:
        return _alive(pid) if pid and host == socket.gethostname() else True
    finally:
        os.close(fd)
