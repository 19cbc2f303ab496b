"""Warm start (`run.init_from=RUN_DIR`): a new run's initial parameters from another run's newest
good checkpoint, also from a smaller (or larger) lattice with the same patch size.

Every parameter whose shape does not depend on L is copied (embedding, encoder blocks, final
norm, head). The position-dependent ones live on the m x m periodic patch grid (m = L / b) and are
indexed by the displacement r = dx * m + dy; they are mapped by signed displacement, with
components in (-m/2, m/2]:
  - a displacement the source grid holds (|dx|, |dy| <= m_src / 2) takes the source's value
    (on an even source grid, +m_src/2 and -m_src/2 are the same displacement there and both get it);
  - beyond that range, the factored weights alpha(r) are 0 (no attention to farther patches), and
    the standard attention's relative bias takes the value of the nearest held displacement
    (components clamped), since a bias of 0 is not "no attention".
Refused with one line: a different architecture (attention kind, d, heads, layers, patch,
translation invariance, lattice kind), free alpha_ij (translation_invariant=false) on another L, a
source without a readable checkpoint.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import yaml

from .errors import ConfigError

SAME = ("lattice.patch", "lattice.kind", "model.attention", "model.d", "model.heads",
        "model.layers", "model.translation_invariant")


def source_dir(init_from: str, run_dir: str) -> str:
    """The source run directory: absolute, or relative to the run directory's parent (so that a
    sweep point can name a sibling, e.g. run.init_from=lattice.L=4)."""
    if os.path.isabs(init_from):
        return init_from
    return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(run_dir)), init_from))


def _get(cfg: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = cfg[part]
    return cfg


def check_compatible(source_cfg: dict, target_cfg: dict, where: str) -> None:
    for key in SAME:
        a, b = str(_get(source_cfg, key)), str(_get(target_cfg, key))
        if a != b:
            raise ConfigError(f"run.init_from={where}: its {key}={a} differs from this run's {b}; "
                              "a warm start needs the same architecture")
    if not _get(target_cfg, "model.translation_invariant") and (
            _get(source_cfg, "lattice.L") != _get(target_cfg, "lattice.L")):
        raise ConfigError(f"run.init_from={where}: free alpha_ij (model.translation_invariant=false) "
                          "cannot be mapped onto another lattice size")


def map_displacements(values: np.ndarray, m_src: int, m_dst: int, beyond: str) -> np.ndarray:
    """(..., m_src^2) values by displacement -> (..., m_dst^2) (see the module doc); `beyond`:
    'zero' or 'nearest'."""
    half = m_src // 2
    out = np.zeros(values.shape[:-1] + (m_dst * m_dst,), values.dtype)
    for r in range(m_dst * m_dst):
        dx, dy = divmod(r, m_dst)
        dx, dy = (dx - m_dst if dx > m_dst // 2 else dx), (dy - m_dst if dy > m_dst // 2 else dy)
        inside = abs(dx) <= half and abs(dy) <= half
        if not inside and beyond == "zero":
            continue
        cx, cy = np.clip(dx, -half, half), np.clip(dy, -half, half)
        out[..., r] = values[..., (cx % m_src) * m_src + cy % m_src]
    return out


def map_params(source: Any, target: Any, m_src: int, m_dst: int) -> Any:
    """The target parameter tree (same structure) filled from the source tree: the
    translation-invariant attention weights mapped by displacement, the rest copied."""
    def one(path, src, dst):
        src = np.asarray(src)
        keys = [str(getattr(k, "key", k)) for k in path]
        by_displacement = (len(keys) == 2 and keys[0].startswith("attention_")
                           and keys[1] in ("alpha", "bias") and src.ndim == 2)
        if by_displacement:
            return map_displacements(src, m_src, m_dst, "zero" if keys[1] == "alpha" else "nearest")
        assert src.shape == np.shape(dst), keys  # check_compatible guarantees it
        return src
    return jax.tree_util.tree_map_with_path(one, source, target)


def load(init_from: str, run_dir: str, target_system) -> tuple[Any, str, int]:
    """(initial parameters for `target_system`, source directory, source step) from the newest
    good checkpoint of the source run."""
    from . import checkpoint
    from .config import validate
    from .driver import Driver
    from .system import System
    from omegaconf import OmegaConf

    where = source_dir(init_from, run_dir)
    ckpt_dir = os.path.join(where, "checkpoints")
    found = checkpoint.list_checkpoints(ckpt_dir) if os.path.isdir(ckpt_dir) else []
    if not found:
        raise ConfigError(f"run.init_from={init_from}: no checkpoint in {ckpt_dir} (has that run "
                          "started and checkpointed?)")
    import h5py

    with h5py.File(found[0], "r") as f:
        stored = str(f.attrs["config"])
    source_cfg = yaml.safe_load(stored)
    target_cfg = yaml.safe_load(OmegaConf.to_yaml(OmegaConf.structured(target_system.cfg)))
    check_compatible(source_cfg, target_cfg, init_from)
    source = System.build(validate(OmegaConf.create(stored)))
    snap = checkpoint.newest_good(ckpt_dir, *Driver(source).templates(), lambda y: None)
    if snap is None:
        raise ConfigError(f"run.init_from={init_from}: no readable checkpoint in {ckpt_dir}")
    b = target_system.lattice.patch
    params = map_params(snap.params, target_system.init_params(0), source.lattice.L // b,
                        target_system.lattice.L // b)
    return params, where, snap.step
