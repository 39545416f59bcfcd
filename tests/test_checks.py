"""DAG-time config checks (study/checks.py): each kind of bad value gives one line naming the key and the value;
the repository's configs pass. (A representative few also go through `snakemake -n` in test_workflow.py.)"""

import inspect
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from study.checks import check_study, dataset_size, parse_dataset_spec, study_problems
from study.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "workflow" / "config"
ARCHS = ["xs", "s", "m", "l", "xl", "xxl", "t0", "t1", "t2", "t3"]


def smoke():
    return load_config(CONFIGS / "smoke.yaml")


def problems(cfg):
    return study_problems(cfg, basedir=REPO, arch_names=ARCHS)


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIGS.glob("*.yaml")))
def test_repository_configs_pass(name):
    check_study(load_config(CONFIGS / f"{name}.yaml"), basedir=REPO)  # the family's real table


def test_arch_names_come_from_the_family_table():
    from models import family
    from models.sizes import SIZES
    from study.checks import known_arch_names

    assert known_arch_names() == list(SIZES)
    for name in known_arch_names():  # the torch-free table holds constructor arguments of the family's nets
        constructor = family.FAMILIES[family.family_of(name)]
        assert set(SIZES[name]) <= set(inspect.signature(constructor).parameters), name


def test_unknown_arch_named_per_model():
    cfg = smoke()
    cfg["models"]["t1"]["arch"] = "t99"
    (line,) = problems(cfg)
    assert line.startswith("models.t1.arch:") and "'t99'" in line


@pytest.mark.parametrize("section", ["evaluation", "optimal_loss"])
def test_inverted_sigma_range(section):
    cfg = smoke()
    cfg[section].update(sigma_min=50.0, sigma_max=40.0)
    (line,) = problems(cfg)
    assert line.startswith(f"{section}.sigma_min:") and "50" in line and "40" in line


def test_sigma_of_any_section_must_be_positive():
    cfg = smoke()
    cfg["variant"]["kwargs"]["sigma_min"] = -0.1  # any section with sigma_min / sigma_max, not a fixed list
    (line,) = problems(cfg)
    assert line.startswith("variant.kwargs.sigma_min:") and "-0.1" in line


def test_equal_sigma_bounds_fail():
    cfg = smoke()
    cfg["evaluation"].update(sigma_min=1.0, sigma_max=1.0)
    assert len(problems(cfg)) == 1


def test_first_snapshot_beyond_total_images():
    cfg = smoke()
    cfg["training"]["total_images"] = 256  # first_images 384
    (line,) = problems(cfg)
    assert "training.snapshots.first_images" in line and "256" in line and "384" in line
    assert "models t0, t1, t2" in line  # a study-wide setting: one line, naming the models it concerns


def test_snapshot_error_quotes_the_configs_own_total():
    cfg = smoke()
    cfg["training"]["total_images"] = 200  # rounded up to 256 images (4 batches of 64); first_images 384
    (line,) = problems(cfg)
    assert "total_images=200 " in line and "rounded up to whole batches: 256" in line


def test_training_shorter_than_one_batch():
    cfg = smoke()
    cfg["training"].update(total_images=32, snapshots={"count": 2, "spacing": "geometric", "first_images": 16})
    (line,) = problems(cfg)
    assert line.startswith("training.total_images: 32 is less than one batch (training.batch_size = 64)")


def test_model_names_differing_only_in_case():
    cfg = smoke()
    cfg["models"]["T1"] = {"arch": "t1"}
    (line,) = problems(cfg)
    assert line.startswith("models.T1: the same name as models.t1 but for case")


def test_every_line_names_the_config_file(tmp_path):
    cfg = smoke()
    cfg["models"]["t1"]["arch"] = "t99"
    cfg["evaluation"]["sigma_max"] = 0.001
    with pytest.raises(ConfigError) as e:
        check_study(cfg, basedir=REPO, arch_names=ARCHS, where="studies/my.yaml")
    lines = str(e.value).splitlines()
    assert len(lines) == 2 and all(line.startswith("studies/my.yaml: ") for line in lines)
    assert "models.t1.arch: unknown architecture 't99'" in lines[0]


def test_config_cli_names_the_file_in_each_line(tmp_path, capsys):
    from study.config import main

    cfg = yaml.safe_load((CONFIGS / "smoke.yaml").read_text())
    cfg["models"]["t1"]["arch"] = "t99"
    path = tmp_path / "my.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main([str(path)]) == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "t99" in line]
    assert line.startswith(f"{path}: models.t1.arch: unknown architecture")


def test_explicit_snapshot_mark_beyond_total_images_of_one_model():
    cfg = smoke()
    cfg["models"]["t2"]["training"] = {"snapshots": {"images": [512, 4096]}}
    (line,) = problems(cfg)
    assert "training.snapshots.images" in line and "4096" in line and line.endswith("[model t2]")


