"""What clusters and users do to a run: kill -9 at random moments (one rank or one of two),
damaged or foreign results and checkpoints, a second process on the same directory, SIGTERM, a
full disk, inputs that must be refused. Every case ends in a correct recovery (compared with an
uninterrupted run, bit for bit) or in one line and a bounded time, and never costs good files."""
from __future__ import annotations

import glob
import hashlib
import os
import random
import re
import signal
import subprocess
import time

import h5py
import numpy as np
import pytest

from pipeline import checkpoint, results, rundir, status
from pipeline.errors import ResultsError

from conftest import PYTHON, ROOT, mpirun, run_cli
from test_jobs import SMALL, job

N_KILL = 60  # steps of the killed runs: the kills must not outrun it on a fast machine
KILLS = int(os.environ.get("VITNQS_KILLS", "6"))  # a fresh random seed each run: CI covers more
TIMING = ("seconds", "t_sample", "t_energy", "t_sr")  # also /attention/seconds


def digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def one_line_error(out: subprocess.CompletedProcess, code: int, text: str) -> None:
    """Exit status `code`, and stderr's last line is `error: ...` holding `text`; no traceback."""
    assert out.returncode == code, out.stdout + out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("error: "), out.stderr
    assert text in out.stderr, out.stderr


def assert_identical(a, b) -> None:
    """Same history and attention rows (every field but timings), final measurement and last
    parameters, bit for bit."""
    ra, rb = results.load(os.path.join(a, "results.h5")), results.load(os.path.join(b, "results.h5"))
    for group in ("history", "attention"):
        ga, gb = ra.group(group), rb.group(group)
        assert set(ga) == set(gb), group
        for key in ga:
            if key not in TIMING:
                np.testing.assert_array_equal(gb[key], ga[key], err_msg=f"{group}/{key}")
    assert ra.final and ra.final == rb.final
    pa = checkpoint.list_checkpoints(os.path.join(a, "checkpoints"))[0]
    pb = checkpoint.list_checkpoints(os.path.join(b, "checkpoints"))[0]
    with h5py.File(pa) as fa, h5py.File(pb) as fb:
        for g in ("params", "opt_state", "chains"):
            for k in fa[g]:
                np.testing.assert_array_equal(fb[g][k][...], fa[g][k][...], err_msg=f"{g}/{k}")


def _rows(run_dir) -> int:
    try:
        return len(results.load(os.path.join(run_dir, "results.h5"), attempts=1).history["step"])
    except (ResultsError, KeyError):
        return 0


def _rank_pids(run_dir) -> list[int]:
    """The Python processes (MPI ranks) of the job running in run_dir."""
    pids = []
    for d in glob.glob("/proc/[0-9]*"):
        try:
            cmd = open(os.path.join(d, "cmdline"), "rb").read().split(b"\0")
        except OSError:
            continue
        if (cmd and os.path.basename(cmd[0].decode()).startswith("python") and b"pipeline" in cmd
                and f"hydra.run.dir={run_dir}".encode() in cmd):
            pids.append(int(os.path.basename(d)))
    return pids


def _start_step(out: str) -> int | None:
    m = re.search(r"(resumed from step|starting at step) (\d+)", out)
    return int(m.group(2)) if m else None


def kill_repeatedly(run_dir, extra: list[str], launcher: tuple[str, ...], kills: int,
                    rng: random.Random) -> None:
    """Start the job, SIGKILL one of its ranks at a random moment (during start-up, or a random
    time after a random number of new history rows: inside checkpoint and results writes), and
    again, `kills` times; each restart must resume losing at most one checkpoint interval."""
    args = [*launcher, PYTHON, "-m", "pipeline", *SMALL, *extra, f"run.n_iter={N_KILL}",
            f"hydra.run.dir={run_dir}"]
    env = os.environ | {"PYTHONUNBUFFERED": "1"}  # with conftest's compilation cache
    done, floor = 0, 0
    while done < kills:
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        rows0 = _rows(run_dir)
        if rng.random() < 0.25:  # start-up (imports, restore, compilation), at the latest when
            # the first new row appears: a warm start-up takes 2-3 s, and 6 s of fast steps could
            # otherwise run the job to its end before the last kill
            end = time.monotonic() + rng.uniform(0.5, 6.0)
            while time.monotonic() < end and _rows(run_dir) <= rows0 and proc.poll() is None:
                time.sleep(0.005)
        else:
            target = rows0 + rng.randint(1, 2)
            deadline = time.monotonic() + 240
            while _rows(run_dir) < target and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.1))
        pids = _rank_pids(run_dir)
        if proc.poll() is not None or not pids:
            out = proc.communicate()[0]
            raise AssertionError(f"the job ended on its own before kill {done + 1} (raise N_KILL)"
                                 f":\n{out}")
        rows = _rows(run_dir)
        os.kill(rng.choice(pids), signal.SIGKILL)
        out = proc.communicate(timeout=120)[0]  # the other ranks must not hang
        start = _start_step(out)  # None: killed before it got that far
        assert start is None or start >= floor, f"started at step {start}, behind checkpoint {floor}"
        floor = max(floor, rows - 1)  # checkpoint.every_steps=1: at most one step may be lost
        done += 1
        print(f"kill {done}: {len(pids)} rank(s), start step {start}, {rows} rows at the kill")
    final = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stdout + final.stderr
    assert _start_step(final.stdout) >= floor, final.stdout


