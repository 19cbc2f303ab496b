"""The numbers the headline rests on: statistics against numpy on chains of known
autocorrelation, projected and chunked local energies and log-derivatives against the dense
unprojected computation on the whole 4x4 Sz = 0 sector, the Lanczos start, checkpoint pruning and
timing, and a rollback that recovers."""
from __future__ import annotations

import os
from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from pipeline import checkpoint, exact, sr, stats
from pipeline.driver import Driver, RunState
from pipeline.hamiltonian import Hamiltonian, _count, apply_chunked, connected_configs, local_energies
from pipeline.hooks import BaseHook, CheckpointHook
from pipeline.lattice import Lattice
from pipeline.models import group
from pipeline.sr import SRState
from pipeline.state import VariationalState

from conftest import FailOnce, make_config, randomized, system_for


# ---- statistics -------------------------------------------------------------------------------
def _ar1_chains(S: int, C: int, rho: float, seed: int = 0, offsets=None) -> np.ndarray:
    """(S, C) AR(1) chains x_t = rho x_{t-1} + sqrt(1 - rho^2) eps_t (unit variance), stationary."""
    rng = np.random.default_rng(seed)
    x = np.empty((S, C))
    x[0] = rng.normal(size=C)
    for t in range(1, S):
        x[t] = rho * x[t - 1] + np.sqrt(1 - rho ** 2) * rng.normal(size=C)
    return x + (0 if offsets is None else offsets)


def _split_r_hat(x: np.ndarray) -> float:
    """Gelman-Rubin split R-hat written out from its definition."""
    S = x.shape[0]
    h = S // 2
    halves = np.concatenate([x[:h], x[S - h:]], axis=1)
    m = halves.shape[1]
    W = halves.var(axis=0, ddof=1).mean()
    B_over_n = halves.mean(axis=0).var(ddof=1)
    return float(np.sqrt(((h - 1) / h * W + B_over_n) / W))


def test_energy_statistics_equal_numpy_and_see_the_autocorrelation() -> None:
    S, C, rho = 200, 64, 0.8
    x = _ar1_chains(S, C, rho) - 2.0
    imag = 0.1 * _ar1_chains(S, C, 0.0, seed=1)
    eloc = jnp.asarray((x + 1j * imag).reshape(-1))  # sample-major, as the sampler returns them
    st = jax.jit(stats.energy_stats, static_argnums=(1, 2))(eloc, S, C)
    z = x + 1j * imag
    np.testing.assert_allclose(complex(st.mean), z.mean(), rtol=1e-13)
    np.testing.assert_allclose(float(st.variance), np.mean(np.abs(z - z.mean()) ** 2), rtol=1e-12)
    np.testing.assert_allclose(float(st.error), x.mean(axis=0).std(ddof=1) / np.sqrt(C), rtol=1e-12)
    np.testing.assert_allclose(float(st.r_hat), _split_r_hat(x), rtol=1e-12)
    # The error bar sees the autocorrelation: for AR(1) the variance of the mean is inflated by
    # (1 + rho) / (1 - rho) = 9 over the naive sigma^2 / n.
    naive = np.sqrt(1.0 / (S * C))
    assert float(st.error) == pytest.approx(naive * np.sqrt((1 + rho) / (1 - rho)), rel=0.25)
    assert float(st.error) > 2 * naive
    assert abs(float(st.r_hat) - 1) < 0.05


