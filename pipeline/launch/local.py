"""Checks Hydra cannot make itself: the run (or sweep) directory is usable, before Hydra creates
it (Hydra would end in a traceback for a directory that is a file or lies under one)."""
from __future__ import annotations

import sys
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from .. import rundir
from ..errors import RunDirError


class RunDirCheck(Callback):
    """One line `error: ...` and exit status 2 for an unusable hydra.run.dir / hydra.sweep.dir."""

    def _check(self, config: DictConfig, key: str) -> None:
        try:
            path = OmegaConf.select(config, key, throw_on_resolution_failure=True)
        except Exception:  # resolvers that need a running job: Hydra resolves them later
            return
        try:
            rundir.check(str(path), f"{key}")
        except RunDirError as e:
            sys.stderr.write(f"error: {e}\n")
            sys.exit(2)

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "hydra.sweep.dir")