@pytest.mark.parametrize("ranks", [1, pytest.param(2, marks=pytest.mark.mpi)])
def test_kill9_at_random_moments_resumes_bit_identically(tmp_path, ranks: int) -> None:
    seed = int(os.environ.get("VITNQS_FAULT_SEED", random.randrange(2 ** 32)))
    print(f"fault seed {seed} (VITNQS_FAULT_SEED={seed} repeats this test), {ranks} rank(s)")
    rng = random.Random(seed)
    extra = ["checkpoint.every_steps=1", "model=vit_standard", "analysis.every_steps=7"]
    launcher = mpirun(ranks) if ranks > 1 else ()
    ref = run_cli(*SMALL, *extra, f"run.n_iter={N_KILL}", f"hydra.run.dir={tmp_path / 'ref'}",
                  launcher=launcher)
    assert ref.returncode == 0, ref.stderr
    kill_repeatedly(str(tmp_path / "killed"), extra, launcher, KILLS, rng)
    assert_identical(tmp_path / "ref", tmp_path / "killed")
    steps = results.load(os.path.join(tmp_path, "ref", "results.h5")).group("attention")["step"]
    np.testing.assert_array_equal(steps, [*range(0, N_KILL, 7), N_KILL])


# ---- damaged, foreign and stale files ----------------------------------------------------------
@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 6-step run."""
    d = tmp_path_factory.mktemp("reference")
    job(d)
    return d


def _damage(path: str, kind: str, rng: random.Random) -> None:
    size = os.path.getsize(path)
    if kind == "empty":
        open(path, "wb").close()
    elif kind == "truncated":
        os.truncate(path, size // 2)
    else:  # random bytes somewhere past the superblock
        with open(path, "r+b") as f:
            f.seek(rng.randrange(64, size - 64))
            f.write(rng.randbytes(64))


@pytest.mark.parametrize("kind", ["empty", "truncated", "random_bytes"])
def test_damaged_results_file_fails_fast_with_one_line(reference, tmp_path, kind: str) -> None:
    seed = random.randrange(2 ** 32)
    print(f"damage seed {seed}")
    job(tmp_path, "run.steps_per_job=2")
    res = os.path.join(tmp_path, "results.h5")
    _damage(res, kind, random.Random(seed))
    damaged = digest(res)
    t0 = time.monotonic()
    out = job(tmp_path, check=False)
    elapsed = time.monotonic() - t0
    assert elapsed < 120, f"{elapsed:.0f} s"
    if out.returncode == 0:  # the bytes hit nothing the file needs: then the run must be right
        assert_identical(reference, tmp_path)
    else:
        one_line_error(out, 2, f"results file {res}")
        assert digest(res) == damaged  # left as it was, for the user to look at


def test_older_copy_of_results_is_refused_naming_both_steps(tmp_path) -> None:
    job(tmp_path, "run.steps_per_job=2")
    res = os.path.join(tmp_path, "results.h5")
    older = open(res, "rb").read()
    job(tmp_path, "run.steps_per_job=2")  # checkpoint at step 4
    open(res, "wb").write(older)
    out = job(tmp_path, check=False)
    one_line_error(out, 2, "holds 2 history rows up to step 1 but the checkpoint is at step 4")


def test_results_left_open_by_a_killed_writer_are_rebuilt(reference, tmp_path) -> None:
    job(tmp_path, "run.steps_per_job=2")
    res = os.path.join(tmp_path, "results.h5")
    code = ("import os, signal, h5py; from h5py import h5f, h5p\n"
            "fapl = h5p.create(h5p.FILE_ACCESS); fapl.set_libver_bounds(h5f.LIBVER_LATEST, h5f.LIBVER_LATEST)\n"
            f"f = h5py.File(h5f.open({res!r}.encode(), h5f.ACC_RDWR | h5f.ACC_SWMR_WRITE, fapl))\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n")
    subprocess.run([PYTHON, "-c", code])
    with pytest.raises(OSError, match="already open for write"):
        h5py.File(res, "r")
    out = job(tmp_path)
    assert "left open by a killed writer: rebuilt" in out.stderr
    assert_identical(reference, tmp_path)


def test_flipped_bits_in_the_newest_checkpoint(reference, tmp_path) -> None:
    seed = random.randrange(2 ** 32)
    print(f"bit-flip seed {seed}")
    rng = random.Random(seed)
    job(tmp_path, "run.steps_per_job=4")  # checkpoints at steps 2 and 4
    path = checkpoint.path_for(os.path.join(tmp_path, "checkpoints"), 4)
    data = bytearray(open(path, "rb").read())
    for _ in range(4):
        i = rng.randrange(len(data))
        data[i] ^= 1 << rng.randrange(8)
    open(path, "wb").write(bytes(data))
    out = job(tmp_path)
    assert "resumed from step 4" in out.stdout or "skipping checkpoint" in out.stderr
    assert_identical(reference, tmp_path)


# ---- ownership of the run directory -------------------------------------------------------------
def test_second_process_is_refused_and_a_killed_holder_shows_stale(reference, tmp_path) -> None:
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    holder = subprocess.Popen([PYTHON, "-m", "pipeline", *SMALL, "run.n_iter=400",
                               f"hydra.run.dir={tmp_path}"], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while _rows(tmp_path) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        kept = [os.path.join(tmp_path, p) for p in ("status.json", ".hydra/config.yaml",
                                                    ".hydra/overrides.yaml")]
        before = [digest(p) for p in kept]
        out = job(tmp_path, "model.d=16", check=False)  # another config: must not matter
        one_line_error(out, 2, f"run directory {tmp_path} in use by pid {holder.pid} on host")
        assert [digest(p) for p in kept] == before
        assert "run refused" not in open(os.path.join(tmp_path, "logs", "rank0.log")).read()
        assert status.read(tmp_path)["state"] == "running" and rundir.held(str(tmp_path))
    finally:
        holder.kill()
        holder.wait()
    assert "stale" in status.current(str(tmp_path))
    watch = subprocess.run([PYTHON, "-m", "pipeline.watch", str(tmp_path), "--once"], cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
    assert "stale" in watch.stdout, watch.stdout + watch.stderr
    agg = subprocess.run([PYTHON, "-m", "pipeline.aggregate", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert "stale" in agg.stdout, agg.stdout + agg.stderr


def test_finished_run_is_not_touched_again(reference, tmp_path) -> None:
    job(tmp_path)
    kept = [os.path.join(tmp_path, p) for p in ("results.h5", "status.json")]
    before = [digest(p) for p in kept]
    out = job(tmp_path)
    assert "already finished at step 6" in out.stdout
    assert [digest(p) for p in kept] == before


def test_sigterm_checkpoints_and_cancels(reference, tmp_path) -> None:
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([PYTHON, "-m", "pipeline", *SMALL, "run.n_iter=6",
                             f"hydra.run.dir={tmp_path}"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while _rows(tmp_path) < 1 and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGSTOP)  # frozen while the signal arrives: it cannot finish first
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGCONT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stdout + stderr
    assert "received SIGTERM" in stdout
    st = status.read(tmp_path)
    assert st["state"] == "cancelled" and st["requeues"] == 0 and 1 <= st["step"] < 6
    again = job(tmp_path)
    assert f"resumed from step {st['step']}" in again.stdout


# ---- a full disk -------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (needs root: skipped with the reason elsewhere)."""
    d = tmp_path / "disk"
    d.mkdir()
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(d)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {out.stderr.strip()}")
    yield d
    subprocess.run(["umount", "-l", str(d)])