def test_r_hat_flags_chains_that_disagree() -> None:
    S, C = 100, 32
    offsets = np.repeat([0.0, 3.0], C // 2)  # half the chains stuck elsewhere
    x = _ar1_chains(S, C, 0.5, offsets=offsets)
    st = jax.jit(stats.energy_stats, static_argnums=(1, 2))(jnp.asarray(x.reshape(-1)), S, C)
    assert float(st.r_hat) > 1.5
    np.testing.assert_allclose(float(st.r_hat), _split_r_hat(x), rtol=1e-12)


# ---- projected and chunked paths against the dense computation ------------------------------------
def _dense_projected(system, params, s: np.ndarray, mode: str) -> np.ndarray:
    """psi_sym(s) = (1/G) sum_g psi(g s), from the *unprojected* model on every image."""
    bare = system_for(**{"model.attention": system.cfg.model.attention, "model.d": 8})
    perm, sign = group(system.lattice, mode)
    total = 0
    for p, f in zip(perm, sign):
        total = total + np.exp(np.asarray(bare.logpsi(params, s[:, p] * f)))
    return total / len(perm)


@pytest.mark.parametrize("mode,chunk", [("translations", 0), ("translations", 512), ("full", 0),
                                        ("none", 300)])
def test_projected_and_chunked_local_energies_equal_dense(attention: str, mode: str, chunk: int
                                                          ) -> None:
    """On 300 random states: <s|H|psi_sym>/<s|psi_sym> from the sparse Hamiltonian, with psi_sym
    summed densely over the images on those states and every state they connect to."""
    system = system_for(**{"model.attention": attention, "model.d": 8, "model.symmetry": mode,
                           "model.chunk_size": chunk, "hamiltonian.J2": 0.5})
    params = randomized(system.init_params(0), jax.random.PRNGKey(3), 0.1)
    h, states = exact.sparse_hamiltonian(system.hamiltonian)
    s = exact.configs(states, 16)
    rows = np.random.default_rng(1).choice(len(s), 300, replace=False)
    needed = np.union1d(rows, h[rows].indices)
    psi = np.zeros(len(s), complex)
    psi[needed] = _dense_projected(system, params, s[needed], mode)
    expected = (h[rows] @ psi) / psi[rows]
    lp = np.asarray(system.logpsi(params, s[rows]))
    np.testing.assert_allclose(np.exp(lp), psi[rows], rtol=1e-10)  # the projection itself
    got = np.asarray(local_energies(system.hamiltonian, system.logpsi, params, s[rows], lp, chunk))
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("chunk", [0, 64, 1 << 20])
def test_local_energies_do_not_depend_on_the_padding_a_process_has_seen(chunk: int) -> None:
    """A resumed run starts with an empty bucket where the uninterrupted one has grown its
    bucket on earlier batches: the same batch must give the same local energies bit for bit
    (a 2-rank kill -9 resume once differed in the last digit from step 31 on; a forward pass
    in one piece of 3900 or 6400 configurations differs in the last digit)."""
    system = system_for(**{"model.d": 8, "model.chunk_size": chunk, "hamiltonian.J2": 0.5})
    params = randomized(system.init_params(0), jax.random.PRNGKey(3), 0.1)
    rows = np.random.default_rng(2).choice(12870, 100, replace=False)
    s = exact.configs(exact.sparse_hamiltonian(system.hamiltonian)[1], 16)[rows]
    lp = system.logpsi(params, s)
    fresh, grown = (replace(system.hamiltonian, buckets={}) for _ in range(2))
    grown.bucket(len(s), len(s) * len(grown.J), chunk)  # as after a batch with every bond connected
    got = [np.asarray(local_energies(h, system.logpsi, params, s, lp, chunk)) for h in (fresh, grown)]
    np.testing.assert_array_equal(got[0], got[1])


def test_padding_rows_are_skipped_and_the_used_rows_unchanged() -> None:
    """`apply_chunked(..., used)` evaluates only the chunks holding the first `used` rows: those
    chunks bit for bit as in the full pass, the chunks after them not at all (zeros)."""
    system = system_for(**{"model.d": 8})
    params = randomized(system.init_params(0), jax.random.PRNGKey(3), 0.1)
    s = exact.configs(exact.sz0_basis(16)[:256], 16)
    full = np.asarray(apply_chunked(system.logpsi, params, s, 32))
    part = np.asarray(jax.jit(lambda p, x, u: apply_chunked(system.logpsi, p, x, 32, u))(
        params, s, jnp.asarray(70)))
    np.testing.assert_array_equal(part[:96], full[:96])  # rows 70-95 share the third chunk
    assert np.all(part[96:] == 0) and np.all(full[96:] != 0)


def test_padding_configurations_have_no_connected_pairs() -> None:
    """Padding rows of the connected configurations are all spins up, so the local energies of
    those rows (the second level of `lanczos.local_pair`) evaluate nothing for them."""
    system = system_for(**{"model.d": 8})
    s = jnp.asarray(exact.configs(exact.sz0_basis(16)[:50], 16))
    bonds = jnp.asarray(system.hamiltonian.bonds)
    count = int(_count(s, bonds))
    t, _, _, valid = jax.jit(connected_configs, static_argnums=2)(s, bonds, count + 37)
    t, valid = np.asarray(t), np.asarray(valid)
    assert valid.sum() == count and np.all(t[~valid] == 1)
    assert int(_count(jnp.asarray(t[valid]), bonds)) > 0 and int(_count(jnp.asarray(t[~valid]), bonds)) == 0


@pytest.mark.parametrize("mode,chunk", [("translations", 0), ("full", 0), ("full", 16)])
def test_projected_and_chunked_log_derivatives_equal_dense(attention: str, mode: str, chunk: int) -> None:
    """O_sym(s) = sum_g psi(g s) O(g s) / sum_g psi(g s), with O of the unprojected model."""
    system = system_for(**{"model.attention": attention, "model.d": 8, "model.symmetry": mode})
    bare = system_for(**{"model.attention": attention, "model.d": 8})
    params = randomized(system.init_params(0), jax.random.PRNGKey(4), 0.1)
    states = exact.sz0_basis(16)
    s = exact.configs(states[np.random.default_rng(2).choice(len(states), 48, replace=False)], 16)
    perm, sign = group(system.lattice, mode)
    bare_logpsi = jax.jit(bare.logpsi)  # one compilation for all images (eager: minutes)
    bare_o = jax.jit(lambda p, x: sr.log_derivatives(bare.logpsi, p, x))
    num, den = 0, 0
    for p, f in zip(perm, sign):
        images = jnp.asarray(s[:, p] * f)
        psi = np.exp(np.asarray(bare_logpsi(params, images)))
        num = num + psi[:, None] * np.asarray(bare_o(params, images))
        den = den + psi
    got = np.asarray(sr.log_derivatives(system.logpsi, params, jnp.asarray(s), chunk))
    np.testing.assert_allclose(got, num / den[:, None], rtol=1e-8, atol=1e-10)


# ---- exact diagonalization ----------------------------------------------------------------------
@pytest.mark.parametrize("kind,marshall", [("square", False), ("square", True),
                                           ("shastry_sutherland", False)])
def test_lanczos_start_is_not_an_eigenvector(kind: str, marshall: bool) -> None:
    """A start vector that is an eigenvector (the uniform one is the ferromagnet's Sz = 0 member
    without the sign rule) would leave Lanczos in its one-dimensional invariant subspace."""
    ham = Hamiltonian.build(Lattice(4, 2, kind), 1.0, 0.5, marshall)
    h, _ = exact.sparse_hamiltonian(ham)
    v = exact.start_vector(h.shape[0])
    v = v / np.linalg.norm(v)
    hv = h @ v
    assert np.linalg.norm(hv - (v @ hv) * v) > 1e-3 * np.linalg.norm(hv)
    g = exact.lowest_state(h, ham.n_sites)[1]
    assert abs(v @ g) > 1e-4  # it overlaps the ground state


@pytest.mark.parametrize("mode", ["none", "translations"])
def test_exact_expectation_equals_the_weighted_local_energies(mode: str) -> None:
    """The accuracy benchmark's exact final energies (`exact.state_vector`, `exact.expectation`)
    are the |psi|^2-weighted mean and variance of the pipeline's own local energies over every
    state of the sector (an independent route: forward passes on connected configurations, not
    the sparse matrix), and give E0 with zero variance on the exact ground state."""
    system = system_for(**{"model.d": 8, "model.symmetry": mode, "hamiltonian.J2": 0.5})
    params = randomized(system.init_params(0), jax.random.PRNGKey(5), 0.1)
    h, states = exact.sparse_hamiltonian(system.hamiltonian)
    psi = exact.state_vector(system.logpsi, states, 16)(params)
    got = exact.expectation(h, psi, 16)
    s = exact.configs(states, 16)
    e_loc = np.asarray(local_energies(system.hamiltonian, system.logpsi, params, s,
                                      system.logpsi(params, s), 0))
    p = np.abs(psi) ** 2
    mean = np.sum(p * e_loc)
    var = np.sum(p * np.abs(e_loc - mean) ** 2)
    assert abs(mean.imag) < 1e-10
    assert got["energy_per_site"] == pytest.approx(mean.real / 16, rel=1e-10)
    assert got["variance_per_site"] == pytest.approx(var / 16, rel=1e-8)
    assert got["v_score"] == pytest.approx(16 * var / mean.real ** 2, rel=1e-8)
    assert got["energy_error"] == 0.0 and got["n_samples"] == 12870
    e0, g, _ = exact.ground_state(system.hamiltonian)
    ground = exact.expectation(h, g, 16)
    assert ground["energy_per_site"] == pytest.approx(e0, rel=1e-12) and ground["v_score"] < 1e-9


# ---- checkpoints --------------------------------------------------------------------------------
def _snap(step: int) -> checkpoint.Snapshot:
    return checkpoint.Snapshot(step, {"w": np.full(3, float(step))}, (np.zeros(2),),
                               np.ones((2, 4), np.int8), 0, "config: 1\n")


def _names(d) -> list[str]:
    return [os.path.basename(p) for p in checkpoint.list_checkpoints(str(d))]


def test_pruning_keeps_the_newest_good_file_when_a_newer_one_is_corrupt(tmp_path) -> None:
    checkpoint.write(str(tmp_path), _snap(2), {}, keep=1)
    bad = checkpoint.path_for(str(tmp_path), 10)
    open(bad, "wb").write(os.urandom(2048))  # a newer corrupt file (kill -9, bad disk)
    checkpoint.write(str(tmp_path), _snap(4), {}, keep=1)
    assert _names(tmp_path) == ["ckpt_00000010.h5", "ckpt_00000004.h5"]
    found = checkpoint.newest_good(str(tmp_path), {"w": np.zeros(3)}, (np.zeros(2),),
                                   lambda _: None, log=lambda _: None)
    assert found.step == 4 and found.params["w"][0] == 4.0


def test_unreadable_files_do_not_count_toward_keep(tmp_path) -> None:
    checkpoint.write(str(tmp_path), _snap(2), {}, keep=2)
    open(checkpoint.path_for(str(tmp_path), 3), "wb").close()  # empty: unreadable
    checkpoint.write(str(tmp_path), _snap(4), {}, keep=2)
    assert _names(tmp_path) == ["ckpt_00000004.h5", "ckpt_00000002.h5"]


def test_checksum_covers_the_step_the_rollback_count_and_the_floor(tmp_path) -> None:
    import h5py

    path = checkpoint.write(str(tmp_path), replace(_snap(4), energy_floor=-0.4375), {}, keep=3)
    assert checkpoint.read(path, {"w": np.zeros(3)}, (np.zeros(2),)).energy_floor == -0.4375
    for attr, value in (("rollbacks", 2), ("config", "config: 2\n"), ("energy_floor", -0.5)):
        with h5py.File(path, "r+") as f:
            old = f.attrs[attr]
            f.attrs[attr] = value
        with pytest.raises(checkpoint.CheckpointCorrupt, match="checksum"):
            checkpoint.read(path, {"w": np.zeros(3)}, (np.zeros(2),))
        with h5py.File(path, "r+") as f:
            f.attrs[attr] = old
    os.rename(path, checkpoint.path_for(str(tmp_path), 40))  # step in the name != payload
    with pytest.raises(checkpoint.CheckpointCorrupt, match="holds step 4"):
        checkpoint.read(checkpoint.path_for(str(tmp_path), 40), {"w": np.zeros(3)}, (np.zeros(2),))


def test_format_2_checkpoints_are_read_without_a_floor(tmp_path) -> None:
    """A checkpoint written before the energy floor (format 2) resumes with none: the first
    step sets it, as in a fresh run."""
    import h5py

    path = checkpoint.write(str(tmp_path), _snap(4), {}, keep=3)
    with h5py.File(path, "r+") as f:
        del f.attrs["energy_floor"]
        arrays = [f[g][k][...] for g in ("params", "opt_state", "chains") for k in sorted(f[g])]
        f.attrs["format_version"] = 2
        f.attrs["sha256"] = checkpoint._digest(arrays, checkpoint._header(4, 0, "config: 1\n"))
    snap = checkpoint.read(path, {"w": np.zeros(3)}, (np.zeros(2),))
    assert snap.step == 4 and snap.energy_floor == np.inf


def test_checkpoints_by_time(tmp_path) -> None:
    now = [0.0]
    hook = CheckpointHook(str(tmp_path), every_steps=1000, every_minutes=1.0, keep=10,
                          config_yaml="config: 1\n", meta={}, clock=lambda: now[0])
    vs = VariationalState(None, {"w": jnp.zeros(3)}, jnp.ones((2, 4), jnp.int8))
    state = RunState(0, vs, SRState((jnp.zeros(2),), {"w": jnp.zeros(3)}))
    hook.on_run_start(state)
    for step in range(1, 20):
        now[0] += 25.0  # 25 s per step: due every third step (75 s >= 60 s)
        hook.on_step_end(replace(state, step=step), None)
    assert _names(tmp_path) == [f"ckpt_{s:08d}.h5" for s in (18, 15, 12, 9, 6, 3)]


# ---- rollback -----------------------------------------------------------------------------------
class _Recorder(BaseHook):
    def __init__(self) -> None:
        self.steps, self.rollbacks, self.params, self.floors = [], [], {}, []

    def on_step_end(self, state, record) -> None:
        self.steps.append(record.step)
        self.floors.append((record, state.energy_floor))
        self.params[state.step] = np.asarray(ravel_pytree(state.vstate.params)[0])

    def on_rollback(self, state) -> None:
        self.rollbacks.append((state.step, state.rollbacks, state.lr_scale))
        self.params_back = np.asarray(ravel_pytree(state.vstate.params)[0])


def _six_steps():
    """A System of 6 cheap steps with a snapshot every 2 (the rollback tests' run)."""
    from pipeline.system import System

    return System.build(make_config(**{
        "model.d": 8, "sampler.n_samples": 128, "sampler.n_chains": 64,
        "sampler.n_samples_final": 128, "sampler.n_thermalize": 2, "run.n_iter": 6,
        "checkpoint.every_steps": 2, "optimizer.warmup": 0}))


def test_rollback_returns_to_the_snapshot_and_the_run_continues() -> None:
    system = _six_steps()
    rec = _Recorder()
    n_params = system.n_params(system.init_params(0))
    driver = Driver(system, [rec], FailOnce(3, system.cfg.optimizer, 6, n_params, 128))
    state, final = driver.run(driver.fresh_state())
    assert rec.rollbacks == [(2, 1, 0.5)]  # back to the step-2 snapshot, half the learning rate
    np.testing.assert_array_equal(rec.params_back, rec.params[2])
    assert rec.steps == [0, 1, 2, 2, 3, 4, 5]
    assert state.step == 6 and state.rollbacks == 1
    assert np.all(np.isfinite(ravel_pytree(state.vstate.params)[0]))
    assert np.isfinite(final["energy_per_site"]) and final["energy_per_site"] < 0


def _far_above(record, floor: float):
    """`record` with its energy 0.1 per site and 20 of its error bars above `floor`."""
    return replace(record, energy=floor + 0.1 + 20 * record.energy_error)


class _Collapse(Driver):
    """Reports the energy of step `at` (once) 0.1 per site and 20 of its error bars above the
    run's floor: a state that fell apart inside the physical bound, as a 6x6 run once did
    (-0.50 -> -0.29)."""

    at, done = 3, False

    def step(self, state):
        new, record = super().step(state)
        if record.step == self.at and not self.done:
            self.done = True
            record = _far_above(record, state.energy_floor)
        return new, record


def test_a_collapse_inside_the_bound_is_rolled_back(capsys) -> None:
    rec = _Recorder()
    driver = _Collapse(_six_steps(), [rec])
    state, _ = driver.run(driver.fresh_state())
    assert rec.rollbacks == [(2, 1, 0.5)]  # step 3 "collapsed": back to the step-2 snapshot
    assert "step 3: collapse: E/N rose to" in capsys.readouterr().out
    assert rec.steps == [0, 1, 2, 2, 3, 4, 5] and state.rollbacks == 1
    # the floor is the running minimum of E/N + 2 errors of the steps the run kept
    floors = rec.floors
    kept = [r for r, _ in floors[:2]] + [r for r, _ in floors[3:]]
    assert state.energy_floor == min(r.energy + 2 * r.energy_error for r in kept)
    assert floors[0][1] == floors[0][0].energy + 2 * floors[0][0].energy_error


@pytest.mark.parametrize("rise, error, max_rise, collapsed", [
    (0.011, 0.001, 0.02, True),  # 2.2% and 11 error bars
    (0.009, 0.0001, 0.02, False),  # 1.8% of |floor|: noise of a healthy run is far below
    (0.05, 0.006, 0.02, False),  # 10% but only 8 error bars: a rare large local energy
    (0.2, 0.001, 0.0, False),  # run.max_rise=0: off
])
def test_collapse_needs_a_relative_rise_and_many_error_bars(rise, error, max_rise, collapsed):
    from pipeline.records import StepRecord
    from pipeline.system import System

    driver = Driver(System.build(make_config(**{"model.d": 8, "run.max_rise": max_rise})))
    fields = dict.fromkeys(StepRecord.__dataclass_fields__, 0)
    record = StepRecord(**(fields | {"energy": -0.5 + rise, "energy_error": error}))
    assert driver.collapsed(record, -0.5) is collapsed
    assert driver.collapsed(record, np.inf) is False  # no step yet: nothing to compare with


class _Poisoned(Driver):
    """The first update of step `at - 1` leaves parameters whose every measurement reports a
    collapse: a failure that is a property of the parameters, as a real one is, so a rollback to
    a snapshot holding them would fail again and again."""

    at, poisoned = 4, None

    def step(self, state):
        new, record = super().step(state)
        if record.step == self.at - 1 and self.poisoned is None:
            self.poisoned = new.vstate.params
        if state.vstate.params is self.poisoned:
            record = _far_above(record, state.energy_floor)
        return new, record


def test_the_snapshot_holds_parameters_that_were_measured_sound() -> None:
    """Step 3's update leaves parameters that fail at step 4, a snapshot step
    (checkpoint.every_steps = 2). The snapshot of step 4 would hold them; the loop keeps the
    step-2 state instead, whose energy step 2 measured, and the run recovers with one rollback
    (with the snapshot taken of the unmeasured new state it gave up after run.max_rollbacks)."""
    rec = _Recorder()
    driver = _Poisoned(_six_steps(), [rec])
    state, _ = driver.run(driver.fresh_state())
    assert rec.rollbacks == [(2, 1, 0.5)]
    assert rec.steps == [0, 1, 2, 3, 2, 3, 4, 5] and state.step == 6 and state.rollbacks == 1
