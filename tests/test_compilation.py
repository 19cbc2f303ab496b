"""No XLA recompilation after the first steps: every jitted function of the step keeps the shapes
it was compiled for (local energies find their connected configurations on the device with a
sticky bucket)."""
from __future__ import annotations

from pipeline import hamiltonian, sampler, sr, state
from pipeline.backend import CompileCounter
from pipeline.driver import Driver
from pipeline.system import System

from conftest import make_config

JITTED = {"local energies": hamiltonian._local, "connected count": hamiltonian._count,
          "sampler": sampler._run, "SR rows": sr.rows, "SR solve": sr.solve_rows,
          "statistics": state._stats, "acceptance": state._acceptance}


def test_no_recompilation_after_the_first_steps() -> None:
    c = make_config(**{"model.d": 8, "sampler.n_samples": 256, "sampler.n_chains": 64,
                       "sampler.n_thermalize": 4, "run.n_iter": 40, "optimizer.warmup": 2})
    driver = Driver(System.build(c))
    st = driver.fresh_state()
    for _ in range(3):
        st, _ = driver.step(st)
    compiled = {name: f._cache_size() for name, f in JITTED.items()}
    assert all(n >= 1 for n in compiled.values()), compiled
    energies = []
    counter = CompileCounter()  # every XLA compilation in the process, not only the listed ones
    for _ in range(30):
        st, record = driver.step(st)
        energies.append(record.energy)
    assert {name: f._cache_size() for name, f in JITTED.items()} == compiled
    assert counter.count == 0
    assert max(energies) - min(energies) > 1e-3  # the state moved: the connected counts changed
