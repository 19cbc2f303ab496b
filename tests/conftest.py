"""Shared fixtures: small systems built from the real config schema."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile

# The persistent compilation cache (pipeline/compile_cache.py), for this process and every job
# the tests start (they inherit the environment, also through mpirun and SLURM): the many small
# runs of the suite, and the restarts of the fault tests, load compiled steps instead of
# compiling each time. Results are the same compiled code either way; test_compilation counts
# loaded executables as compilations.
os.environ.setdefault("VITNQS_COMPILE_CACHE",
                      os.path.join(tempfile.gettempdir(), "vitnqs-test-xla-cache"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import pytest

import pipeline  # noqa: F401,E402  (enables float64)
from pipeline import compile_cache  # noqa: E402
from pipeline.config import Config, validate  # noqa: E402
from pipeline.sr import Preconditioner  # noqa: E402
from pipeline.system import System  # noqa: E402

compile_cache.enable("auto")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable


def make_config(**overrides) -> Config:
    """A validated Config with dotted overrides, e.g. make_config(**{"lattice.L": 4})."""
    c = Config()
    for key, value in overrides.items():
        node = c
        *path, last = key.split(".")
        for p in path:
            node = getattr(node, p)
        setattr(node, last, value)
    return validate(c)


def randomized(params, key, scale: float = 0.3):
    """Parameters moved away from initialization so amplitudes and phases are non-trivial."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree_util.tree_unflatten(treedef, [
        x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


@pytest.fixture(params=["factored", "standard"])
def attention(request) -> str:
    return request.param


def system_for(**overrides) -> System:
    return System.build(make_config(**overrides))


def run_cli(*args: str, env: dict | None = None, timeout: int = 600,
            launcher: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Run `python -m pipeline` (optionally under a launcher such as mpirun) and capture output."""
    full_env = os.environ | {"PYTHONUNBUFFERED": "1"} | (env or {})
    return subprocess.run([*launcher, PYTHON, "-m", "pipeline", *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def mpirun(n: int) -> tuple[str, ...]:
    return (os.path.join(os.path.dirname(PYTHON), "mpirun"), "-n", str(n))


class FailOnce(Preconditioner):
    """SR that returns non-finite parameters once, at step `at`: a blown-up step on demand."""

    def __init__(self, at: int, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.at, self.failed = at, False

    def update(self, logpsi, params, s, eloc, state, step, lr_scale):
        params, state, info = super().update(logpsi, params, s, eloc, state, step, lr_scale)
        if step == self.at and not self.failed:
            self.failed = True
            params = jax.tree_util.tree_map(lambda x: x * jnp.nan, params)
        return params, state, info
