"""A run directory's own record of its state (queued, running, requeued, finished, failed),
readable without squeue: <run dir>/status.json, replaced atomically by rank 0."""
from __future__ import annotations

import json
import os
import time
from typing import Any

FILE = "status.json"


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
