"""Against a real single-node SLURM cluster (slurm/cluster.sh): arrays, multi-rank jobs,
preemption and time limits with requeue, failing jobs, and refused submissions.

The cluster is started by the session fixture. Where it cannot be started the tests fail (CI
never skips them); VITNQS_SKIP_SLURM=1 skips them on a machine without root, except in CI.
"""
from __future__ import annotations

import json
import os
import subprocess
import time

import numpy as np
import pytest

from pipeline import results
from pipeline.errors import ResultsError

from conftest import ROOT, run_cli

pytestmark = pytest.mark.slurm
SMALL = ["model.d=8", "sampler.n_samples=256", "sampler.n_chains=64", "sampler.n_thermalize=4",
         "sampler.n_samples_final=512", "optimizer.warmup=2", "checkpoint.every_steps=2"]


@pytest.fixture(scope="session", autouse=True)
def cluster():
    if os.environ.get("VITNQS_SKIP_SLURM") and not os.environ.get("CI"):
        pytest.skip("VITNQS_SKIP_SLURM is set")
    script = os.path.join(ROOT, "slurm", "cluster.sh")
    out = subprocess.run([script, "start"], capture_output=True, text=True, timeout=900,
                         stdin=subprocess.DEVNULL)
    if out.returncode != 0:
        pytest.fail(f"could not start the local SLURM cluster:\n{out.stdout}\n{out.stderr}")
    yield
    if os.environ.get("CI"):
        subprocess.run([script, "stop"], capture_output=True, timeout=120)


def status_of(run_dir) -> dict:
    try:
        return json.load(open(os.path.join(run_dir, "status.json")))
    except (OSError, ValueError):
        return {}


def wait_state(run_dir, states=("finished", "failed"), timeout=300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = status_of(run_dir)
        if st.get("state") in states:
            return st
        time.sleep(1)
    raise AssertionError(f"{run_dir} did not reach {states}: {status_of(run_dir)}")


def job_ids(stdout: str) -> list[str]:
    return [line.split()[2].rstrip(":") for line in stdout.splitlines()
            if line.startswith("submitted job")]


def sacct_state(job_id: str) -> str:
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"],
                         capture_output=True, text=True).stdout.split()
    return out[-1] if out else ""


def test_sweep_runs_as_a_job_array(tmp_path) -> None:
    t0 = time.monotonic()
    out = run_cli("-m", "launcher=slurm", "launcher.wait=true", *SMALL, "run.n_iter=4",
                  "hamiltonian.J2=0.4,0.5", f"hydra.sweep.dir={tmp_path}")
    assert out.returncode == 0, out.stdout + out.stderr
    ids = job_ids(out.stdout)
    assert len(ids) == 2 and ids[0].split("_")[0] == ids[1].split("_")[0]  # one array
    dirs = sorted(p for p in tmp_path.iterdir() if p.name.startswith("hamiltonian.J2="))
    assert [d.name.split(",")[0] for d in dirs] == ["hamiltonian.J2=0.4", "hamiltonian.J2=0.5"]
    for d in dirs:
        final = results.read_final(os.path.join(d, "results.h5"))
        assert np.isfinite(final["energy_per_site"]) and np.isfinite(final["relative_error"])
        assert status_of(d)["state"] == "finished"
    print(f"array sweep: {time.monotonic() - t0:.1f} s")


def test_attention_study_sweep_runs_on_slurm(tmp_path) -> None:
    """The paper's comparison as one job array (here only L = 4 and 2 steps): both kinds, with
    their attention maps."""
    out = run_cli("-m", "+experiment=attention_study", "launcher=slurm", "launcher.wait=true",
                  "lattice.L=4", "run.n_iter=2", "sampler.n_samples=64", "sampler.n_chains=64",
                  "sampler.n_samples_final=64", "sampler.n_thermalize=2", "model.d=8",
                  f"hydra.sweep.dir={tmp_path}")
    assert out.returncode == 0, out.stdout + out.stderr
    ids = job_ids(out.stdout)
    assert len(ids) == 2 and ids[0].split("_")[0] == ids[1].split("_")[0]
    dirs = sorted(p for p in tmp_path.iterdir() if "model=" in p.name)
    assert [d.name.split("model=")[1].split(",")[0] for d in dirs] == ["vit_factored", "vit_standard"]
    for d in dirs:
        att = results.load(os.path.join(d, "results.h5")).group("attention")
        assert list(att["step"]) == [0, 2] and att["dependence"].shape == (2, 2, 2)


