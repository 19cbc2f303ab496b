"""The package as users get it: no import cycles, light imports for readers, a non-editable
install that runs from another directory."""
from __future__ import annotations

import ast
import os
import subprocess
import sys

from conftest import PYTHON, ROOT

PKG = os.path.join(ROOT, "pipeline")


def _module(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    return rel[:-9] if rel.endswith(".__init__") else rel


def _imports() -> dict[str, set[str]]:
    """Module-level imports of pipeline modules by each pipeline module (function-level imports
    are deliberate late imports and do not count)."""
    graph: dict[str, set[str]] = {}
    for dirpath, _, files in os.walk(PKG):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(dirpath, name)
            mod = _module(path)
            pkg = mod if name == "__init__.py" else mod.rsplit(".", 1)[0]
            deps = set()
            for node in ast.parse(open(path).read()).body:
                if isinstance(node, ast.ImportFrom) and node.level:
                    base = pkg.rsplit(".", node.level - 1)[0] if node.level > 1 else pkg
                    target = f"{base}.{node.module}" if node.module else base
                    deps.add(target)
                    if not node.module:
                        deps |= {f"{base}.{a.name}" for a in node.names}
            graph[mod] = deps
    return {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}


def test_no_import_cycle_in_the_package() -> None:
    graph = _imports()
    assert "pipeline.config" in graph and graph["pipeline.sr"]  # the walk found the modules
    done: set[str] = set()

    def visit(m: str, path: list[str]) -> None:
        if m in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(m):] + [m]))
        if m in done:
            return
        for d in sorted(graph[m]):
            visit(d, path + [m])
        done.add(m)

    for m in sorted(graph):
        visit(m, [])


def test_reading_results_starts_no_jax_and_pins_no_device() -> None:
    code = ("import os, sys; import pipeline.aggregate, pipeline.watch, pipeline.config, "
            "pipeline.results; print('jax' in sys.modules, os.environ.get('CUDA_VISIBLE_DEVICES'))")
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"} | {"SLURM_LOCALID": "1"}
    out = subprocess.run([PYTHON, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "None"]
    # ...while the computing modules do pin (one device per rank) and enable float64.
    code = ("import os, pipeline.sr, jax.numpy as jnp; "
            "print(os.environ['CUDA_VISIBLE_DEVICES'], jnp.zeros(1).dtype)")
    out = subprocess.run([PYTHON, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.stdout.split() == ["1", "float64"], out.stderr


def test_non_editable_install_runs_from_another_directory(tmp_path) -> None:
    """`pip install .` (a wheel, not editable) into a fresh venv, then two steps from elsewhere.
    The dependencies come from the project's .venv through a .pth file (no network needed); the
    package itself, its Hydra configs and its reference table come from the installed wheel."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = subprocess.run([str(venv / "bin" / "python"), "-c",
                           "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    deps = subprocess.run([PYTHON, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(site, "vitnqs-deps.pth"), "w") as f:
        f.write(deps + "\n")
    build = tmp_path / "build"
    out = subprocess.run([PYTHON, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
                          "--no-deps", "--no-build-isolation", "--no-cache-dir", "-q", ROOT],
                         capture_output=True, text=True, env=os.environ | {"TMPDIR": str(tmp_path)},
                         cwd=build.parent)
    assert out.returncode == 0, out.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    lib = os.path.join(os.path.dirname(os.path.dirname(PYTHON)), "lib")  # the mpich wheel's libmpi
    env = os.environ | {"LD_LIBRARY_PATH": lib, "PYTHONUNBUFFERED": "1"}
    run = subprocess.run([str(venv / "bin" / "python"), "-m", "pipeline", "model.d=8",
                          "sampler.n_samples=128", "sampler.n_chains=64", "sampler.n_thermalize=2",
                          "sampler.n_samples_final=128", "run.n_iter=2", "hydra.run.dir=run"],
                         cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "final: L=4 J2=0.5 vit_factored" in run.stdout and "reference -0.5286202" in run.stdout
    assert (elsewhere / "run" / "results.h5").exists()
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import pipeline; print(pipeline.__file__)"],
                           cwd=elsewhere, capture_output=True, text=True, env=env)
    assert where.stdout.startswith(site), where.stdout


def test_every_script_imports_against_the_current_package() -> None:
    """The benchmark scripts use the package's API (a renamed function must fail here, not in a
    benchmark run hours later)."""
    import glob

    scripts = sorted(glob.glob(os.path.join(ROOT, "scripts", "*.py")))
    code = ("import importlib.util, sys; sys.path.insert(0, 'scripts')\n"
            "for f in sys.argv[1:]:\n"
            "    spec = importlib.util.spec_from_file_location(f.rsplit('/', 1)[-1][:-3], f)\n"
            "    spec.loader.exec_module(importlib.util.module_from_spec(spec))\n")
    out = subprocess.run([PYTHON, "-c", code, *scripts], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert len(scripts) >= 7


def test_track_exact_runs_and_its_exact_energies_are_variational() -> None:
    """`scripts/track_exact` (here with optimizer.gram_dtype=float32, as `scripts/bench_gram`
    runs it) trains a small 4x4 model for 4 steps and prints exact energies above the exact
    ground-state energy."""
    out = subprocess.run([PYTHON, "scripts/track_exact.py", "--steps", "4", "--every", "2",
                          "optimizer.gram_dtype=float32", "model.d=8", "model.heads=2",
                          "sampler.n_samples=128", "sampler.n_chains=128"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    exact = [float(line.split("exact E/N")[1].split()[0]) for line in out.stdout.splitlines()
             if "exact E/N" in line and line.startswith("step")]
    assert len(exact) == 2 and all(e > -0.5286202095 for e in exact), out.stdout
