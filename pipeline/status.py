"""A run directory's own record of its state, readable without squeue: <run dir>/status.json,
replaced atomically by rank 0 of the job that holds the run directory (`rundir.owned`); a refused
start never writes it. States: queued, running (with the pid and host of rank 0), requeued
(SIGUSR2: checkpointed, to be run again), cancelled (SIGTERM: checkpointed, not to be run
again), stopped (run.steps_per_job reached), finished, failed (with `error`)."""
from __future__ import annotations

import json
import os
import time
from typing import Any

from . import rundir

FILE = "status.json"
REQUEUED = "requeued"
CANCELLED = "cancelled"
PER_STATE = ("error", "message")  # fields that describe one state only
EXIT_REQUEUE = 3  # process exit status of a job that checkpointed and asks to be run again


def read(run_dir: str) -> dict[str, Any]:
    try:
        with open(os.path.join(run_dir, FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def write(run_dir: str, state: str, **fields: Any) -> None:
    """Set the state, keeping earlier fields (e.g. the requeue count) but not an earlier state's
    error or message."""
    old = {k: v for k, v in read(run_dir).items() if k not in PER_STATE}
    data = old | fields | {"state": state, "updated": time.strftime("%Y-%m-%dT%H:%M:%S")}
    text = json.dumps(data, indent=1, sort_keys=True)
    path, tmp = os.path.join(run_dir, FILE), os.path.join(run_dir, f"{FILE}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError:  # a full disk: no room for a new file, but the old one's block is ours
        if os.path.exists(tmp):
            os.remove(tmp)
        with open(path, "r+" if os.path.exists(path) else "w") as f:
            f.truncate(0)
            f.write(text)


def current(run_dir: str) -> str:
    """The recorded state, with a `running` whose process is gone shown as stale."""
    data = read(run_dir)
    state = data.get("state", "unknown")
    if state == "running" and not rundir.held(run_dir, data.get("pid"), data.get("host")):
        return (f"running? (stale: pid {data.get('pid', '?')} on host {data.get('host', '?')} "
                "is gone; killed or lost)")
    return state