def test_measurement_runs_as_a_two_task_slurm_job_like_locally(tmp_path) -> None:
    """`python -m pipeline.measure RUN_DIR launcher=slurm`: one job, 2 tasks = one 2-rank world,
    the same numbers as the measurement in this process."""
    from test_observables import measure_cli

    run = run_cli(*SMALL, "run.n_iter=4", f"hydra.run.dir={tmp_path}")
    assert run.returncode == 0, run.stderr
    local = measure_cli(tmp_path, "--n-samples", "512", "--name", "local")
    assert local.returncode == 0, local.stderr
    out = measure_cli(tmp_path, "--n-samples", "512", "--name", "slurm", "launcher=slurm",
                      "launcher.wait=true", "launcher.tasks_per_node=2")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "submitted measurement job" in out.stdout and "measured slurm: E/N = " in out.stdout
    c = results.load(os.path.join(tmp_path, "results.h5"))
    a, b = c.group("measurements/local"), c.group("measurements/slurm")
    np.testing.assert_allclose(b["structure_factor"], a["structure_factor"], atol=1e-10)
    assert (c.groups["measurements/slurm"]["energy_per_site"]
            == pytest.approx(c.groups["measurements/local"]["energy_per_site"], abs=1e-12))


def test_two_task_job_is_one_two_rank_world_with_one_rank_energies(tmp_path) -> None:
    t0 = time.monotonic()
    local = run_cli(*SMALL, "run.n_iter=4", f"hydra.run.dir={tmp_path}/local")
    assert local.returncode == 0, local.stderr
    out = run_cli("launcher=slurm", "launcher.wait=true", "launcher.tasks_per_node=2", *SMALL,
                  "run.n_iter=4", f"hydra.run.dir={tmp_path}/slurm")
    assert out.returncode == 0, out.stdout + out.stderr
    assert status_of(tmp_path / "slurm")["n_ranks"] == 2
    log = open(tmp_path / "slurm" / "logs" / "rank1.log").read()
    assert "rank 1/2" in log
    a = results.read_history(os.path.join(tmp_path, "local", "results.h5"))
    b = results.read_history(os.path.join(tmp_path, "slurm", "results.h5"))
    np.testing.assert_allclose(b["energy"], a["energy"], rtol=1e-8, atol=0)
    print(f"2-rank job: {time.monotonic() - t0:.1f} s")


def _history_until(run_dir, n_rows: int, timeout: int = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if len(results.read_history(os.path.join(run_dir, "results.h5"))["step"]) >= n_rows:
                return
        except (OSError, KeyError, ResultsError):
            pass
        time.sleep(0.1)
    raise AssertionError(f"{run_dir}: fewer than {n_rows} steps after {timeout} s")


def test_usr2_requeues_and_resumes_identically(tmp_path) -> None:
    t0 = time.monotonic()
    n = 150  # several seconds of steps: the signal must land before the end on a fast runner
    ref = run_cli(*SMALL, f"run.n_iter={n}", f"hydra.run.dir={tmp_path}/ref")
    assert ref.returncode == 0, ref.stderr
    out = run_cli("launcher=slurm", *SMALL, f"run.n_iter={n}", f"hydra.run.dir={tmp_path}/job")
    assert out.returncode == 0, out.stderr
    (job_id,) = job_ids(out.stdout)
    _history_until(tmp_path / "job", 3)
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    st = wait_state(tmp_path / "job")
    assert st["state"] == "finished" and st["requeues"] == 1, st
    a = results.read_history(os.path.join(tmp_path, "ref", "results.h5"))
    b = results.read_history(os.path.join(tmp_path, "job", "results.h5"))
    np.testing.assert_array_equal(b["step"], np.arange(n))
    np.testing.assert_array_equal(b["energy"], a["energy"])
    log = open(tmp_path / "job" / "logs" / "rank0.log").read()
    assert "resumed from step" in log
    print(f"USR2 requeue: {time.monotonic() - t0:.1f} s")


def test_scancel_checkpoints_and_cancels(tmp_path) -> None:
    """A plain scancel (SIGTERM) stops the job for good after a checkpoint: not requeued."""
    out = run_cli("launcher=slurm", *SMALL, "run.n_iter=400", f"hydra.run.dir={tmp_path}")
    assert out.returncode == 0, out.stderr
    (job_id,) = job_ids(out.stdout)
    _history_until(tmp_path, 3)
    subprocess.run(["scancel", job_id], check=True)
    st = wait_state(tmp_path, states=("cancelled", "finished", "failed"), timeout=120)
    assert st["state"] == "cancelled" and st["requeues"] == 0 and st["step"] >= 3, st
    deadline, state = time.monotonic() + 60, ""
    while time.monotonic() < deadline:
        state = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"],
                               capture_output=True, text=True).stdout
        if any(s in state for s in ("CANCELLED", "COMPLETED", "FAILED")):
            break
        time.sleep(1)
    assert "CANCELLED" in state, state
    time.sleep(5)
    assert status_of(tmp_path)["state"] == "cancelled"  # nothing came back


