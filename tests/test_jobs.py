"""End-to-end jobs through `python -m pipeline`: results layout, exact resume (stop, signal, other
rank count, truncated checkpoint), refusals, rollback, and bad files."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time

import h5py
import numpy as np
import pytest
import yaml

from pipeline import checkpoint, results
from pipeline.driver import RISE_ERRORS
from pipeline.errors import ResultsError

from conftest import PYTHON, ROOT, mpirun, run_cli

SMALL = ["model.d=8", "sampler.n_samples=256", "sampler.n_chains=64", "sampler.n_thermalize=4",
         "sampler.n_samples_final=512", "optimizer.warmup=2", "checkpoint.every_steps=2"]
N = 6


def job(run_dir, *extra: str, launcher=(), check: bool = True, n: int = N
        ) -> subprocess.CompletedProcess:
    out = run_cli(*SMALL, f"run.n_iter={n}", f"hydra.run.dir={run_dir}", *extra, launcher=launcher)
    if check:
        assert out.returncode == 0, out.stdout + out.stderr
    return out


def history(run_dir) -> dict[str, np.ndarray]:
    return results.read_history(os.path.join(run_dir, "results.h5"))


def last_params(run_dir) -> list[np.ndarray]:
    path = checkpoint.list_checkpoints(os.path.join(run_dir, "checkpoints"))[0]
    with h5py.File(path) as f:
        return [f["params"][k][...] for k in sorted(f["params"])]


def assert_same_run(a, b, rtol: float = 0.0, n: int = N) -> None:
    ha, hb = history(a), history(b)
    np.testing.assert_array_equal(ha["step"], np.arange(n))
    np.testing.assert_array_equal(hb["step"], np.arange(n))
    for key in ("energy", "energy_error", "variance", "acceptance"):
        np.testing.assert_allclose(hb[key], ha[key], rtol=rtol, atol=0, err_msg=key)
    for pa, pb in zip(last_params(a), last_params(b)):
        np.testing.assert_allclose(pb, pa, rtol=rtol, atol=1e-12 if rtol else 0)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """One uninterrupted run that the resume tests compare against."""
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    out = job(run_dir)
    return run_dir, out


def test_results_layout_and_summary(reference_run) -> None:
    run_dir, out = reference_run
    assert "vit_factored:" in out.stdout and "parameters" in out.stdout
    assert "final: L=4 J2=0.5 vit_factored: E/N = " in out.stdout
    assert "relative error" in out.stdout
    with h5py.File(os.path.join(run_dir, "results.h5"), "r") as f:
        for name in ("step", "energy", "energy_error", "variance", "acceptance", "seconds"):
            assert f["history"][name].shape == (N,)
        final = dict(f["final"].attrs)
        for name in ("energy_per_site", "energy_error", "variance_per_site", "v_score",
                     "reference_energy_per_site", "relative_error"):
            assert np.isfinite(final[name]), name
        assert final["reference_energy_per_site"] == pytest.approx(-0.5286202095)
        rel = (final["energy_per_site"] - final["reference_energy_per_site"]) / 0.5286202095
        assert final["relative_error"] == pytest.approx(rel)
        assert final["n_samples"] == 512
        assert int(f.attrs["n_params"]) > 0
        cfg = yaml.safe_load(f.attrs["config"])
        assert cfg["lattice"]["L"] == 4 and cfg["model"]["d"] == 8
        assert "per site" in f.attrs["units"]
        assert "jax" in yaml.safe_load(f.attrs["versions"])
    st = json.load(open(os.path.join(run_dir, "status.json")))
    assert st["state"] == "finished"
    assert os.path.exists(os.path.join(run_dir, "logs", "rank0.log"))


def test_stop_and_resume_is_bit_identical(reference_run, tmp_path) -> None:
    first = job(tmp_path, "run.steps_per_job=3")
    assert "stopped: run.steps_per_job=3 reached: checkpointed at step 3" in first.stdout
    assert len(history(tmp_path)["step"]) == 3
    second = job(tmp_path)
    assert "resumed from step 3" in second.stdout
    assert_same_run(reference_run[0], tmp_path)


def test_sigusr2_mid_run_checkpoints_requeues_and_resumes_identically(tmp_path) -> None:
    n = 40
    job(tmp_path / "ref", n=n)
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    run_dir = tmp_path / "job"
    args = [PYTHON, "-m", "pipeline", *SMALL, f"run.n_iter={n}", f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    res = os.path.join(run_dir, "results.h5")
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if len(results.read_history(res)["step"]) >= 2:
                break
        except (OSError, KeyError, ResultsError):
            pass
        time.sleep(0.01)
    # Frozen while the signal arrives, so the run cannot finish first however fast the machine.
    proc.send_signal(signal.SIGSTOP)
    assert len(results.read_history(res)["step"]) < n - 1
    proc.send_signal(signal.SIGUSR2)
    proc.send_signal(signal.SIGCONT)
    stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 3, stdout + stderr
    assert "received SIGUSR2" in stdout
    st = json.load(open(os.path.join(run_dir, "status.json")))
    assert st["state"] == "requeued" and st["requeues"] == 1
    stopped_at = st["step"]
    assert 2 <= stopped_at < n
    again = job(run_dir, n=n)
    assert f"resumed from step {stopped_at}" in again.stdout
    assert_same_run(tmp_path / "ref", run_dir, n=n)


@pytest.mark.mpi
def test_resume_on_two_ranks_after_one(reference_run, tmp_path) -> None:
    job(tmp_path, "run.steps_per_job=3")
    out = job(tmp_path, launcher=mpirun(2))
    assert "resumed from step 3" in out.stdout and "rank 1/2" in out.stdout
    assert_same_run(reference_run[0], tmp_path, rtol=1e-8)


def test_truncated_newest_checkpoint_falls_back_to_previous(reference_run, tmp_path) -> None:
    job(tmp_path, "run.steps_per_job=4")  # checkpoints at steps 2 and 4
    ckpts = checkpoint.list_checkpoints(os.path.join(tmp_path, "checkpoints"))
    assert [os.path.basename(p) for p in ckpts] == ["ckpt_00000004.h5", "ckpt_00000002.h5"]
    size = os.path.getsize(ckpts[0])
    with open(ckpts[0], "r+b") as f:  # what kill -9 in the middle of a write leaves behind
        f.truncate(size // 2)
    out = job(tmp_path)
    assert "skipping checkpoint" in out.stderr and "resumed from step 2" in out.stdout
    assert_same_run(reference_run[0], tmp_path)


def _digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_changed_model_is_refused_and_nothing_is_overwritten(tmp_path) -> None:
    job(tmp_path, "run.steps_per_job=2")
    files = [os.path.join(tmp_path, "results.h5"),
             *checkpoint.list_checkpoints(os.path.join(tmp_path, "checkpoints"))]
    before = [_digest(p) for p in files]
    out = job(tmp_path, "model.d=16", "hamiltonian.J2=0.4", check=False)
    assert out.returncode != 0
    assert "differing keys" in out.stderr
    assert "hamiltonian.J2: 0.5 -> 0.4" in out.stderr and "model.d: 8 -> 16" in out.stderr
    assert [_digest(p) for p in files] == before
    # An explicit allowance lets the learning rate change.
    ok = job(tmp_path, "optimizer.lr=0.01", "run.allow_changed=[optimizer.lr]")
    assert "resumed from step 2" in ok.stdout


def test_rollback_then_clear_failure_on_exploding_energy(tmp_path) -> None:
    out = job(tmp_path, "optimizer.lr=1e6", "optimizer.warmup=0", "run.max_rollbacks=2",
              "optimizer.max_step=0", check=False)  # no trust region: the steps blow up
    assert out.returncode != 0
    assert "rolled back to step 0" in out.stdout
    assert "gave up after 2 rollbacks" in out.stderr
    st = json.load(open(os.path.join(tmp_path, "status.json")))
    assert st["state"] == "failed" and "NonFiniteEnergy" in st["error"]


def _collapses(run_dir, max_rise: float = 0.02) -> list[int]:
    """Steps of the kept history whose energy rose above the running floor (min of E/N + 2
    errors of the steps before) by more than the collapse test allows (`Driver.collapsed`)."""
    h, floor, steps = history(run_dir), np.inf, []
    for step, e, err in zip(h["step"], h["energy"], h["energy_error"]):
        if e - floor > max(max_rise * abs(floor), RISE_ERRORS * err):
            steps.append(int(step))
        floor = min(floor, e + 2 * err)
    return steps


def test_a_real_collapse_is_rolled_back(tmp_path) -> None:
    """A large learning rate without the trust region (lr 0.5, optimizer.max_step=0) makes the
    first step's energy rise from -0.26 to about -0.07 per site, inside the blow-up bound. The
    collapse test rolls it back with half the learning rate, and the kept history has no such
    rise; with the test off (run.max_rise=0) the same run keeps the collapsed steps."""
    fast = ["optimizer.lr=0.5", "optimizer.warmup=0", "optimizer.max_step=0",
            "checkpoint.every_steps=5"]
    out = job(tmp_path / "on", *fast, n=12)
    assert "collapse: E/N rose to" in out.stdout and "rolled back to step 0" in out.stdout
    assert _collapses(tmp_path / "on") == []
    assert json.load(open(tmp_path / "on" / "status.json"))["state"] == "finished"
    off = job(tmp_path / "off", *fast, "run.max_rise=0", n=12)
    assert "collapse:" not in off.stdout and _collapses(tmp_path / "off") != []


def test_default_trust_region_holds_a_huge_learning_rate(tmp_path) -> None:
    """The same learning rate with the configured trust region (optimizer.max_step=0.1): every
    step is shortened to that Fubini-Study length, and the run ends with no rollback."""
    out = job(tmp_path, "optimizer.lr=1e6", "optimizer.warmup=0")
    assert "rolled back" not in out.stdout
    h = history(tmp_path)
    np.testing.assert_allclose(h["step_length"], 0.1, rtol=1e-9)
    assert np.all(h["lr"] < 1.0) and np.all(np.isfinite(h["energy"]))


def test_results_file_without_newer_history_fields_resumes(reference_run, tmp_path) -> None:
    """A results.h5 of an earlier version (without the history fields added since: step_length,
    phase_coherence, minority_sign) resumes: its earlier rows get NaN there, the later ones the
    measured values, and the run is the uninterrupted one."""
    from pipeline.results import ADDED

    job(tmp_path, "run.steps_per_job=4")
    with h5py.File(os.path.join(tmp_path, "results.h5"), "a") as f:
        for name in ADDED:
            del f[f"history/{name}"]
    assert "resumed from step 4" in job(tmp_path).stdout
    h = history(tmp_path)
    assert set(ADDED) == {"step_length", "phase_coherence", "minority_sign"}
    for name in ADDED:
        assert np.all(np.isnan(h[name][:4])) and np.all(np.isfinite(h[name][4:])), name
    assert np.all(h["step_length"][4:] > 0) and np.all(h["phase_coherence"][4:] > 0)
    assert_same_run(reference_run[0], tmp_path)


def _write_fake_checkpoint(run_dir, step: int, **attrs) -> str:
    os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
    path = checkpoint.path_for(os.path.join(run_dir, "checkpoints"), step)
    with h5py.File(path, "w") as f:
        f.attrs.update(attrs)
    return path


@pytest.mark.parametrize("kind", ["empty", "garbage", "incomplete", "bad_checksum"])
def test_broken_checkpoints_are_skipped(tmp_path, kind: str) -> None:
    job(tmp_path, "run.steps_per_job=2")
    path = checkpoint.path_for(os.path.join(tmp_path, "checkpoints"), 4)
    if kind == "empty":
        open(path, "wb").close()
    elif kind == "garbage":
        open(path, "wb").write(os.urandom(4096))
    elif kind == "incomplete":
        _write_fake_checkpoint(tmp_path, 4, format_version=1)
    else:
        good = checkpoint.path_for(os.path.join(tmp_path, "checkpoints"), 2)
        with open(good, "rb") as src, open(path, "wb") as dst:
            dst.write(src.read())
        with h5py.File(path, "r+") as f:
            f.attrs["step"] = 4
            f["params"]["0000"][...] += 1.0
    out = job(tmp_path, "run.steps_per_job=1")
    assert "skipping checkpoint" in out.stderr and path in out.stderr
    assert "resumed from step 2" in out.stdout


def test_checkpoint_from_newer_format_is_refused(tmp_path) -> None:
    _write_fake_checkpoint(tmp_path, 2, format_version=checkpoint.FORMAT_VERSION + 1, complete=1)
    out = job(tmp_path, check=False)
    assert out.returncode != 0
    assert "is newer than this code supports" in out.stderr


def test_checkpoint_of_another_model_is_refused(tmp_path) -> None:
    job(tmp_path, "run.steps_per_job=2")
    out = job(tmp_path, "model=vit_standard", check=False)
    assert out.returncode != 0 and "model.attention: 'factored' -> 'standard'" in out.stderr


def test_missing_results_file_on_resume_is_an_error(tmp_path) -> None:
    job(tmp_path, "run.steps_per_job=2")
    os.remove(os.path.join(tmp_path, "results.h5"))
    out = job(tmp_path, check=False)
    assert out.returncode != 0 and "results.h5 is missing" in out.stderr


def test_results_can_be_read_while_the_job_runs(tmp_path) -> None:
    """scripts/watch reads results.h5 (SWMR) from another process during the run."""
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([PYTHON, "-m", "pipeline", *SMALL, "run.n_iter=40",
                             f"hydra.run.dir={tmp_path}"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        seen = set()
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            watch = subprocess.run([os.path.join(ROOT, "scripts", "watch"), str(tmp_path), "--once"],
                                   capture_output=True, text=True, timeout=60)
            if watch.returncode == 0 and "steps" in watch.stdout:
                seen.add(int(watch.stdout.split(" steps")[0].split()[-1]))
            time.sleep(0.5)
    finally:
        proc.wait(timeout=240)
    assert proc.returncode == 0
    assert any(0 < n < 40 for n in seen), seen  # partial histories were readable mid-run


def test_finished_results_without_checkpoints_are_not_overwritten(reference_run, tmp_path) -> None:
    import shutil

    shutil.copy(os.path.join(reference_run[0], "results.h5"), tmp_path / "results.h5")
    before = _digest(tmp_path / "results.h5")
    out = job(tmp_path, check=False)
    assert out.returncode != 0 and "holds a finished run" in out.stderr
    assert _digest(tmp_path / "results.h5") == before


def test_aggregate_collects_final_energies(reference_run, tmp_path) -> None:
    from pipeline import aggregate

    rows = aggregate.collect([str(reference_run[0])])
    assert len(rows) == 1 and rows[0]["L"] == 4 and rows[0]["model"] == "vit_factored"
    final = results.read_final(os.path.join(reference_run[0], "results.h5"))
    assert rows[0]["energy_per_site"] == final["energy_per_site"]
    assert aggregate.main([str(reference_run[0]), "--csv", str(tmp_path / "t.csv")]) == 0
    assert "energy_per_site" in (tmp_path / "t.csv").read_text().splitlines()[0]


FINETUNE = ["run.finetune_steps=3"]


@pytest.fixture(scope="module")
def finetune_reference(tmp_path_factory):
    """An uninterrupted 8-step run whose last 3 steps fine-tune."""
    d = tmp_path_factory.mktemp("finetune_reference")
    job(d, *FINETUNE, n=8)
    return d


@pytest.mark.parametrize("stop", [5, 6])  # at the switch to the projected phase, and inside it
def test_finetune_phase_resumes_bit_identically(finetune_reference, tmp_path, stop: int) -> None:
    """The last run.finetune_steps steps: projection 'full' at lr_final, chains re-thermalized
    once on entering; stopping at the switch or inside the phase changes nothing."""
    ref = finetune_reference
    h = history(ref)
    np.testing.assert_allclose(h["lr"][5:], 0.002)  # optimizer.lr_final
    assert h["lr"][3] > 0.002
    assert results.read_final(os.path.join(ref, "results.h5"))["symmetry"] == "full"
    job(tmp_path, *FINETUNE, f"run.steps_per_job={stop}", n=8)
    out = job(tmp_path, *FINETUNE, n=8)
    assert "projection full" in out.stdout
    assert_same_run(ref, tmp_path, n=8)
    a = results.read_final(os.path.join(ref, "results.h5"))
    assert a == results.read_final(os.path.join(tmp_path, "results.h5"))


def test_final_symmetry_projects_only_the_final_measurement(reference_run, tmp_path) -> None:
    out = job(tmp_path, "sampler.final_symmetry=translations")
    assert "projection translations" in out.stdout
    np.testing.assert_array_equal(history(tmp_path)["energy"], history(reference_run[0])["energy"])
    a = results.read_final(os.path.join(reference_run[0], "results.h5"))
    b = results.read_final(os.path.join(tmp_path, "results.h5"))
    assert a["symmetry"] == "none" and b["symmetry"] == "translations"
    assert b["energy_per_site"] != a["energy_per_site"]
