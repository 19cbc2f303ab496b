"""All-reduce, all-gather and all-to-all wrappers (inside jit) against numpy; prints OK on success."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pipeline import dist

with dist.abort_on_error():
    r, n = dist.rank(), dist.size()
    x = np.arange(12.0).reshape(3, 4) * (r + 1) + 1j * r
    got = np.asarray(jax.jit(dist.allreduce_sum)(jnp.asarray(x)))
    expected = sum(np.arange(12.0).reshape(3, 4) * (k + 1) + 1j * k for k in range(n))
    np.testing.assert_allclose(got, expected, rtol=1e-15)
    gathered = np.asarray(jax.jit(dist.allgather)(jnp.full((2,), float(r))))
    np.testing.assert_array_equal(gathered, np.repeat(np.arange(n, dtype=float), 2).reshape(n, 2))
    # alltoall: rank r sends block k = 100 r + k to rank k, so rank r receives 100 j + r from j.
    sent = jnp.asarray([[100.0 * r + k, -1.0] for k in range(n)])
    got = np.asarray(jax.jit(dist.alltoall)(sent))
    np.testing.assert_array_equal(got, [[100.0 * j + r, -1.0] for j in range(n)])
    assert dist.any_flag(r == n - 1) is True
    assert dist.any_flag(False) is False
    for line in dist.startup_report():
        dist.print0(line)
    print(f"rank {r}: OK", flush=True)
