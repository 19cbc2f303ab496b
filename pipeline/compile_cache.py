"""The persistent XLA compilation cache (`run.compile_cache`): a resumed, requeued or repeated
job loads its compiled executables from disk instead of compiling them again.

JAX's own file cache writes entries in place and keys CPU executables without the processor's
instruction set, so this module installs its own store behind JAX's cache hooks:
- one directory per jax/jaxlib version and host instruction set (CPU flags), so a cache shared
  over a cluster's home directory never hands an AVX-512 executable to an older node;
- every entry written to a temporary file and renamed into place (a rank killed mid-write, or
  two ranks writing the same entry, leave either nothing or a whole entry), with a SHA-256 of its
  bytes that is checked on every read: a damaged entry is deleted and compiled again.
The cache is trusted code: the directory is created private to the user (mode 0700).
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pathlib
import platform
import tempfile
import time

import jax
from jax._src import compilation_cache as jax_cache
from jax._src.compilation_cache_interface import CacheInterface

log = logging.getLogger("vitnqs")

ENV = "VITNQS_COMPILE_CACHE"  # overrides the default root of run.compile_cache=auto
SUFFIX = ".xla"
STALE_TMP_S = 86400.0  # temporary files older than this are leftovers of killed writers


def default_root() -> str:
    """$VITNQS_COMPILE_CACHE, else $XDG_CACHE_HOME/vitnqs/xla (~/.cache/vitnqs/xla)."""
    if os.environ.get(ENV):
        return os.environ[ENV]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "vitnqs", "xla")


def host_isa(cpuinfo: str | None = None) -> str:
    """The processor's architecture and instruction-set flags (first CPU of /proc/cpuinfo),
    which decide what XLA's CPU code may use."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            cpuinfo = ""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return platform.machine() + " " + " ".join(sorted(value.split()))
    return platform.machine() + " " + platform.processor()


def directory(root: str, cpuinfo: str | None = None) -> str:
    """The cache directory under `root` for this jax version and host instruction set."""
    isa = hashlib.sha256(host_isa(cpuinfo).encode()).hexdigest()[:16]
    return os.path.join(os.path.expanduser(root), f"jax-{jax.__version__}-{isa}")


class AtomicFileCache(CacheInterface):
    """Entries as files `<key>.xla`: a SHA-256 digest, then the bytes JAX gave."""

    def __init__(self, path: str) -> None:
        self._path = pathlib.Path(path)
        self._path.mkdir(parents=True, exist_ok=True, mode=0o700)
        now = time.time()
        for tmp in self._path.glob(".tmp-*"):
            with contextlib.suppress(OSError):
                if now - tmp.stat().st_mtime > STALE_TMP_S:
                    tmp.unlink()

    def get(self, key: str) -> bytes | None:
        path = self._path / f"{key}{SUFFIX}"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        digest, value = data[:32], data[32:]
        if hashlib.sha256(value).digest() != digest:
            log.warning("compilation cache: damaged entry %s removed; compiling again", path)
            with contextlib.suppress(OSError):
                path.unlink()
            return None
        return value

    def put(self, key: str, value: bytes) -> None:
        path = self._path / f"{key}{SUFFIX}"
        if path.exists():
            return
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=self._path)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(hashlib.sha256(value).digest() + value)
            os.replace(tmp, path)
        except OSError as e:  # a full disk costs a compilation next time, never the run
            log.warning("compilation cache: cannot write %s: %s", path, e)
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def enable(setting: str | None) -> str | None:
    """Install the cache for `run.compile_cache` (a directory root, 'auto' for `default_root()`,
    None or '' for none) before the first compilation; returns the directory used, or None.
    A root that cannot be created leaves the run without a cache (a warning), never fails it."""
    if not setting:
        return None
    root = default_root() if setting == "auto" else setting
    path = directory(root)
    try:
        store = AtomicFileCache(path)
    except OSError as e:
        log.warning("compilation cache: cannot use %s (%s); compiling without it", path, e)
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # the many small ones add up
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    with jax_cache._cache_initialized_mutex:  # what jax_cache.reset_cache does, then ours
        jax_cache._cache = store
        jax_cache._cache_initialized = True
        jax_cache._cache_checked = jax_cache._cache_used = False
    return path
