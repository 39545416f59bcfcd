"""One autocast under every engine: under training.mixed_precision bf16 the DeepSpeed config the trainer builds
turns DeepSpeed's own `torch_autocast` on (its engine forward re-enters autocast by that section alone) with every
gradient reduced in fp32, and a DeepSpeed config that would train in another precision than the DDP path is
refused when the DAG is built, naming the model and the file.  On a GPU the engine asks the no-argument
`torch.is_autocast_enabled()` (CUDA's state); tests/autocast_probe.py makes the CPU answer the same way, so the
ZeRO-2 path is seen here as a GPU runs it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from test_train import free_port

from study.checks import deepspeed_precision_problems, study_problems, torch_autocast_section
from study.config import load_config
from training.train import check_fp32_engine, configure_deepspeed

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
ZERO2 = ROOT / "workflow/accelerate/deepspeed-zero2.yaml"


# ---------------------------------------------------------------------------------------------------------------
# the config the trainer builds, and what it refuses
# ---------------------------------------------------------------------------------------------------------------

def built_config(mixed_precision: str, ds_cfg: dict | None = None) -> dict:
    ds_cfg = dict(ds_cfg or {"zero_optimization": {"stage": 2}})
    training = {"mixed_precision": mixed_precision, "batch_size": 32, "grad_clip": None}
    configure_deepspeed(ds_cfg, training, batch_gpu=16, rounds=2, image_dims=64)
    return ds_cfg


def test_bf16_turns_deepspeeds_autocast_on_with_fp32_reduction():
    ds_cfg = built_config("bf16")
    assert ds_cfg["torch_autocast"] == {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    assert "bf16" not in ds_cfg and "fp16" not in ds_cfg
    assert built_config("no")["torch_autocast"] == {"enabled": False}
    # a section that says the same is kept, its unset keys filled
    ds_cfg = built_config("bf16", {"torch_autocast": {"enabled": True, "dtype": "bf16"}})
    assert ds_cfg["torch_autocast"] == {"enabled": True, "dtype": "bf16", "lower_precision_safe_modules": []}


def test_deepspeeds_reading_of_the_section():
    """DeepSpeed's own config parser reads the built section as bf16 autocast with no module reduced in bf16."""
    from deepspeed.runtime.config import (
        get_lower_precision_safe_modules,
        get_torch_autocast_dtype,
        get_torch_autocast_enabled,
    )

    ds_cfg = built_config("bf16")
    assert get_torch_autocast_enabled(ds_cfg) and get_torch_autocast_dtype(ds_cfg) == torch.bfloat16
    assert get_lower_precision_safe_modules(ds_cfg) == []     # None would mean nn.Linear/Conv* reduce in bf16
    assert not get_torch_autocast_enabled(built_config("no"))


@pytest.mark.parametrize("mixed_precision,ds_cfg,named", [
    ("bf16", {"bf16": {"enabled": True}}, "enables bf16"),
    ("no", {"fp16": {"enabled": "true"}}, "enables fp16"),
    ("bf16", {"torch_autocast": {"enabled": False}}, "turns torch_autocast off"),
    ("no", {"torch_autocast": {"enabled": True, "dtype": "bfloat16"}}, "turns torch_autocast on"),
    ("bf16", {"torch_autocast": {"enabled": True, "dtype": "fp16"}}, "torch_autocast.dtype 'fp16'"),
    ("bf16", {"torch_autocast": {"lower_precision_safe_modules": ["torch.nn.Linear"]}},
     "lower_precision_safe_modules"),
    ("no", {"communication_data_type": "bf16"}, "communication_data_type 'bf16'"),
])
def test_a_config_at_odds_with_the_ddp_path_is_refused(mixed_precision, ds_cfg, named):
    (line,) = deepspeed_precision_problems(ds_cfg, mixed_precision)
    assert named in line
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        check_fp32_engine(ds_cfg, mixed_precision)


def test_configs_that_train_alike_pass():
    for mp in ("no", "bf16"):
        assert deepspeed_precision_problems({"bf16": {"enabled": False}, "communication_data_type": "fp32"}, mp) == []
        assert deepspeed_precision_problems({"torch_autocast": torch_autocast_section(mp)}, mp) == []


