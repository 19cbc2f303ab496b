"""JAX start-up, imported by every module that computes with JAX (and by nothing else).

Before JAX creates a backend: one device per rank (`devices.pin`), float64 throughout (SR and
energies). Modules that only read files (`aggregate`, `watch`, `results`, `status`, `config`) do not
import this, so reading results starts no JAX and pins no device.
"""
from __future__ import annotations

import logging

from . import devices

devices.pin()

import jax  # noqa: E402

# JAX logs a warning for every accelerator plugin it probes and does not find (TPU on a CPU box).
logging.getLogger("jax._src.xla_bridge").setLevel(logging.ERROR)
jax.config.update("jax_enable_x64", True)


class CompileCounter:
    """Counts XLA compilations in this process from the moment it is created (jax.monitoring):
    a step that compiles after the first ones means a shape changed, which costs seconds."""

    def __init__(self) -> None:
        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._seen)

    def _seen(self, event: str, duration: float, **_) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            self.count += 1
