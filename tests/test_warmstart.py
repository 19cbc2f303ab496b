"""Warm start across lattice sizes (`run.init_from`): mapped weights entry by entry, a lower
starting energy than a random state, and one-line refusals of incompatible sources."""
from __future__ import annotations

import os

import numpy as np
import pytest

from pipeline import checkpoint, results, warmstart
from pipeline.driver import Driver

from conftest import run_cli, system_for
from test_faults import one_line_error
from test_jobs import SMALL, job


@pytest.fixture(scope="module", params=["factored", "standard"])
def source(request, tmp_path_factory):
    """A 4x4 run trained for 30 steps."""
    d = tmp_path_factory.mktemp(f"source-{request.param}")
    job(d, f"model.attention={request.param}", "checkpoint.every_steps=10", n=30)
    return d, request.param


def test_displacement_map_rule() -> None:
    src = np.arange(4.0).reshape(1, 4)  # m = 2: (0,0)=0 (0,1)=1 (1,0)=2 (1,1)=3
    zero = warmstart.map_displacements(src, 2, 3, "zero").reshape(3, 3)
    # m = 3: signed components 0, 1, -1; all within |d| <= 1 of the m = 2 grid
    np.testing.assert_array_equal(zero, [[0, 1, 1], [2, 3, 3], [2, 3, 3]])
    src3 = np.arange(9.0).reshape(1, 9)
    out = warmstart.map_displacements(src3, 3, 4, "zero").reshape(4, 4)
    # m = 4: components 0, 1, 2, -1; 2 is beyond the m = 3 grid's range: zero
    np.testing.assert_array_equal(out, [[0, 1, 0, 2], [3, 4, 0, 5], [0, 0, 0, 0], [6, 7, 0, 8]])
    near = warmstart.map_displacements(src3, 3, 4, "nearest").reshape(4, 4)
    np.testing.assert_array_equal(near, [[0, 1, 1, 2], [3, 4, 4, 5], [3, 4, 4, 5], [6, 7, 7, 8]])


def test_warm_started_6x6_has_the_mapped_weights_and_a_lower_energy(source, tmp_path) -> None:
    src_dir, kind = source
    six = system_for(**{"lattice.L": 6, "model.d": 8, "model.attention": kind})
    params, where, step = warmstart.load(str(src_dir), str(tmp_path / "x"), six)
    assert where == str(src_dir) and step == 30
    four = system_for(**{"model.d": 8, "model.attention": kind})
    snap = checkpoint.newest_good(os.path.join(src_dir, "checkpoints"), *Driver(four).templates(),
                                  lambda y: None)
    old, new = snap.params, params
    for name in ("embed", "head_re", "head_im", "final_norm", "block_0"):
        for a, b in zip(_leaves(old[name]), _leaves(new[name])):
            np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
    key = "alpha" if kind == "factored" else "bias"
    a_old, a_new = np.asarray(old["attention_0"][key]), np.asarray(new["attention_0"][key])
    assert a_new.shape == (2, 9)
    for r in range(9):  # the 3x3 patch grid's displacements all lie within the 2x2 grid's range
        dx, dy = (k - 3 if k > 1 else k for k in divmod(r, 3))  # signed: 0, 1, -1
        np.testing.assert_array_equal(a_new[:, r], a_old[:, (dx % 2) * 2 + dy % 2])
    if kind == "standard":
        for w in ("W_Q", "W_K", "W_V", "W_O"):
            np.testing.assert_array_equal(new["attention_0"][w]["kernel"], old["attention_0"][w]["kernel"])
    warm = job(tmp_path / "warm", "lattice.L=6", f"model.attention={kind}",
               f"run.init_from={src_dir}", n=1)
    assert f"warm start from {src_dir} (step 30)" in warm.stdout
    cold = job(tmp_path / "cold", "lattice.L=6", f"model.attention={kind}", n=1)
    e_warm = results.read_history(os.path.join(tmp_path, "warm", "results.h5"))["energy"][0]
    e_cold = results.read_history(os.path.join(tmp_path, "cold", "results.h5"))["energy"][0]
    assert e_warm < e_cold - 0.02, (e_warm, e_cold)


def test_a_run_at_another_coupling_starts_from_the_source_parameters(source, tmp_path) -> None:
    """A coupling continuation on the same lattice (the source trained at J2 = 0.5, the run at
    J2 = 0.45): every parameter is the source's, and the exact energy at the new coupling starts
    below a random state's."""
    from pipeline import exact

    src_dir, kind = source
    target = system_for(**{"model.d": 8, "model.attention": kind, "hamiltonian.J2": 0.45})
    params, _, step = warmstart.load(str(src_dir), str(tmp_path / "x"), target)
    snap = checkpoint.newest_good(os.path.join(src_dir, "checkpoints"), *Driver(target).templates(),
                                  lambda y: None)
    assert step == snap.step == 30
    for a, b in zip(_leaves(snap.params), _leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
    h, states = exact.sparse_hamiltonian(target.hamiltonian)
    vector = exact.state_vector(target.logpsi, states, target.n_sites)
    energy = lambda p: exact.expectation(h, vector(p), target.n_sites)["energy_per_site"]  # noqa: E731
    assert energy(params) < energy(target.init_params(0)) - 0.02


def _leaves(tree):
    import jax

    return jax.tree_util.tree_leaves(tree)


def test_sibling_name_resolves_next_to_the_run_directory(tmp_path) -> None:
    assert warmstart.source_dir("lattice.L=4", str(tmp_path / "lattice.L=6")) == str(tmp_path / "lattice.L=4")
    assert warmstart.source_dir("/abs/run", str(tmp_path / "x")) == "/abs/run"


def test_incompatible_sources_are_refused_in_one_line(source, tmp_path) -> None:
    src_dir, kind = source
    out = run_cli(*SMALL, "model.d=16", f"model.attention={kind}", f"run.init_from={src_dir}",
                  "run.n_iter=1", f"hydra.run.dir={tmp_path / 'd'}")
    one_line_error(out, 2, "its model.d=8 differs from this run's 16")
    other = "standard" if kind == "factored" else "factored"
    out = run_cli(*SMALL, f"model.attention={other}", f"run.init_from={src_dir}", "run.n_iter=1",
                  f"hydra.run.dir={tmp_path / 'k'}")
    one_line_error(out, 2, f"its model.attention={kind} differs")
    out = run_cli(*SMALL, f"run.init_from={tmp_path / 'nothing'}", "run.n_iter=1",
                  f"hydra.run.dir={tmp_path / 'n'}")
    one_line_error(out, 2, "no checkpoint in")
    assert not os.path.exists(tmp_path / "n" / "results.h5")


def test_free_alpha_is_not_mapped_across_sizes(tmp_path) -> None:
    job(tmp_path / "src", "model.translation_invariant=false", n=2)
    out = run_cli(*SMALL, "lattice.L=6", "model.translation_invariant=false",
                  f"run.init_from={tmp_path / 'src'}", "run.n_iter=1", f"hydra.run.dir={tmp_path / 'd'}")
    one_line_error(out, 2, "free alpha_ij (model.translation_invariant=false) cannot be mapped")
    same = job(tmp_path / "same", "model.translation_invariant=false",
               f"run.init_from={tmp_path / 'src'}", n=1)
    assert "warm start from" in same.stdout
