"""Bad input: a one-line error naming the field and the value, before any computation."""
from __future__ import annotations

import os

import numpy as np
import pytest
from pipeline.config import ConfigError, compose, conf_dir, validate
from pipeline.report import reference_energy

from conftest import make_config, run_cli

BAD = [
    ({"lattice.L": 6, "lattice.patch": 4}, "lattice.L=6: not divisible by lattice.patch=4"),
    ({"lattice.L": 3, "lattice.patch": 1}, "lattice.L=3: N = L^2 = 9 is odd"),
    ({"lattice.L": 1, "lattice.patch": 1}, "lattice.L=1"),
    ({"lattice.kind": "triangular"},
     "lattice.kind='triangular': Invalid value 'triangular', expected one of [square, shastry_sutherland]"),
    ({"model.heads": 3}, "model.heads=3: does not divide model.d=16"),
    ({"model.d": 0}, "model.d=0"),
    ({"model.attention": "linear"}, "model.attention='linear': Invalid value 'linear', expected one of "
                                    "[factored, standard]"),
    ({"model.symmetry": "everything"}, "model.symmetry='everything'"),
    ({"model.d": "big"}, "model.d='big': Value 'big' of type 'str' could not be converted to Integer"),
    ({"model.chunk_size": -1}, "model.chunk_size=-1"),
    ({"sampler.n_samples": 0}, "sampler.n_samples=0: must be positive"),
    ({"sampler.n_chains": -4}, "sampler.n_chains=-4: must be positive"),
    ({"sampler.n_samples": 1000}, "sampler.n_samples=1000: not a multiple of sampler.n_chains=1024"),
    ({"sampler.n_samples_final": 100}, "sampler.n_samples_final=100"),
    ({"sampler.n_thermalize": -1}, "sampler.n_thermalize=-1"),
    ({"sampler.kind": "exact", "lattice.L": 6}, "sampler.kind='exact': enumerates the Sz = 0 sector"),
    ({"optimizer.solver": "qr"}, "optimizer.solver='qr': Invalid value 'qr'"),
    ({"optimizer.lr": 0.0}, "optimizer.lr=0.0: must be positive"),
    ({"optimizer.lr": float("inf")}, "optimizer.lr=inf: must be finite"),
    ({"optimizer.diag_shift": -1e-3}, "optimizer.diag_shift=-0.001"),
    ({"optimizer.diag_shift": float("inf")}, "optimizer.diag_shift=inf: must be finite"),
    ({"optimizer.phase_scale": float("nan")}, "optimizer.phase_scale=nan: must be finite"),
    ({"optimizer.cg_tol": float("inf")}, "optimizer.cg_tol=inf: must be finite"),
    ({"optimizer.cg_maxiter": 0}, "optimizer.cg_maxiter=0"),
    ({"optimizer.momentum": 1.0}, "optimizer.momentum=1.0: must be in [0, 1)"),
    ({"optimizer.max_step": -0.1}, "optimizer.max_step=-0.1: must be finite and >= 0"),
    ({"optimizer.phase_scale": 0.0}, "optimizer.phase_scale=0.0: must be positive"),
    ({"run.n_iter": 0}, "run.n_iter=0: must be positive"),
    ({"run.n_iter": -5}, "run.n_iter=-5"),
    ({"run.seed": -1}, "run.seed=-1"),
    ({"run.seed": 2 ** 63}, "run.seed=9223372036854775808: must be in [0, 2^63)"),
    ({"hamiltonian.J1": 0.0, "hamiltonian.J2": 0.0}, "hamiltonian.J1=0.0: and hamiltonian.J2 are both zero"),
    ({"hamiltonian.J2": float("nan")}, "hamiltonian.J2=nan: must be finite"),
    ({"checkpoint.keep": 0}, "checkpoint.keep=0"),
    ({"checkpoint.every_steps": 0}, "checkpoint.every_steps=0"),
    ({"launcher.kind": "pbs"}, "launcher.kind='pbs'"),
    ({"launcher.tasks_per_node": 0}, "launcher.tasks_per_node=0"),
    ({"launcher.mem_gb": 0.0}, "launcher.mem_gb=0.0"),
    ({"analysis.every_steps": -1}, "analysis.every_steps=-1: must be >= 0"),
    ({"lattice.kind": "shastry_sutherland", "model.symmetry": "translations"},
     "model.symmetry='translations': projects over shifts by one site"),
    ({"lattice.kind": "shastry_sutherland", "model.symmetry": "full"}, "model.symmetry='full'"),
    ({"lattice.kind": "shastry_sutherland", "lattice.L": 6, "lattice.patch": 3},
     "lattice.patch=3: an odd patch makes the ViT invariant under shifts by an odd number"),
    ({"lattice.kind": "shastry_sutherland", "lattice.patch": 1}, "lattice.patch=1: an odd patch"),
    ({"lattice.kind": "shastry_sutherland", "sampler.final_symmetry": "translations"},
     "sampler.final_symmetry='translations': projects over shifts"),
    ({"lattice.kind": "shastry_sutherland", "run.finetune_steps": 10},
     "run.finetune_steps=10: projects over shifts"),
    ({"run.finetune_steps": 300}, "run.finetune_steps=300: must be in [0, run.n_iter=300)"),
    ({"run.max_rise": -0.01}, "run.max_rise=-0.01: must be finite and >= 0"),
    ({"run.max_rise": float("inf")}, "run.max_rise=inf: must be finite and >= 0"),
    ({"sampler.final_symmetry": "most"}, "sampler.final_symmetry='most'"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[m.split(":")[0] for _, m in BAD])
def test_bad_value_names_field_and_value(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        make_config(**overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_chains_not_divisible_by_ranks() -> None:
    c = make_config(**{"sampler.n_chains": 1024, "sampler.n_samples": 1024})
    with pytest.raises(ConfigError, match=r"sampler.n_chains=1024: not divisible by the number of MPI ranks \(3\)"):
        validate(c, n_ranks=3)


def _compose(*overrides: str):
    return compose(overrides)


@pytest.mark.parametrize("group,options", [
    ("model", ["vit_factored", "vit_standard"]), ("lattice", ["square", "shastry_sutherland"]),
    ("launcher", ["local", "slurm"]), ("experiment", ["attention_study", "bench_4x4", "bench_6x6", "paper_4x4", "paper_6x6", "paper_8x8",
                    "paper_10x10", "shastry_sutherland", "size_sweep"])])
def test_every_config_composes_and_validates(group: str, options: list[str]) -> None:
    on_disk = sorted(f[:-5] for f in os.listdir(os.path.join(conf_dir(), group)) if f.endswith(".yaml"))
    assert on_disk == sorted(options)
    for option in options:
        prefix = "+" if group == "experiment" else ""
        validate(_compose(f"{prefix}{group}={option}"))


def test_wrong_type_and_unknown_key_are_refused_by_the_schema() -> None:
    with pytest.raises(Exception, match="lattice.L"):
        _compose("lattice.L=four")
    with pytest.raises(Exception, match="lattice.size"):
        _compose("lattice.size=4")
    with pytest.raises(Exception, match="model=vit_linear|vit_linear"):
        _compose("model=vit_linear")


def test_cli_reports_bad_input_in_one_line_before_computing(tmp_path) -> None:
    out = run_cli("model.heads=5", f"hydra.run.dir={tmp_path}/run", timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == "error: model.heads=5: does not divide model.d=16"
    assert not os.path.exists(tmp_path / "run" / "results.h5")


@pytest.mark.parametrize("experiment", ["attention_study", "bench_4x4", "paper_4x4", "paper_6x6",
                                        "shastry_sutherland", "size_sweep"])
def test_every_experiment_runs_two_steps(experiment: str) -> None:
    from pipeline.driver import Driver
    from pipeline.system import System

    c = validate(_compose(f"+experiment={experiment}", "run.n_iter=2", "sampler.n_thermalize=2",
                          "sampler.n_chains=64", "sampler.n_samples=128",
                          "sampler.n_samples_final=128"))
    system = System.build(c)
    state, final = Driver(system).run(Driver(system).fresh_state())
    e, err = final["energy_per_site"], final["energy_error"]
    assert state.step == 2 and np.isfinite(e)
    reference = reference_energy(c, system.hamiltonian)
    if reference is not None:  # the variational bound, up to the statistical error
        assert e > reference - 5 * err
    # the Marshall rotation makes a near-random state's energy negative; without it (the dimer
    # singlets' signs are learned) a near-random state has positive energy
    if c.hamiltonian.marshall_sign:
        assert e < 0


def test_choices_are_checked_by_the_schema_when_composing() -> None:
    for override, bad in (("model.attention=linear", "linear"), ("optimizer.solver=qr", "qr"),
                          ("model.symmetry=all", "all"), ("lattice.kind=hex", "hex")):
        with pytest.raises(Exception, match=f"override {override}") as err:
            _compose(override)
        assert f"Invalid value '{bad}'" in str(err.value.__cause__)


def test_model_name_follows_the_attention_kind() -> None:
    assert validate(_compose("model.attention=standard")).model.name == "vit_standard"
    assert validate(_compose("model=vit_standard")).model.name == "vit_standard"
    assert validate(_compose()).model.name == "vit_factored"


@pytest.mark.mpi
@pytest.mark.slow
@pytest.mark.parametrize("experiment,params", [("paper_8x8", 432_456), ("paper_10x10", 433_320)])
def test_paper_experiments_run_two_steps_on_two_ranks(tmp_path, experiment: str, params: int) -> None:
    """The published model size, validated and run for 2 steps on 2 real ranks (kernel SR
    distributed by parameter blocks), with few samples, short sweeps and no symmetry projection
    (which change the cost, not the parameters: 63 s instead of 212 s for 10x10 here)."""
    from conftest import mpirun

    out = run_cli(f"+experiment={experiment}", "run.n_iter=2", "sampler.n_samples=32",
                  "sampler.n_chains=32", "sampler.n_samples_final=32", "sampler.n_thermalize=1",
                  "sampler.sweep_size=20", "model.symmetry=none", "model.chunk_size=16",
                  f"hydra.run.dir={tmp_path}/run", launcher=mpirun(2), timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    n = int(out.stdout.split(" parameters")[0].split()[-1])
    assert n == params
    assert "SR solver kernel" in out.stdout and "rank 1/2" in out.stdout
    assert "final: L=" in out.stdout


@pytest.mark.parametrize("overrides", [
    [], ["model=vit_standard"], ["model.translation_invariant=false", "model.layers=2"],
    ["lattice.L=6", "lattice.patch=3", "model=vit_standard", "model.d=12", "model.heads=3"],
])
def test_memory_estimate_counts_the_model_parameters(overrides) -> None:
    """budget.n_params (from the config alone) equals the initialized model's count."""
    from pipeline import budget
    from pipeline.system import System

    c = validate(compose(overrides))
    s = System.build(c)
    assert budget.n_params(c) == s.n_params(s.init_params(0))


def test_memory_estimate_refuses_what_cannot_fit_and_passes_the_default() -> None:
    from pipeline import budget

    budget.check(validate(compose([])), 1, 4e9, "a 4 GB rank")
    with pytest.raises(ConfigError, match=r"needs at least .* \(X: .*model.d = 4096"):
        budget.check(validate(compose(["model.d=4096"])), 1, 24e9, "this machine")
    big = validate(compose(["+experiment=paper_10x10"]))
    with pytest.raises(ConfigError, match="launcher.mem_gb=4.0"):
        budget.check(big, 1, *budget.slurm_bytes(big))
    budget.check(big, 16, 16e9, "a 16 GB GPU")  # the published run on 16 ranks fits


def test_automatic_forward_chunk_follows_the_model_the_projection_and_the_platform() -> None:
    """model.chunk_size=0 on an accelerator: one chunk for the 4x4 defaults (~35k connected
    configurations), 16384 for the 6x6 model whose whole-batch default was slow and fat, smaller
    under projection. On CPU: chunks of about 3 MiB of activations (in cache), at most 512, here
    512 and 256.
    An explicit value wins everywhere."""
    from pipeline import budget

    six_kw = {"lattice.L": 6, "model.d": 32, "model.heads": 4, "model.layers": 2}
    six = make_config(**six_kw)
    assert budget.forward_chunk(make_config(), "gpu") >= 1024 * 34
    for kind in ("factored", "standard"):
        kind_kw = {"model.attention": kind}
        assert budget.forward_chunk(make_config(**six_kw, **kind_kw), "gpu") == 16384
    full = budget.forward_chunk(make_config(**{"model.d": 32, "model.symmetry": "full"}), "gpu")
    assert budget.MIN_CHUNK <= full <= 2048 and full & (full - 1) == 0
    huge = make_config(**{"lattice.L": 40, "model.d": 512})
    assert budget.forward_chunk(huge, "gpu") == budget.MIN_CHUNK
    assert budget.forward_chunk(make_config(), "cpu") == 512  # 1536 of 4 patches x 64 x 8 bytes fit
    assert budget.forward_chunk(six, "cpu") == 256  # 9 patches x 128 x 8 bytes: 341 fit
    assert budget.forward_chunk(huge, "cpu") == budget.MIN_CPU_CHUNK
    for platform in ("cpu", "gpu"):
        assert budget.forward_chunk(make_config(**{"model.chunk_size": 300}), platform) == 300


def test_automatic_jacobian_chunk_fits_rows_and_activations_in_cache_on_cpu() -> None:
    """model.chunk_size=0: on CPU 2P float64 per Jacobian row plus the backward activations in
    CACHE_JACOBIAN_BYTES (P = 23464 on 6x6: 16 samples), on an accelerator all samples at once."""
    from pipeline import budget

    six = make_config(**{"lattice.L": 6, "model.d": 32, "model.heads": 4, "model.layers": 2})
    assert budget.n_params(six) == 23464
    assert budget.jacobian_chunk(six, "cpu") == 16
    assert budget.jacobian_chunk(six, "gpu") == 0
    assert budget.jacobian_chunk(make_config(**{"model.chunk_size": 300}), "cpu") == 300
    assert budget.rows_per_chunk(1000, 16) == 10 and budget.rows_per_chunk(1000, 0) == 1000


def test_memory_estimate_covers_the_final_measurement_and_caps_the_jacobian_chunk() -> None:
    """The final measurement's batch (sampler.n_samples_final) counts for the activations; a
    model.chunk_size beyond the samples is the whole batch, not a larger Jacobian chunk."""
    from pipeline import budget

    small_final = make_config(**{"sampler.n_samples_final": 1024, "model.chunk_size": 10 ** 7})
    big_final = make_config(**{"sampler.n_samples_final": 65536, "model.chunk_size": 10 ** 7})
    assert budget.per_rank(big_final, 1)["activations"] > 30 * budget.per_rank(small_final, 1)["activations"]
    assert budget.per_rank(small_final, 1)["chunk"] == budget.per_rank(
        make_config(**{"model.chunk_size": 1024}), 1)["chunk"]


def test_resume_accepts_checkpoints_written_before_a_key_existed() -> None:
    """A key added later (here run.finetune_steps, sampler.final_symmetry, optimizer.max_step,
    sampler.kind) counts as its default
    in an older checkpoint's config; a non-default value is still a difference."""
    import yaml

    from pipeline.config import config_differences, to_yaml

    current = make_config()
    old = yaml.safe_load(to_yaml(current))
    del old["run"]["finetune_steps"], old["sampler"]["final_symmetry"]
    del old["optimizer"]["max_step"], old["sampler"]["kind"]
    assert config_differences(yaml.safe_dump(old), current) == []
    changed = make_config(**{"run.finetune_steps": 5})
    assert config_differences(yaml.safe_dump(old), changed) == ["run.finetune_steps: 0 -> 5"]
    # the trust region that conf/optimizer/sr.yaml sets would change an older run's trajectory
    limited = make_config(**{"optimizer.max_step": 0.1})
    assert config_differences(yaml.safe_dump(old), limited) == ["optimizer.max_step: 0.0 -> 0.1"]
