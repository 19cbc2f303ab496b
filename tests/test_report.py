"""The scientific output of a run: /attention rows (resumed bit for bit, standard and factored) and
the offline report over a directory with finished, running, corrupt and other-format runs."""
from __future__ import annotations

import os
import shutil
import subprocess
import time

import numpy as np
import pytest

from pipeline import aggregate, plots, results

from conftest import PYTHON, ROOT, system_for
from test_jobs import SMALL, job
from test_observables import measure_cli

STANDARD = ["model=vit_standard", "analysis.every_steps=2"]


@pytest.fixture(scope="module")
def standard_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("standard")
    job(run_dir, *STANDARD, n=7)
    return run_dir


def test_attention_rows_every_interval_and_at_the_end(standard_run) -> None:
    a = results.load(os.path.join(standard_run, "results.h5")).group("attention")
    np.testing.assert_array_equal(a["step"], [0, 2, 4, 6, 7])
    assert a["dependence"].shape == (5, 1, 2) and a["profile"].shape == (5, 1, 2, 4)
    assert a["mean_map"].shape == (5, 1, 2, 4, 4)
    assert np.all(a["dependence"] > 0)  # standard attention depends on the input
    np.testing.assert_allclose(a["mean_map"].sum(-1), 1.0, atol=1e-12)


def test_attention_rows_of_a_resumed_run_are_bit_identical(standard_run, tmp_path) -> None:
    job(tmp_path, *STANDARD, "run.steps_per_job=3", n=7)  # stops at 3: the row of step 2 is in
    job(tmp_path, *STANDARD, n=7)
    a = results.load(os.path.join(standard_run, "results.h5")).group("attention")
    b = results.load(os.path.join(tmp_path, "results.h5")).group("attention")
    assert set(a) == set(b)
    for key in a:
        if key != "seconds":
            np.testing.assert_array_equal(b[key], a[key], err_msg=key)


def test_factored_run_logs_zero_dependence_and_its_alpha(tmp_path) -> None:
    job(tmp_path, "analysis.every_steps=3", n=4)
    a = results.load(os.path.join(tmp_path, "results.h5")).group("attention")
    np.testing.assert_array_equal(a["step"], [0, 3, 4])
    assert np.all(a["dependence"] == 0.0)
    from pipeline import checkpoint
    from pipeline.driver import Driver

    system = system_for(**{"model.d": 8})
    path = checkpoint.list_checkpoints(os.path.join(tmp_path, "checkpoints"))[0]
    alpha = checkpoint.read(path, *Driver(system).templates()).params["attention_0"]["alpha"]
    np.testing.assert_array_equal(a["profile"][-1, 0], alpha)


def test_analysis_off_writes_no_attention_group(tmp_path) -> None:
    job(tmp_path, "analysis.every_steps=0", n=2)
    assert "attention" not in results.load(os.path.join(tmp_path, "results.h5")).groups


def _running_job(run_dir) -> subprocess.Popen:
    proc = subprocess.Popen([PYTHON, "-m", "pipeline", *SMALL, *STANDARD, "run.n_iter=400",
                             f"hydra.run.dir={run_dir}"], cwd=ROOT,
                            env=os.environ | {"PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        try:
            if len(results.load(os.path.join(run_dir, "results.h5"), attempts=1).history["step"]) >= 3:
                return proc
        except Exception:
            pass
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("the running job wrote no rows")


def test_report_of_finished_running_corrupt_and_other_format_runs(standard_run, tmp_path) -> None:
    sweep = tmp_path / "sweep"
    shutil.copytree(standard_run, sweep / "finished")
    out = measure_cli(sweep / "finished", "--n-samples", "512")
    assert out.returncode == 0, out.stderr
    (sweep / "corrupt").mkdir()
    (sweep / "corrupt" / "results.h5").write_bytes(os.urandom(4096))
    newer = results.load(os.path.join(standard_run, "results.h5"))
    newer.attrs["format_version"] = results.FORMAT_VERSION + 1
    (sweep / "newer").mkdir()
    newer.write(str(sweep / "newer" / "results.h5"))
    older = results.load(os.path.join(standard_run, "results.h5"))  # format 1: no /attention
    del older.attrs["format_version"]
    older.datasets = {k: v for k, v in older.datasets.items() if not k.startswith("attention/")}
    older.groups.pop("attention")
    (sweep / "older").mkdir()
    older.write(str(sweep / "older" / "results.h5"))
    proc = _running_job(sweep / "running")
    try:
        out = subprocess.run([PYTHON, "-m", "pipeline.aggregate", str(sweep), "--csv",
                              str(tmp_path / "report.csv"), "--plots", str(tmp_path / "figs")],
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
    finally:
        proc.kill()
        proc.wait()
    assert out.returncode == 0, out.stderr
    assert f"skipping {sweep / 'corrupt' / 'results.h5'}" in out.stderr
    assert f"skipping {sweep / 'newer' / 'results.h5'}: " in out.stderr
    assert "format version 3" in out.stderr
    import pandas as pd

    df = pd.read_csv(tmp_path / "report.csv")
    assert sorted(os.path.basename(d) for d in df["run_dir"]) == ["finished", "older", "running"]
    row = df.set_index(df["run_dir"].map(os.path.basename))
    assert row.loc["running", "state"] == "running" and np.isnan(row.loc["running", "energy_per_site"])
    assert row.loc["finished", "state"] == "finished"
    assert row.loc["finished", "measured"] == "step7_none"
    assert row.loc["finished", "attention_dependence"] > 0
    assert np.isnan(row.loc["older", "attention_dependence"])
    assert row.loc["finished", "steps"] == 7 and row.loc["finished", "median_seconds"] > 0
    assert "run.n_iter" in df.columns  # a config key that differs between the runs
    for name in plots.FIGURES:
        data = (tmp_path / "figs" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
    assert "rel.err" in out.stdout and "finished" in out.stdout


def test_figures_without_data_are_still_written(tmp_path) -> None:
    paths = plots.write_all([], str(tmp_path))
    assert len(paths) == len(plots.FIGURES)
    assert all(os.path.getsize(p) > 1000 for p in paths)


def test_aggregate_rows_keep_their_interface(standard_run) -> None:
    rows = aggregate.collect([str(standard_run)])
    assert rows[0]["model"] == "vit_standard" and rows[0]["L"] == 4 and rows[0]["steps"] == 7