def steps_lasting(seconds: float, tmp_path) -> int:
    """How many SMALL steps take `seconds` of wall-clock time in a SLURM job on this machine
    (measured by a short job with the same resources, so the time-limit test needs a requeue on a
    fast CI runner as much as on a slow laptop)."""
    n = 41
    out = run_cli("launcher=slurm", "launcher.wait=true", *SMALL, f"run.n_iter={n}",
                  f"hydra.run.dir={tmp_path / 'calibrate'}")
    assert out.returncode == 0, out.stderr
    per_step = results.read_history(os.path.join(tmp_path, "calibrate", "results.h5"))["seconds"]
    per_step = 1.3 * float(np.mean(per_step[1:]))  # + checkpoints every 2 steps; no compilation
    return max(100, int(np.ceil(seconds / per_step)))


def test_time_limit_requeues_within_the_cap(tmp_path) -> None:
    """slurmctld checks time limits every 30 s and signals a job once it is within signal delay
    + 30 s of its end, so with a 60 s limit and a 10 s delay a job segment gets the signal 20-50 s
    after it starts and is killed 60-90 s after, so a segment holds at most about 45 s of steps
    (50 s less start-up) and at least about 15 s. 70 s of steps (estimated with a 1.3 margin for
    checkpoints, so at least about 54 s of real steps) cannot fit into one segment and fit into
    the requeue cap even when every segment is signalled at its earliest. (With 50 s a job once
    ended in one segment: about 40 s of real steps and a late signal.) The run is a few
    hundred steps of the tiny SMALL model, whose energy spikes at the default diagonal shift (one
    run diverged past 3 rollbacks); a larger shift keeps it stable, which is not what is tested."""
    n = steps_lasting(70.0, tmp_path)
    t0 = time.monotonic()
    out = run_cli("launcher=slurm", "launcher.timeout_min=1", "launcher.signal_delay_s=10",
                  "launcher.max_requeues=6", *SMALL, "optimizer.diag_shift=0.01", f"run.n_iter={n}",
                  f"hydra.run.dir={tmp_path / 'job'}")
    assert out.returncode == 0, out.stderr
    st = wait_state(tmp_path / "job", timeout=600)
    assert st["state"] == "finished", st
    assert 1 <= st["requeues"] <= 6, st
    history = results.read_history(os.path.join(tmp_path, "job", "results.h5"))
    np.testing.assert_array_equal(history["step"], np.arange(n))
    print(f"time-limit requeues: {st['requeues']} for {n} steps, {time.monotonic() - t0:.1f} s")


def test_failing_job_reports_its_error_and_is_not_requeued(tmp_path) -> None:
    """Two tasks started without PMI form two 1-rank worlds: the job must fail, not run twice."""
    t0 = time.monotonic()
    out = run_cli("launcher=slurm", "launcher.tasks_per_node=2", "launcher.srun_args=['--mpi=none']",
                  *SMALL, "run.n_iter=4", f"hydra.run.dir={tmp_path}")
    assert out.returncode == 0, out.stderr
    (job_id,) = job_ids(out.stdout)
    st = wait_state(tmp_path, states=("failed",))
    assert "MPI world size 1 != 2 SLURM tasks" in st["error"]
    deadline = time.monotonic() + 60
    while sacct_state(job_id) not in ("FAILED", "COMPLETED") and time.monotonic() < deadline:
        time.sleep(1)
    assert sacct_state(job_id) == "FAILED"
    assert status_of(tmp_path)["requeues"] == 0
    print(f"failing job: {time.monotonic() - t0:.1f} s")


@pytest.mark.parametrize("override,message", [
    ("launcher.partition=nosuch", "SLURM refuses the launcher resources"),
    ("launcher.tasks_per_node=64", "the run needs at least"),  # 4 GB / 64 tasks: the estimate
    ("launcher.mem_gb=100000", "SLURM refuses the launcher resources"),
])
def test_impossible_submissions_are_refused_whole(tmp_path, override: str, message: str) -> None:
    out = run_cli("-m", "launcher=slurm", override, *SMALL, "hamiltonian.J2=0.4,0.5",
                  f"hydra.sweep.dir={tmp_path}")
    assert out.returncode == 2
    assert message in out.stderr
    assert not job_ids(out.stdout)
    assert not list(tmp_path.glob("*/status.json"))


def test_unwritable_submitit_folder_is_refused(tmp_path) -> None:
    (tmp_path / "blocker").write_text("a file")
    out = run_cli("launcher=slurm", "launcher.folder=blocker/submitit", *SMALL,
                  f"hydra.run.dir={tmp_path}")
    assert out.returncode == 2 and "cannot be used" in out.stderr and not job_ids(out.stdout)


def test_bad_config_is_refused_at_submission(tmp_path) -> None:
    out = run_cli("-m", "launcher=slurm", "model.heads=3", *SMALL, "hamiltonian.J2=0.4,0.5",
                  f"hydra.sweep.dir={tmp_path}")
    assert out.returncode == 2 and "model.heads=3" in out.stderr and not job_ids(out.stdout)


def test_empty_sweep_is_refused() -> None:
    from pipeline.launch.slurm import SubmissionError, submit

    with pytest.raises(SubmissionError, match="the sweep has no points"):
        submit([], "/tmp")
