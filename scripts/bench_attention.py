"""Cost of the attention-map measurement (/attention) relative to training, per run.

For each run directory: median seconds per SR step, median seconds per attention measurement,
and the share of training time it costs at the default interval (analysis.every_steps = 25) and
at the run's own interval. Without directories, short standard-attention runs on L = 4 and 6
(d = 16, 2 heads, 2 layers, 1024 samples on 256 chains, 30 steps, maps every 5 steps) are made
in a temporary directory first.

usage: python scripts/bench_attention.py [RUN_DIR ...]
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import numpy as np
import yaml

from pipeline import results
from pipeline.config import AnalysisConfig

DEFAULT_EVERY = AnalysisConfig().every_steps


def make_runs(base: str) -> list[str]:
    dirs = []
    for L in (4, 6):
        d = os.path.join(base, f"L{L}")
        subprocess.run([sys.executable, "-m", "pipeline", "model=vit_standard", f"lattice.L={L}",
                        "model.layers=2", "sampler.n_samples=1024", "sampler.n_chains=256",
                        "sampler.n_samples_final=1024", "run.n_iter=30", "analysis.every_steps=5",
                        f"hydra.run.dir={d}"], check=True, stdout=subprocess.DEVNULL)
        dirs.append(d)
    return dirs


def main() -> None:
    dirs = sys.argv[1:] or make_runs(tempfile.mkdtemp(prefix="bench-attention-"))
    print(f"{'run':<60} {'s/step':>8} {'s/maps':>8} {'every':>5} {'share':>7} "
          f"{'share@' + str(DEFAULT_EVERY):>9}")
    for d in dirs:
        c = results.load(os.path.join(d, "results.h5"))
        every = yaml.safe_load(c.attrs["config"]).get("analysis", {}).get("every_steps", 0)
        step = float(np.median(c.history["seconds"][2:]))  # without the compiling steps
        maps = c.group("attention").get("seconds")
        if maps is None or len(maps) < 2:
            print(f"{d:<60} {step:8.3f}  (no attention rows)")
            continue
        probe = float(np.median(maps[1:]))  # the first call compiles
        print(f"{d:<60} {step:8.3f} {probe:8.4f} {every:5d} {probe / (every * step):7.2%} "
              f"{probe / (DEFAULT_EVERY * step):9.3%}")


if __name__ == "__main__":
    main()
