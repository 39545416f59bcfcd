"""A training step of the real loop against a plain matmul of the same FLOPs, on this CPU; `time_training` is the
trainer-step timing every step benchmark uses (bench_train_cpu.py, bench_train_gpu.py --trainer).

    python benchmarks/bench_train_step.py                       # t5 of the default study, one thread
    python benchmarks/bench_train_step.py --models t0 t5 --steps 10 --profile

Each model trains through training.train.train (the CLI's code path: data rows, σ and noise, the preconditioned
forward, the EDM2 loss, backward, clipping, Adam, the EMA, forced weight normalisation, the σ tracker, logging)
with the default study's training settings; the steps after `--warmup` are timed one by one where the loop
reports progress.  The matmul is a float32 n×n×n product with 2n³ = the counted training FLOPs of one step
(models.family.training_flops_of × batch), in the same process and thread count.  The ratio is the step's speed as
a fraction of the matmul's: 1.0 would be a training step at GEMM speed.  Times are CPU seconds of this process
(time.process_time), which a shared machine disturbs less than wall time; wall time is printed beside them.
`--profile` prints torch.profiler's operators by self CPU time over the timed steps.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import training.train as train_module  # noqa: E402
from study.config import load_config  # noqa: E402
from study.spec import model_spec  # noqa: E402


class StepClock:
    """Stands in for the loop's progress bar: the loop calls update() once per step, so the CPU and wall time
    between two calls is one step.  Optionally steps a torch.profiler schedule."""

    def __init__(self, profiler=None):
        self.cpu, self.wall, self.profiler = [], [], profiler
        self._last = (time.process_time(), time.perf_counter())

    def update(self, n):
        now = (time.process_time(), time.perf_counter())
        self.cpu.append(now[0] - self._last[0])
        self.wall.append(now[1] - self._last[1])
        self._last = (time.process_time(), time.perf_counter())
        if self.profiler is not None:
            self.profiler.step()

    def set_postfix(self, **kw):
        pass

    def close(self):
        pass


def step_study(config: dict, model: str, steps: int, warmup: int, batch_size: int | None = None) -> dict:
    """`config` (a loaded study config) cut to `model` and warmup + steps of its own training settings (batch,
    micro-batching, dropout, precision, EMA, schedule), one log line at the end, one snapshot (written after the
    last timed step)."""
    cfg = copy.deepcopy(config)
    cfg["models"] = {model: cfg["models"].get(model, {"arch": model})}
    training = cfg["models"][model].setdefault("training", {})
    batch = int(batch_size or model_spec(cfg, model).training["batch_size"])
    total = (warmup + steps) * batch
    training.update(total_images=total, batch_size=batch, snapshots={"images": [total]}, log_every_images=total,
                    state_every_images=None, trackers=[])
    training.pop("launch", None)     # one process here, whatever the study launches
    return cfg


def time_training(model: str, steps: int, warmup: int, profile: bool, *, config: dict | None = None,
                  data="digits", batch_size: int | None = None) -> dict:
    """Per-step CPU and wall seconds of `steps` steps of `model` after `warmup` (training.train.train, one run: the
    trainer's own step and backend settings, on the device Accelerate picks), and images/s; `config` a loaded
    study config (default: the default study), `data` any training.dataset spec."""
    base = config if config is not None else load_config(ROOT / "workflow" / "config" / "default.yaml")
    cfg = step_study(base, model, steps, warmup, batch_size)
    training = model_spec(cfg, model).training
    batch = int(training["batch_size"])
    profiler = None
    if profile:
        profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                          schedule=torch.profiler.schedule(wait=warmup, warmup=0, active=steps))
    clock = StepClock(profiler)
    real_run_steps = train_module.run_steps

    def timed_run_steps(run, *, stop_after_images=None, bar=None):
        clock._last = (time.process_time(), time.perf_counter())
        return real_run_steps(run, stop_after_images=stop_after_images, bar=clock)

    train_module.run_steps = timed_run_steps
    try:
        with tempfile.TemporaryDirectory() as tmp:
            if profiler is not None:
                profiler.start()
            result = train_module.train(cfg, model, data, Path(tmp) / model, progress=False)
            if profiler is not None:
                profiler.stop()
    finally:
        train_module.run_steps = real_run_steps
    cpu, wall = clock.cpu[warmup:], clock.wall[warmup:]
    flops = float(result["flops_per_image"]) * batch
    on_gpu = torch.cuda.is_available()
    out = {"model": model, "batch": batch, "batch_gpu": training.get("batch_gpu"), "flops": flops,
           "dropout": float(training["dropout"]), "mixed_precision": training["mixed_precision"],
           "cpu": sorted(cpu)[len(cpu) // 2], "wall": sorted(wall)[len(wall) // 2],
           "images_per_s": batch * len(wall) / sum(wall),
           "mem_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if on_gpu else float("nan")}
    if profiler is not None:
        out["profile"] = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
    return out


def time_matmul(flops: float, repeats: int) -> tuple[float, float, int]:
    """Median CPU and wall seconds of a float32 n×n×n matmul with 2n³ ≈ flops."""
    n = max(8, round((flops / 2) ** (1 / 3)))
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    cpu, wall = [], []
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        a @ b
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    scale = flops / (2 * n ** 3)  # the small difference between 2n³ and the step's FLOPs
    return sorted(cpu)[repeats // 2] * scale, sorted(wall)[repeats // 2] * scale, n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["t5"])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (a study's train job has 1)")
    p.add_argument("--profile", action="store_true", help="print torch.profiler's operator table per model")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for model in args.models:
        r = time_training(model, args.steps, args.warmup, args.profile)
        r["matmul_cpu"], r["matmul_wall"], r["n"] = time_matmul(r["flops"], max(3, args.steps))
        rows.append(r)
        if args.profile:
            print(f"--- {model}: operators over {args.steps} steps, by self CPU time\n{r['profile']}")
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), load average {load}")
    print(f"{'model':6} {'GFLOP/step':>10} {'step CPU s':>10} {'step wall s':>11} {'matmul CPU s':>12} "
          f"{'n':>5} {'GFLOP/CPU-s':>11} {'matmul GFLOP/CPU-s':>18} {'ratio':>6}")
    for r in rows:
        print(f"{r['model']:6} {r['flops'] / 1e9:10.2f} {r['cpu']:10.3f} {r['wall']:11.3f} {r['matmul_cpu']:12.3f} "
              f"{r['n']:5d} {r['flops'] / r['cpu'] / 1e9:11.1f} {r['flops'] / r['matmul_cpu'] / 1e9:18.1f} "
              f"{r['matmul_cpu'] / r['cpu']:6.2f}")
    print("ratio = matmul CPU time / step CPU time: the training step's speed as a fraction of a GEMM's of the same "
          "FLOPs (medians of the timed steps)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
