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
    """Counts the XLA executables this process compiles, and those it loads from the persistent
    cache (`compile_cache`), from the moment it is created (jax.monitoring). A step that needs
    a new executable after the first ones means a shape changed, which costs seconds: `count`
    holds both kinds, since a loaded one is still a new shape."""

    def __init__(self) -> None:
        self.count = self.loaded = 0
        jax.monitoring.register_event_duration_secs_listener(self._seen)

    @property
    def compiled(self) -> int:
        return self.count - self.loaded

    def _seen(self, event: str, duration: float, **_) -> None:
        if event == "/jax/core/compile/backend_compile_duration":  # compiled or loaded
            self.count += 1
        elif event == "/jax/compilation_cache/cache_retrieval_time_sec":  # loaded
            self.loaded += 1