def _fill(directory, leave: int) -> str:
    """Fill the file system of `directory` up to `leave` free bytes; returns the filler's path."""
    path = os.path.join(directory, "filler")
    with open(path, "wb") as f:
        try:
            while True:
                st = os.statvfs(directory)
                free = st.f_bavail * st.f_frsize
                if free <= leave:
                    break
                f.write(b"\0" * min(65536, free - leave))
                f.flush()
        except OSError:
            pass
    return path


@pytest.mark.parametrize("leave_kb", [0, 100])
def test_full_disk_fails_in_one_line_and_keeps_good_files(reference, small_disk, leave_kb: int
                                                          ) -> None:
    """0 KB free: the start-up check of the run directory refuses the run (nothing written,
    status unchanged); 100 KB: a checkpoint some steps later fails (one line, status failed).
    Either way no temporary is left, every checkpoint is intact, and the run finishes
    identically once there is room."""
    run_dir = small_disk / "run"
    job(run_dir, "run.steps_per_job=2")
    res = os.path.join(run_dir, "results.h5")
    ckpts = {p: digest(p) for p in checkpoint.list_checkpoints(os.path.join(run_dir, "checkpoints"))}
    before = digest(res)
    filler = _fill(small_disk, leave_kb * 1024)
    out = job(run_dir, "checkpoint.keep=8", check=False)
    st = status.read(run_dir)
    if leave_kb == 0:
        one_line_error(out, 2, "cannot be used: No space left on device")
        assert st["state"] == "stopped" and digest(res) == before
    else:
        one_line_error(out, 1, "No space left on device")
        assert st["state"] == "failed" and "No space left" in st["error"], st
    assert not glob.glob(os.path.join(run_dir, "**", "*.tmp-*"), recursive=True)
    assert {p: digest(p) for p in ckpts} == ckpts
    os.remove(filler)
    job(run_dir)
    assert_identical(reference, run_dir)


