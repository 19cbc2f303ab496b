"""One rank fails while the others wait in a collective: the world must abort promptly."""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from pipeline import dist

with dist.abort_on_error():
    if dist.rank() == 1:
        time.sleep(0.5)
        raise RuntimeError("deliberate failure on rank 1")
    jax.jit(dist.allreduce_sum)(jnp.ones(3)).block_until_ready()  # would hang forever
    print("unreachable", flush=True)