def study_with_deepspeed_json(tmp_path: Path, ds_json: dict, mixed_precision="bf16") -> dict:
    (tmp_path / "ds.json").write_text(json.dumps(ds_json))
    acc = yaml.safe_load(ZERO2.read_text())
    acc["deepspeed_config"] = {"deepspeed_config_file": str(tmp_path / "ds.json"), "zero3_init_flag": False}
    (tmp_path / "zero2.yaml").write_text(yaml.safe_dump(acc))
    cfg = load_config(ROOT / "workflow/config/smoke.yaml")
    cfg["models"]["t1"]["training"] = {"mixed_precision": mixed_precision,
                                       "launch": {"accelerate_config": str(tmp_path / "zero2.yaml"),
                                                  "num_processes": 1}}
    return cfg


def test_refused_at_dag_time_naming_the_model_and_the_file(tmp_path):
    cfg = study_with_deepspeed_json(tmp_path, {"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}})
    (line,) = study_problems(cfg, basedir=ROOT)
    assert str(tmp_path / "ds.json") in line and "enables bf16" in line and line.endswith("[model t1]")
    cfg = study_with_deepspeed_json(tmp_path, {"zero_optimization": {"stage": 2}})
    assert study_problems(cfg, basedir=ROOT) == []


def test_snakemake_dry_run_refuses_it(tmp_path):
    cfg = study_with_deepspeed_json(tmp_path, {"torch_autocast": {"enabled": False}})
    override = tmp_path / "override.yaml"
    override.write_text(yaml.safe_dump({"models": {"t1": cfg["models"]["t1"]}}))
    p = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--directory", str(tmp_path / "run"),
                        "--configfile", str(ROOT / "workflow/config/smoke.yaml"), str(override)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode != 0
    lines = [line for line in (p.stdout + p.stderr).splitlines() if "turns torch_autocast off" in line]
    assert len(lines) == 1 and str(tmp_path / "ds.json") in lines[0] and "[model t1]" in lines[0], \
        p.stdout[-2000:] + p.stderr[-2000:]


# ---------------------------------------------------------------------------------------------------------------
# slow: ZeRO-2 and the plain trainer run the same bf16 forward when the engine sees autocast as on a GPU
# ---------------------------------------------------------------------------------------------------------------

PROBE = ROOT / "tests/autocast_probe.py"
SIX_STEPS = dict(total_images=192, batch_size=32, lr=0.01, lr_rampup_images=0, lr_decay_images=0,
                 ema_halflife_images=0, grad_clip=None, dropout=0.1, snapshots={"images": [192]},
                 log_every_images=64, mixed_precision="bf16")


def probe_run(prefix: list[str], config: Path, data: Path, out: Path) -> list[str]:
    """Train t0 through the probe; the MPConv output dtypes it saw."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "AUTOCAST_PROBE_OUT": str(out)}
    p = subprocess.run(prefix + [str(PROBE), "--config", str(config), "--model", "t0", "--data", str(data),
                                 "--out", str(out / "run"), "--no-progress"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    return json.loads(Path(f"{out}.0.json").read_text())


@pytest.mark.slow
def test_zero2_runs_the_plain_trainers_bf16_forward(tmp_path, digits):
    from training.dataset import save_npz

    data = save_npz(digits, tmp_path / "digits.npz")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"study": "probe", "training": SIX_STEPS, "models": {"t0": {"arch": "t0"}}}))
    plain = probe_run([sys.executable], config, data, tmp_path / "plain")
    zero = probe_run([str(BIN / "accelerate"), "launch", "--config_file", str(ZERO2), "--num_processes", "1",
                      "--main_process_port", str(free_port())], config, data, tmp_path / "zero2")
    assert plain == ["torch.bfloat16"]
    assert zero == ["torch.bfloat16"]        # main: ['torch.float32'] (the engine turned the autocast off)
    final = "run/snapshots/snapshot-000000192.pt"
    a = torch.load(tmp_path / "plain" / final, weights_only=True)["ema"]
    b = torch.load(tmp_path / "zero2" / final, weights_only=True)["ema"]
    diff = max(float((b[k] - a[k]).abs().max() / a[k].abs().max().clamp_min(1e-30)) for k in a)
    assert diff <= 1e-4, diff                # main: 5e-2 apart (an fp32 forward against a bf16 one)
