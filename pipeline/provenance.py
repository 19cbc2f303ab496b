"""What produced a result: package versions, code version, rank count (saved in every output)."""
from __future__ import annotations

import os
import subprocess
from functools import lru_cache
from importlib import metadata

PACKAGES = ("vitnqs", "jax", "jaxlib", "flax", "optax", "numpy", "scipy", "h5py", "hydra-core",
            "submitit", "mpi4py", "mpi4jax", "mpich")


@lru_cache(maxsize=None)
def versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


@lru_cache(maxsize=None)
def code_version() -> str:
    """git commit of the source tree (with '-dirty' for local changes), or 'unknown'."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        rev = subprocess.run(["git", "-C", root, "describe", "--always", "--dirty", "--abbrev=12"],
                             capture_output=True, text=True, timeout=10)
        return rev.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_run_record(run_dir: str, config_yaml: str, overrides: list[str] | None) -> None:
    """<run dir>/.hydra/config.yaml (the resolved config) and overrides.yaml (the command line's
    overrides), written when a run starts, never for a refused one (Hydra's own writing of them
    is turned off: `hydra.output_subdir: null`)."""
    import yaml

    d = os.path.join(run_dir, ".hydra")
    os.makedirs(d, exist_ok=True)
    for name, text in (("config.yaml", config_yaml),
                       ("overrides.yaml", yaml.safe_dump(list(overrides or [])))):
        tmp = os.path.join(d, f"{name}.tmp-{os.getpid()}")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(d, name))
