"""Training throughput (images/s) of the model family on this CPU — what the study configs' lengths rest on.

    python benchmarks/bench_train_cpu.py                 # tiny ladder on digits (8×8×1, batch 128) + xs (32×32×3)
    python benchmarks/bench_train_cpu.py --members t0 t2 --steps 10 --threads 1

Run it with --threads 1 to get the per-job rate of a `snakemake --cores 2` study (two 1-thread jobs in parallel).
One step is the trainer's own (benchmarks/bench_train_step.py: training.train.train with the default study's
settings — data rows, σ and ε draws, micro-batching, StreamDropout at --dropout, the preconditioned forward, the
EDM2 loss, backward, Adam, the EMA, forced weight normalisation, the σ tracker, logging — and the trainer's backend
settings).  The first `--warmup` steps are not timed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train_step import time_training  # noqa: E402

from models import family  # noqa: E402
from study.config import load_config  # noqa: E402
from training.dataset import Dataset, save_npz  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def bench(name: str, data, shape: tuple, batch: int, steps: int, warmup: int, dropout: float) -> dict:
    """The trainer's steps of size `name` on `data` (a training.dataset spec) of images `shape` (C, H, W)."""
    cfg = load_config(ROOT / "workflow" / "config" / "default.yaml")
    cfg["training"]["dropout"] = dropout
    r = time_training(name, steps, warmup, False, config=cfg, data=data, batch_size=batch)
    c, h, _ = shape
    params = family.count_params(family.build(name, resolution=h, channels=c, device="meta"))
    return {"name": name, "shape": f"{c}x{h}x{h}", "batch": batch, "params": params,
            "gflops_per_img": r["flops"] / batch / 1e9, "s_per_step": r["wall"], "img_per_s": r["images_per_s"],
            "img_per_cpu_s": batch / r["cpu"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--members", nargs="*", default=["t0", "t1", "t2", "t3", "t4", "t5", "t6"])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--xs", default="32x3", help="xs data as RESxCHANNELS (e.g. 32x3, 64x4); 'none' to skip")
    p.add_argument("--xs-batch", type=int, default=2)
    p.add_argument("--xs-steps", type=int, default=2)
    p.add_argument("--dropout", type=float, default=0.0, help="training.dropout (StreamDropout), as configured")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    rows = [bench(m, "digits", (1, 8, 8), args.batch, args.steps, args.warmup, args.dropout) for m in args.members]
    if args.xs != "none":
        res, ch = (int(v) for v in args.xs.lower().split("x"))
        with tempfile.TemporaryDirectory() as tmp:
            g = torch.Generator().manual_seed(0)
            xs_data = save_npz(Dataset(torch.randn(16, ch, res, res, generator=g).clamp(-1, 1), None, "noise"),
                               Path(tmp) / "xs.npz")
            rows.append(bench("xs", str(xs_data), (ch, res, res), args.xs_batch, args.xs_steps, 1, args.dropout))

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'model':6} {'data':8} {'batch':>5} {'params':>12} {'GFLOP/img':>10} {'s/step':>8} {'img/s':>9} "
          f"{'img/cpu-s':>10} {'min/100k img':>13}")
    for r in rows:
        print(f"{r['name']:6} {r['shape']:8} {r['batch']:5d} {r['params']:12,d} {r['gflops_per_img']:10.4f} "
              f"{r['s_per_step']:8.3f} {r['img_per_s']:9.1f} {r['img_per_cpu_s']:10.1f} "
              f"{1e5 / r['img_per_s'] / 60:13.1f}")
    print("img/s is wall-clock (slowed by anything else running); img/cpu-s is images per CPU-second of this "
          "process — with one thread, the rate on an otherwise idle core.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