def test_missing_accelerate_config(tmp_path):
    cfg = smoke()
    cfg["training"]["launch"]["accelerate_config"] = "workflow/accelerate/nope.yaml"
    (line,) = problems(cfg)
    assert "training.launch.accelerate_config" in line and "nope.yaml" in line and "not found" in line


@pytest.mark.parametrize("text,what", [("a: [1, 2\n", "not valid YAML"), ("- just\n- a list\n", "mapping")])
def test_unparsable_accelerate_config(tmp_path, text, what):
    bad = tmp_path / "acc.yaml"
    bad.write_text(text)
    cfg = smoke()
    cfg["models"]["t0"]["training"] = {"launch": {"accelerate_config": str(bad)}}
    (line,) = problems(cfg)
    assert str(bad) in line and what in line and line.endswith("[model t0]")


def smoke_yaml():
    return yaml.safe_load((CONFIGS / "smoke.yaml").read_text())


def test_batch_not_divisible_by_processes():
    raw = smoke_yaml()
    raw["training"]["launch"]["num_processes"] = 3
    with pytest.raises(ConfigError, match=r"^config: training\.batch_size: 64 is not divisible by the 3 processes$"):
        load_config(raw)  # load_config checks the split, before any DAG-time check


@pytest.mark.parametrize("launch,named", [
    ({"accelerate_config": "workflow/accelerate/ddp-bf16.yaml", "num_processes": 4, "num_machines": 3},
     ["training.launch.num_processes: 4", "num_machines (3)"]),
    ({"num_processes": 2, "num_machines": 2}, ["training.launch.num_machines: 2", "cpu.yaml", "distributed_type NO"]),
], ids=["uneven", "not-distributed"])
def test_bad_multi_node_launch(launch, named):
    cfg = smoke()
    cfg["models"]["t1"]["training"] = {"launch": launch}
    (line,) = problems(cfg)
    assert all(s in line for s in named) and line.endswith("[model t1]"), line


def test_multi_node_launch_passes_and_gpus_count_every_node():
    cfg = smoke()
    cfg["models"]["t1"]["training"] = {"launch": {"accelerate_config": "workflow/accelerate/ddp-bf16.yaml",
                                                  "num_processes": 4, "num_machines": 2}}
    assert problems(cfg) == []
    cfg["models"]["t1"]["resources"] = {"gpus": 2}  # per node, not per job
    (line,) = problems(cfg)
    assert line.startswith("models.t1.resources.gpus: 2") and "num_processes = 4" in line and "2 nodes" in line


def test_tracker_package_is_checked(monkeypatch):
    import study.checks as checks

    cfg = smoke()
    cfg["models"]["t2"]["training"] = {"trackers": ["tensorboard", "mlflow"]}
    installed = {"tensorboard"}
    monkeypatch.setattr(checks, "module_missing", lambda name: name not in installed)
    (line,) = checks.check_packages(cfg, REPO)
    assert line.startswith("training.trackers mlflow needs the mlflow tracker") and "pip install mlflow" in line
    assert line.endswith("[model t2]")
    installed.clear()
    assert any('".[tracking]"' in line for line in checks.check_packages(cfg, REPO))


@pytest.mark.parametrize("batch_gpu,ok", [(16, True), (32, True), (12, False), (64, True)])
def test_batch_gpu_must_divide_the_per_process_batch(batch_gpu, ok):
    raw = smoke_yaml()
    raw["training"]["launch"]["num_processes"] = 2  # per process: 32
    raw["training"]["batch_gpu"] = batch_gpu  # larger than the per-process batch: the whole of it (as EDM2)
    if ok:
        assert problems(load_config(raw)) == []
    else:
        with pytest.raises(ConfigError, match=rf"training\.batch_gpu: {batch_gpu} does not divide the per-process "
                                              r"batch 32 \(batch_size 64 / 2 processes\)"):
            load_config(raw)


def test_batch_gpu_absent_or_null_is_not_checked():
    raw = smoke_yaml()
    assert "batch_gpu" not in raw["training"]
    raw["training"]["batch_gpu"] = None
    assert problems(load_config(raw)) == []


@pytest.mark.parametrize("spec", ["digts", "cifar:/data", "imagefolder:", "images.png", "/no/such/folder"])
def test_bad_dataset_spec(spec):
    cfg = smoke()
    cfg["dataset"]["spec"] = spec
    (line,) = problems(cfg)
    assert line.startswith("dataset.spec:") and repr(spec) in line


@pytest.mark.parametrize("spec,kind", [("digits", "digits"), ("/missing/x.npz", "npz"), ("a.npy", "npy"),
                                       ("cifar10:/missing", "cifar10"), ("imagefolder:/missing", "imagefolder")])
def test_dataset_spec_syntax_only_paths_may_be_missing(spec, kind):
    assert parse_dataset_spec(spec)[0] == kind  # a dry run of a cluster study works anywhere


def test_existing_folder_is_a_spec(tmp_path):
    assert parse_dataset_spec(str(tmp_path)) == ("dir", str(tmp_path))


