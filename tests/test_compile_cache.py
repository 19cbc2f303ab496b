"""The persistent compilation cache (`run.compile_cache`): a repeated job loads every executable
and computes the same numbers bit for bit; damaged entries are compiled again; entries are
written whole or not at all; the directory follows the host's instruction set."""
from __future__ import annotations

import os
import random
import re

from pipeline import compile_cache

from conftest import run_cli
from test_faults import assert_identical
from test_jobs import N, SMALL

CPU_A = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n\nprocessor\t: 1\nflags\t\t: x\n"
CPU_B = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma avx512f\n"


def _job(run_dir, cache_root, *extra: str) -> tuple[int, int]:
    """Run the small job; returns (compiled, loaded) executables as the job reports them."""
    out = run_cli(*SMALL, f"run.n_iter={N}", f"hydra.run.dir={run_dir}", *extra,
                  env={compile_cache.ENV: str(cache_root)})
    assert out.returncode == 0, out.stdout + out.stderr
    m = re.search(r"XLA executables: (\d+) compiled, (\d+) loaded", out.stdout)
    assert m, out.stdout
    return int(m[1]), int(m[2])


def test_a_repeated_job_loads_its_executables_and_repairs_damaged_ones(tmp_path) -> None:
    root = tmp_path / "cache"
    compiled, loaded = _job(tmp_path / "cold", root)  # loaded: a function compiled twice
    assert compiled > 10
    executables = compiled + loaded
    assert _job(tmp_path / "warm", root) == (0, executables)  # nothing compiled: all loaded
    assert_identical(tmp_path / "cold", tmp_path / "warm")

    entries = sorted(p for d in root.iterdir() for p in d.glob(f"*{compile_cache.SUFFIX}"))
    assert len(entries) == compiled
    rng = random.Random(0)
    damaged = rng.sample(entries, 3)
    for i, path in enumerate(damaged):
        data = bytearray(path.read_bytes())
        if i == 0:
            data = data[:len(data) // 2]  # truncated
        else:
            data[rng.randrange(32, len(data))] ^= 0xFF  # one flipped byte
        path.write_bytes(bytes(data))
    recompiled, loaded = _job(tmp_path / "repaired", root)
    assert 1 <= recompiled <= 3 * 4 and loaded > 0, (recompiled, loaded)
    assert_identical(tmp_path / "cold", tmp_path / "repaired")

    assert _job(tmp_path / "none", root, "run.compile_cache=null") == (executables, 0)


def test_entries_are_written_whole_and_checked_on_reading(tmp_path) -> None:
    store = compile_cache.AtomicFileCache(str(tmp_path))
    assert store.get("k") is None
    store.put("k", b"executable")
    assert store.get("k") == b"executable"
    store.put("k", b"other")  # an existing entry is never rewritten
    assert store.get("k") == b"executable"
    assert not list(tmp_path.glob(".tmp-*"))

    (tmp_path / f"bad{compile_cache.SUFFIX}").write_bytes(b"\0" * 32 + b"garbage")
    assert store.get("bad") is None
    assert not (tmp_path / f"bad{compile_cache.SUFFIX}").exists()

    fresh, stale = tmp_path / ".tmp-fresh", tmp_path / ".tmp-stale"  # a killed writer's leftovers
    fresh.write_bytes(b"x")
    stale.write_bytes(b"x")
    old = os.path.getmtime(stale) - 2 * compile_cache.STALE_TMP_S
    os.utime(stale, (old, old))
    compile_cache.AtomicFileCache(str(tmp_path))
    assert fresh.exists() and not stale.exists()


def test_the_directory_follows_the_instruction_set_and_jax_version(tmp_path) -> None:
    a = compile_cache.directory(str(tmp_path), CPU_A)
    reordered = CPU_A.replace("avx avx2 fma", "fma avx2 avx")
    assert a == compile_cache.directory(str(tmp_path), reordered)
    assert a != compile_cache.directory(str(tmp_path), CPU_B)
    assert os.path.dirname(a) == str(tmp_path)
    assert f"jax-{compile_cache.jax.__version__}-" in os.path.basename(a)


def test_no_cache_or_an_unusable_root_leaves_the_run_without_one(tmp_path) -> None:
    assert compile_cache.enable(None) is None
    assert compile_cache.enable("") is None
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert compile_cache.enable(str(blocker)) is None
    assert compile_cache.default_root() == os.environ[compile_cache.ENV]
