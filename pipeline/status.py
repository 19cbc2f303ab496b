"""A run directory's own record of its state, readable without squeue: <run dir>/status.json,
replaced atomically by rank 0. States: queued, running, requeued (stopped by a signal with a
checkpoint, to be run again), stopped (run.steps_per_job reached), finished, failed."""
from __future__ import annotations

import json
import os
import time
from typing import Any

FILE = "status.json"
REQUEUED = "requeued"
EXIT_REQUEUE = 3  # process exit status of a job that checkpointed and asks to be run again


def read(run_dir: str) -> dict[str, Any]:
    try:
        with open(os.path.join(run_dir, FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def write(run_dir: str, state: str, **fields: Any) -> None:
    """Set the state, keeping earlier fields (e.g. the requeue count)."""
    data = read(run_dir) | fields | {"state": state, "updated": time.strftime("%Y-%m-%dT%H:%M:%S")}
    tmp = os.path.join(run_dir, FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, os.path.join(run_dir, FILE))


def ensure_writable(path: str, what: str) -> None:
    """Create directory `path` if needed and prove it writable, or raise PermissionError naming
    `what` and the path (checked before anything is started or submitted)."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise PermissionError(f"{what} {path} is not writable ({e.strerror})") from e
