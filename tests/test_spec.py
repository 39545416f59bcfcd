"""study/spec.py: one resolved spec per model, computed without torch, equal to what the per-model functions give,
with the settings fingerprint of the run folders written before."""

import hashlib
import json
import subprocess
import sys
from dataclasses import FrozenInstanceError
from pathlib import Path

import pytest

from models.sizes import FAMILY
from study.config import ConfigError, load_config
from study.spec import (ModelSpec, micro_batch, model_spec, model_training, model_variant, resolve_specs, seed_sizes,
                        snapshot_marks, total_images)

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "workflow" / "config").glob("*.yaml"))


def test_resolving_every_config_imports_no_torch():
    """The Snakefile resolves the specs while it lays out the DAG: no torch on the way."""
    code = ("import sys\nfrom study.config import load_config\nfrom study.spec import resolve_specs\n"
            f"for path in {[str(c) for c in CONFIGS]!r}:\n    assert resolve_specs(load_config(path))\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_spec_is_what_the_per_model_functions_give(path):
    cfg = load_config(path)
    specs = resolve_specs(cfg)
    assert list(specs) == list(cfg["models"])
    sizes = seed_sizes(cfg)
    for name, spec in specs.items():
        training = model_training(cfg, name)
        arch = cfg["models"][name]["arch"]
        assert spec.name == name and spec.size == sizes[name]
        assert spec.arch == arch and spec.family == FAMILY[arch]
        assert spec.training == training and spec.variant == model_variant(cfg, name)
        assert list(spec.marks) == snapshot_marks(training) and spec.marks[-1] == spec.total
        assert spec.total == total_images(training)
        assert (spec.batch_gpu, spec.rounds) == micro_batch(training, training["launch"]["num_processes"])
        assert spec.micro_batch(1) == micro_batch(training, 1)
        assert spec == model_spec(cfg, name)


def test_spec_is_frozen_and_names_unknown_models():
    cfg = load_config(ROOT / "workflow" / "config" / "smoke.yaml")
    spec = resolve_specs(cfg)["t0"]
    assert isinstance(spec, ModelSpec)
    with pytest.raises(FrozenInstanceError):
        spec.total = 1
    with pytest.raises(ConfigError, match="models.t9: unknown model"):
        model_spec(cfg, "t9")


def test_spec_settings_leave_out_the_result_neutral_keys():
    cfg = load_config({"study": "s", "models": {"t0": {"arch": "t0", "training": {"batch_gpu": 32,
                                                                                  "trackers": ["tensorboard"]}}}})
    spec = resolve_specs(cfg)["t0"]
    assert "batch_gpu" not in spec.settings and "trackers" not in spec.settings
    assert spec.settings == {k: v for k, v in spec.training.items() if k not in ("batch_gpu", "trackers")}


# The settings fingerprints as the code before study.spec computed them (training.run_folder.config_fingerprint fed
# by model_training / model_variant / models.family.arch_kwargs / models.diffusion.get_variant): every model of
# every workflow/config/*.yaml on 4096 images of 3×32×32 (10 labels where the study is conditional), as the sha256
# of their sorted JSON; run folders written before must still be recognised, so it must not change (a config's edit
# changes it too).
EVERY_CONFIG_FINGERPRINTS = "571d61eb546973a3e677e69b08f55f5baa7eeb52452abc280e9b73d597c7e82c"
# describe_run's fingerprint of the smoke study's models on sklearn's digits: their done.json's config_fingerprint
SMOKE_FINGERPRINTS = {"t0": "c7e91f55d0e8ae0a1c217730fa7b9706a50cb5d3837f4c7a3fc0b9a02c0277c2",
                      "t1": "5f7dfda884c2db96f419716d065482a08140b1ff08786825e83da7e8f558da61",
                      "t2": "a3e493b0be54cf7f6066c7d4a9e443e2cef52b778c89c91a45d03080bced5e8d"}


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def test_fingerprint_of_every_model_unchanged():
    from models import family
    from models.diffusion import get_variant

    out = {}
    for path in CONFIGS:
        cfg = load_config(path)
        label_dim = 10 if cfg["dataset"].get("conditional") else 0
        fingerprints = {}
        for name, spec in resolve_specs(cfg).items():
            kwargs = family.arch_kwargs(spec.arch, resolution=32, channels=3, label_dim=label_dim,
                                        logvar=bool(spec.training["logvar"]), dropout=float(spec.training["dropout"]))
            variant = get_variant(spec.variant["name"], **(spec.variant.get("kwargs") or {}))
            fingerprints[name] = spec.fingerprint(kwargs, {"name": variant.name, "kwargs": variant.kwargs()},
                                                  (4096, 3, 32, 32), label_dim)
            assert fingerprints[name]["training"] == spec.settings
        out[path.name] = fingerprints
    assert _digest(out) == EVERY_CONFIG_FINGERPRINTS


def test_trainer_fingerprint_of_the_smoke_study_unchanged():
    from training.dataset import load_dataset
    from training.train import describe_run

    cfg, digits = load_config(ROOT / "workflow" / "config" / "smoke.yaml"), load_dataset("digits")
    runs = {name: describe_run(cfg, name, digits) for name in cfg["models"]}
    assert {name: _digest(run.fingerprint) for name, run in runs.items()} == SMOKE_FINGERPRINTS
    assert all(run.model_spec == model_spec(cfg, name) for name, run in runs.items())  # the spec, resolved once


def test_no_import_circle_in_study():
    """study's modules import one another one way only, counting imports inside functions (config's CLI uses the
    checks, the checks use the specs, nothing uses config back)."""
    import ast

    graph = {}
    for path in (ROOT / "study").glob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        graph[f"study.{path.stem}"] = {n for n in names if n.startswith("study.")} - {f"study.{path.stem}"}

    def reaches(start, goal, seen=()):
        return any(n == goal or (n in graph and n not in seen and reaches(n, goal, (*seen, n))) for n in graph[start])

    assert [m for m in graph if reaches(m, m)] == []
