"""Errors that refuse a run for a stated reason (a leaf module: it imports nothing of ours).

`python -m pipeline` prints each of them as one line `error: ...` and exits with status 2.
"""
from __future__ import annotations


class RefusedRun(RuntimeError):
    """Input or files the run cannot accept; the message says which field or file and why."""


class ConfigError(RefusedRun, ValueError):
    """A bad configuration value; the message names the field and the value."""


class CheckpointError(RefusedRun):
    """A checkpoint that cannot be used; the message says which file and why."""


class CheckpointCorrupt(CheckpointError):
    """Truncated, empty, incomplete or failing its checksum: skipped in favour of an older one."""


class CheckpointIncompatible(CheckpointError):
    """Sound, but not resumable by this run (other model, newer format): stops the resume."""


class ResultsError(RefusedRun):
    """results.h5 cannot be opened or written; the message names the file and the cause."""


class RunDirError(RefusedRun):
    """The run directory cannot be used (a file, under a file, not writable)."""


class RunDirInUse(RunDirError):
    """Another live process holds the run directory's lock; the message names its pid and host."""


class WriteFailed(RuntimeError):
    """Writing a checkpoint, results or record failed (disk full, quota, I/O error); earlier
    files are intact. `python -m pipeline` prints it as one line and exits with status 1."""
