"""SLURM submission with submitit (filled in by the SLURM launcher)."""
from __future__ import annotations

from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

_PENDING: list[tuple[DictConfig, str]] = []


def enqueue(cfg: DictConfig, run_dir: str) -> None:
    _PENDING.append((cfg, run_dir))


class SubmitCallback(Callback):
    """Submits the queued jobs when the composition (single run or sweep) ends."""

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        pass

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        pass