def test_subset_size_beyond_digits():
    cfg = smoke()
    cfg["optimal_loss"]["subset_size"] = 5000
    (line,) = problems(cfg)
    assert line.startswith("optimal_loss.subset_size: 5000") and "1797" in line


def test_batch_beyond_the_dataset_size():
    cfg = smoke()
    cfg["models"]["t2"]["training"] = {"batch_size": 2048, "total_images": 4096}
    (line,) = problems(cfg)
    assert line == "training.batch_size: 2048 is more than the 1797 images of dataset 'digits' [model t2]"


def test_subset_size_of_the_full_estimator_only_is_not_checked():
    cfg = smoke()
    cfg["optimal_loss"].update(subset_size=5000, estimator="full", compare_estimators=["full"])
    assert problems(cfg) == []


@pytest.mark.parametrize("container", ["npy", "npz"])
def test_dataset_size_from_the_array_header(tmp_path, container):
    x = np.zeros((37, 1, 4, 4), np.uint8)
    path = tmp_path / f"d.{container}"
    if container == "npy":
        np.save(path, x)
    else:
        with open(path, "wb") as f:
            np.savez(f, x=x, labels=np.zeros(37, np.int64))
    assert dataset_size(str(path)) == 37
    cfg = smoke()
    cfg["dataset"]["spec"] = str(path)
    cfg["optimal_loss"]["subset_size"] = 38
    subset, batch = problems(cfg)  # and smoke's batch of 64 is more than the set
    assert "N = 37" in subset and batch.startswith("training.batch_size: 64 is more than the 37 images")


def test_every_problem_is_listed_in_one_error():
    cfg = smoke()
    cfg["models"]["t1"]["arch"] = "t99"
    cfg["evaluation"]["sigma_max"] = 0.001
    cfg["dataset"]["spec"] = "digts"
    with pytest.raises(ConfigError) as e:
        check_study(cfg, basedir=REPO, arch_names=ARCHS)
    lines = str(e.value).splitlines()
    assert len(lines) == 3 and lines[0].startswith("models.t1.arch")


def test_checks_module_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys; import study.checks, study.config; "
            "assert 'torch' not in sys.modules, 'study.checks imported torch'")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


# -- packages each configured path needs ------------------------------------------------------------------------

def test_deepspeed_missing_is_one_line_naming_the_models_config_and_install(monkeypatch):
    cfg = load_config(CONFIGS / "paper-img64.yaml")
    assert problems(cfg) == []                                 # DeepSpeed is installed (the test extra)
    monkeypatch.setitem(sys.modules, "deepspeed", None)        # `import deepspeed` now fails
    (line,) = problems(cfg)
    assert "training.launch.accelerate_config workflow/accelerate/deepspeed-zero2.yaml" in line
    assert "'deepspeed'" in line and 'pip install -e ".[deepspeed]"' in line and line.endswith("[models l, xl, xxl]")


def test_image_folder_needs_pillow(monkeypatch):
    cfg = load_config(CONFIGS / "paper-rehearsal.yaml")
    monkeypatch.setitem(sys.modules, "PIL", None)
    (line,) = problems(cfg)
    assert line.startswith("dataset.spec 'imagefolder:") and "'PIL'" in line and "pip install pillow" in line


def test_a_path_adds_its_packages_in_one_row():
    """A new path (here a made-up tracker) needs only its row: the setting that selects it, its modules, the
    install command; only the models that select it are named."""
    from study.checks import PathPackages, check_packages

    cfg = smoke()
    cfg["models"]["t1"]["training"] = {"seed": 7}
    row = PathPackages("the made-up tracker", lambda cfg, training, basedir: "training.seed 7"
                       if training["seed"] == 7 else None, ("json", "no_module_of_this_name"), "pip install it")
    (line,) = check_packages(cfg, REPO, table=[row])
    assert line == ("training.seed 7 needs the made-up tracker, which is not installed here (no module "
                    "'no_module_of_this_name'): pip install it [model t1]")


def test_snakemake_dry_run_fails_while_the_dag_is_built_without_deepspeed(tmp_path):
    """The real `snakemake -n` of a paper study, in a Python where `import deepspeed` fails (sitecustomize)."""
    import os
    import subprocess

    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['deepspeed'] = None\n")
    p = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--directory", str(tmp_path / "run"),
                        "--configfile", str(CONFIGS / "paper-img512.yaml")], cwd=REPO, capture_output=True,
                       text=True, timeout=900, env={**os.environ, "PYTHONPATH": str(hide)})
    assert p.returncode != 0
    lines = [line for line in (p.stdout + p.stderr).splitlines() if "needs DeepSpeed" in line]
    assert len(lines) == 1 and "deepspeed-zero2.yaml" in lines[0] and "[models l, xl, xxl]" in lines[0]
    assert 'pip install -e ".[deepspeed]"' in lines[0]
    assert not (tmp_path / "run" / "results").exists()         # nothing ran
