"""The step benchmarks time the trainer's own step (training.loop through training.train.train: data path,
micro-batching, σ/ε draws, StreamDropout at the configured dropout, EMA, forced weight normalisation, logging) with
the trainer's backend settings, on the CPU here as on a GPU."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from models import dropout
from training import loop

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def load(name):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def trainer_calls(monkeypatch):
    """How often the trainer's micro-batch step ran and how many StreamDropout masks it drew."""
    calls = {"steps": 0, "masks": 0}
    real_step, real_mask = loop.accumulate_gradients, dropout.keep_mask

    def step(*args, **kwargs):
        calls["steps"] += 1
        return real_step(*args, **kwargs)

    def mask(*args, **kwargs):
        calls["masks"] += 1
        return real_mask(*args, **kwargs)

    monkeypatch.setattr(loop, "accumulate_gradients", step)
    monkeypatch.setattr(dropout, "keep_mask", mask)
    return calls


def test_gpu_benchmark_times_the_trainers_step(trainer_calls, capsys, tmp_path):
    """paper-img64's settings (bf16, conditional) for a t0 entry shaped like its m (dropout 0.1, micro-batches)."""
    import yaml

    study = yaml.safe_load((ROOT / "workflow/config/paper-img64.yaml").read_text())
    study["models"] = {"t0": {"arch": "t0", "training": {"dropout": 0.1, "batch_gpu": 2}}}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    bench = load("bench_train_gpu")
    torch.backends.cudnn.benchmark = False
    assert bench.main(["--trainer", str(tmp_path / "study.yaml"), "--sizes", "t0", "--device", "cpu", "--steps",
                       "2", "--warmup", "1", "--resolution", "8", "--channels", "1", "--label-dim", "10",
                       "--batch", "4"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("t0 "))
    assert float(row.split()[4]) > 0                             # images/s
    assert trainer_calls["steps"] == 3                           # warm-up + timed steps, through training.loop
    assert trainer_calls["masks"] > 0                            # dropout 0.1, as configured
    assert torch.backends.cudnn.benchmark and not torch.backends.cudnn.allow_tf32   # the trainer's settings


def test_cpu_benchmark_times_the_trainers_step(trainer_calls, capsys):
    bench = load("bench_train_cpu")
    assert bench.main(["--members", "t0", "--steps", "2", "--warmup", "1", "--xs", "none", "--batch", "16",
                       "--dropout", "0.1"]) == 0
    assert trainer_calls["steps"] == 3 and trainer_calls["masks"] > 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("t0 "))
    assert float(row.split()[6]) > 0                             # images/s
