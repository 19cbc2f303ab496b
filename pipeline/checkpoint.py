"""HDF5 checkpoints of the whole run state, written atomically, discovered newest-good-first.

A checkpoint holds exactly the run state (step, parameters, optimizer state, every rank's chains
gathered in global chain order, the rollback scale) plus provenance (resolved config, versions,
code version, rank count). RNG keys are not stored: they are derived from (seed, purpose, step,
global chain index), so the state above determines the rest of the run.

Writing (rank 0): a temporary file in the same directory, flushed and fsynced, then renamed
into place; the newest `keep` files are kept. A `sha256` over the payload and a `complete` mark
(written last) let `discover` skip truncated or corrupt files in favour of older ones.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from dataclasses import dataclass
from typing import Any, Callable

import h5py
import jax
import numpy as np

FORMAT_VERSION = 1
PATTERN = re.compile(r"ckpt_(\d{8})\.h5$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says which file and why."""


class CheckpointCorrupt(CheckpointError):
    """Truncated, empty, incomplete or failing its checksum: skipped in favour of an older one."""


class CheckpointIncompatible(CheckpointError):
    """Sound, but not resumable by this run (other model, newer format): stops the resume."""


@dataclass
class Snapshot:
    """The run state in host memory, as written to or read from a checkpoint."""

    step: int
    params: Any
    opt_state: Any
    chains: np.ndarray  # (n_chains_total, N) int8, global chain order
    lr_scale: float
    config_yaml: str


def _leaves(tree: Any) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def _digest(arrays: list[np.ndarray]) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(str(a.dtype).encode() + str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _payload(snap: Snapshot) -> dict[str, list[np.ndarray]]:
    return {"params": _leaves(snap.params), "opt_state": _leaves(snap.opt_state),
            "chains": [np.asarray(snap.chains, np.int8)]}


def path_for(directory: str, step: int) -> str:
    return os.path.join(directory, f"ckpt_{step:08d}.h5")


def write(directory: str, snap: Snapshot, meta: dict[str, Any], keep: int) -> str:
    """Atomically write `snap` as ckpt_<step>.h5 and prune to the newest `keep`."""
    os.makedirs(directory, exist_ok=True)
    final = path_for(directory, snap.step)
    tmp = final + ".tmp"
    payload = _payload(snap)
    with h5py.File(tmp, "w") as f:
        for group, arrays in payload.items():
            g = f.create_group(group)
            for i, a in enumerate(arrays):
                g.create_dataset(f"{i:04d}", data=a)
        f.attrs.update({"format_version": FORMAT_VERSION, "step": snap.step,
                        "lr_scale": snap.lr_scale, "config": snap.config_yaml,
                        "meta": json.dumps(meta, sort_keys=True),
                        "sha256": _digest([a for arrays in payload.values() for a in arrays])})
        f.attrs["complete"] = 1
        f.flush()
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, final)
    for old in list_checkpoints(directory)[keep:]:
        os.remove(old)
    return final


def list_checkpoints(directory: str) -> list[str]:
    """Checkpoint files, newest step first (temporaries excluded)."""
    files = [p for p in glob.glob(os.path.join(directory, "ckpt_*.h5")) if PATTERN.search(p)]
    return sorted(files, key=lambda p: int(PATTERN.search(p).group(1)), reverse=True)


def read(path: str, params_like: Any, opt_state_like: Any,
         check_config: Callable[[str], None] = lambda _: None) -> Snapshot:
    """Read and verify one checkpoint against the current config, model and optimizer.

    `check_config(stored_yaml)` raises CheckpointIncompatible when the run may not resume it.
    """
    try:
        with h5py.File(path, "r") as f:
            version = int(f.attrs.get("format_version", -1))
            if version > FORMAT_VERSION:
                raise CheckpointIncompatible(f"{path}: format version {version} is newer than this code "
                                      f"supports ({FORMAT_VERSION}); upgrade vitnqs to resume it")
            if int(f.attrs.get("complete", 0)) != 1:
                raise CheckpointCorrupt(f"{path}: incomplete (no completeness mark)")
            groups = {g: [f[g][k][...] for k in sorted(f[g])] for g in ("params", "opt_state", "chains")}
            if _digest([a for arrays in groups.values() for a in arrays]) != f.attrs["sha256"]:
                raise CheckpointCorrupt(f"{path}: checksum mismatch (corrupt file)")
            step, lr_scale = int(f.attrs["step"]), float(f.attrs["lr_scale"])
            config_yaml = str(f.attrs["config"])
    except CheckpointError:
        raise
    except Exception as e:  # truncated, empty or not HDF5 at all
        raise CheckpointCorrupt(f"{path}: unreadable ({type(e).__name__}: {e})") from e
    check_config(config_yaml)
    params = _restore(path, "params", groups["params"], params_like)
    opt_state = _restore(path, "opt_state", groups["opt_state"], opt_state_like)
    return Snapshot(step, params, opt_state, groups["chains"][0], lr_scale, config_yaml)


def _restore(path: str, what: str, arrays: list[np.ndarray], like: Any) -> Any:
    leaves, treedef = jax.tree_util.tree_flatten(like)
    shapes = [np.shape(x) for x in leaves]
    if [a.shape for a in arrays] != shapes:
        raise CheckpointIncompatible(f"{path}: {what} do not match the current model "
                              f"({len(arrays)} arrays vs {len(shapes)} expected, or other shapes)")
    return jax.tree_util.tree_unflatten(treedef, arrays)


def newest_good(directory: str, params_like: Any, opt_state_like: Any,
                check_config: Callable[[str], None], log: Callable[[str], None] = print
                ) -> Snapshot | None:
    """The newest checkpoint that verifies; corrupt ones are reported and skipped, an
    incompatible one stops the resume with its error."""
    for path in list_checkpoints(directory):
        try:
            return read(path, params_like, opt_state_like, check_config)
        except CheckpointCorrupt as e:
            log(f"skipping checkpoint {e}")
    return None
