"""HDF5 checkpoints of the whole run state, written atomically, discovered newest-good-first.

A checkpoint holds exactly the run state (step, parameters, SR state, every rank's chains
gathered in global chain order, the rollback count, the energy floor) plus provenance (resolved
config, versions, code version, rank count). RNG keys are not stored: they are derived from
(seed, purpose, step, global chain index), so the state above determines the rest of the run.

Writing (rank 0): a temporary file in the same directory, flushed and fsynced, then renamed
into place; the newest `keep` sound files are kept (unreadable ones do not count, and the file
just written is never pruned). A `sha256` over every field (arrays, step, rollback count, energy
floor, config) and a `complete` mark (written last) let `newest_good` skip truncated or corrupt
files in favour of older ones.
"""
from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Callable

import h5py
import jax
import numpy as np

from . import hdf5
from .errors import CheckpointCorrupt, CheckpointError, CheckpointIncompatible

__all__ = ["CheckpointCorrupt", "CheckpointError", "CheckpointIncompatible", "Snapshot", "write",
           "read", "newest_good", "list_checkpoints", "path_for", "FORMAT_VERSION"]

# 2: the rollback count replaces the learning-rate scale; the checksum covers every field.
# 3: the energy floor of the collapse test (`driver.RunState.energy_floor`); older files: none yet.
FORMAT_VERSION = 3
PATTERN = re.compile(r"ckpt_(\d{8})\.h5$")


@dataclass
class Snapshot:
    """The run state in host memory, as written to or read from a checkpoint."""

    step: int
    params: Any
    opt_state: Any
    chains: np.ndarray  # (n_chains_total, N) int8, global chain order
    rollbacks: int
    config_yaml: str
    energy_floor: float = math.inf  # lowest E/N + 2 errors so far (driver.Driver.collapsed)


def _leaves(tree: Any) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def _header(step: int, rollbacks: int, config_yaml: str, *floor: float) -> bytes:
    """The scalar fields under the checksum (`floor` from format 3 on)."""
    return json.dumps([step, rollbacks, config_yaml, *floor]).encode()


def _digest(arrays: list[np.ndarray], header: bytes) -> str:
    """sha256 of the scalar fields (`header`; empty in format 1) and every array."""
    h = hashlib.sha256(header)
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
    payload = _payload(snap)

    def fill(f: h5py.File) -> None:
        for group, arrays in payload.items():
            g = f.create_group(group)
            for i, a in enumerate(arrays):
                g.create_dataset(f"{i:04d}", data=a)
        f.attrs.update({"format_version": FORMAT_VERSION, "step": snap.step,
                        "rollbacks": snap.rollbacks, "energy_floor": snap.energy_floor,
                        "config": snap.config_yaml, "meta": json.dumps(meta, sort_keys=True),
                        "sha256": _digest([a for arrays in payload.values() for a in arrays],
                                          _header(snap.step, snap.rollbacks, snap.config_yaml,
                                                  snap.energy_floor))})
        f.attrs["complete"] = 1

    hdf5.write_atomically(final, fill)
    prune(directory, keep, final)
    return final


def _sound(path: str) -> bool:
    """Cheap check (no checksum): an HDF5 file with its completeness mark."""
    try:
        with h5py.File(path, "r") as f:
            return int(f.attrs.get("complete", 0)) == 1
    except Exception:
        return False


def _step(path: str) -> int:
    return int(PATTERN.search(path).group(1))


def prune(directory: str, keep: int, written: str) -> None:
    """Keep `written` and the keep - 1 newest sound checkpoints older than it. Older unreadable
    files go (they count for nothing); newer files stay untouched: the run was not resumed from
    them, so they are unusable, and the run overwrites them when it gets there."""
    older = [p for p in list_checkpoints(directory) if _step(p) < _step(written)]
    kept = [p for p in older if _sound(p)][:keep - 1]
    for path in older:
        if path not in kept:
            os.remove(path)


def list_checkpoints(directory: str) -> list[str]:
    """Checkpoint files, newest step first (temporaries `*.h5.tmp-<pid>` excluded)."""
    files = [p for p in glob.glob(os.path.join(directory, "ckpt_*.h5")) if PATTERN.search(p)]
    return sorted(files, key=_step, reverse=True)


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
            step, config_yaml = int(f.attrs["step"]), str(f.attrs["config"])
            floor = math.inf  # before format 3: no floor yet, the first step sets it
            if version >= 3:
                rollbacks, floor = int(f.attrs["rollbacks"]), float(f.attrs["energy_floor"])
                header = _header(step, rollbacks, config_yaml, floor)
            elif version == 2:
                rollbacks = int(f.attrs["rollbacks"])
                header = _header(step, rollbacks, config_yaml)
            else:  # format 1: lr_scale = 0.5 ** rollbacks, a checksum over the arrays only
                rollbacks, header = round(-math.log2(float(f.attrs["lr_scale"]))), b""
            arrays = [a for arrays in groups.values() for a in arrays]
            if _digest(arrays, header) != f.attrs["sha256"]:
                raise CheckpointCorrupt(f"{path}: checksum mismatch (corrupt file)")
            if step != _step(path):
                raise CheckpointCorrupt(f"{path}: holds step {step}, not the step of its name")
    except CheckpointError:
        raise
    except Exception as e:  # truncated, empty or not HDF5 at all
        raise CheckpointCorrupt(f"{path}: unreadable ({type(e).__name__}: {e})") from e
    check_config(config_yaml)
    params = _restore(path, "params", groups["params"], params_like)
    opt_state = _restore(path, "opt_state", groups["opt_state"], opt_state_like)
    return Snapshot(step, params, opt_state, groups["chains"][0], rollbacks, config_yaml, floor)


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