# ---- inputs that must be refused in one line ---------------------------------------------------
@pytest.mark.parametrize("override,text", [
    ("lattice.L=400", "the run needs at least"),
    ("model.d=4096", "the run needs at least"),
    ("sampler.n_samples=1073741824", "the run needs at least"),
    ("run.seed=${oc.env:HOME}", "run.seed"),
])
def test_impossible_inputs_are_refused_at_once(tmp_path, override: str, text: str) -> None:
    t0 = time.monotonic()
    out = run_cli(override, f"hydra.run.dir={tmp_path / 'run'}")
    one_line_error(out, 2, text)
    assert time.monotonic() - t0 < 60
    assert not os.path.exists(tmp_path / "run" / "status.json")


def test_unusable_run_directories_are_refused_in_one_line(tmp_path) -> None:
    (tmp_path / "file").write_text("a file")
    one_line_error(run_cli(f"hydra.run.dir={tmp_path / 'file'}"), 2, "is a file, not a directory")
    one_line_error(run_cli(f"hydra.run.dir={tmp_path / 'file' / 'run'}"), 2, "cannot be used")
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(ro)]).returncode:
        if os.geteuid() == 0:
            pytest.skip("cannot mount a read-only tmpfs here")
        ro.chmod(0o500)
    try:
        one_line_error(run_cli(f"hydra.run.dir={ro / 'run'}"), 2, "cannot be used")
    finally:
        subprocess.run(["umount", "-l", str(ro)], capture_output=True)


def test_aggregate_reports_unreadable_files_and_goes_on(reference, tmp_path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "results.h5").write_bytes(b"")
    out = subprocess.run([PYTHON, "-m", "pipeline.aggregate", str(reference), str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert f"skipping {bad / 'results.h5'}" in out.stderr
    assert str(reference) in out.stdout and "rel.err" in out.stdout


def test_results_reader_never_hangs_on_corrupt_metadata(tmp_path) -> None:
    """The SWMR reader retries bad checksums in a sleep loop; `results.load` fails at once."""
    path = str(tmp_path / "r.h5")
    results.Content(datasets={"history/step": (np.arange(50), {})}).write(path)
    data = bytearray(open(path, "rb").read())
    for i in range(100, len(data) - 100, 97):
        data[i] ^= 0xFF
    open(path, "wb").write(bytes(data))
    t0 = time.monotonic()
    with pytest.raises(ResultsError, match="damaged or unreadable"):
        results.load(path)
    assert time.monotonic() - t0 < 5


def test_superblock_checksum_matches_hdf5(tmp_path) -> None:
    """`hdf5.lookup3` reproduces the checksum HDF5 wrote, so a released image stays valid."""
    from pipeline import hdf5

    path = str(tmp_path / "x.h5")
    with h5py.File(path, "w", libver="latest") as f:
        f["a"] = np.arange(3)
    image = open(path, "rb").read()
    assert int.from_bytes(image[44:48], "little") == hdf5.lookup3(image[:44])
    assert hdf5.released(image) == (image, False)  # closed cleanly: nothing to release
