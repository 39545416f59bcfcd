"""What the EMA sweep adds to a study: a model's ordinary evaluation job (its snapshots on the evaluation set) against
its sweep job (the final snapshot rebuilt at every σ_rel of the grid and evaluated), timed side by side in one
process on one evaluation set of the default study's shape (12 σ × 512 triples of the digits).

    python benchmarks/bench_ema_sweep.py                 # t5, the default study's largest size, 4 snapshots
    python benchmarks/bench_ema_sweep.py --model t2 --repeats 3

The model trains a few steps only (the cost of an evaluation does not depend on how trained the weights are).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from analysis import eval_set as es_mod
from analysis import evaluate as ev
from analysis.ema_sweep import DEFAULT_GRID, sweep_model
from analysis.optimal_loss import denoise_eval_set
from study.config import load_config
from study.spec import model_spec
from training.dataset import load_dataset, save_npz
from training.power_ema import run_profile_files
from training.run_folder import snapshot_path
from training.train import train


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="t5")
    p.add_argument("--samples-per-sigma", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    digits = load_dataset("digits")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = save_npz(digits, tmp / "d.npz")
        cfg = load_config({"study": "bench", "models": {args.model: {"arch": args.model}}, "training": {
            "total_images": 512, "batch_size": 128, "lr_rampup_images": 0, "lr_decay_images": 0,
            "snapshots": {"count": 4, "spacing": "geometric", "first_images": 128}, "log_every_images": 128,
            "ema": {"kind": "power", "profile_every_images": 128}}})
        train(cfg, args.model, digits, tmp / "run", progress=False)
        es = es_mod.make_eval_set(len(digits.x), es_mod.sigma_grid(12, 0.002, 80), args.samples_per_sigma, seed=1234)
        np.save(tmp / "dstar.npy", denoise_eval_set(digits.x, es))
        es_mod.save_eval_set(es, tmp / "es.npz")
        eval_set, dstar = tmp / "es.npz", tmp / "dstar.npy"  # both jobs read the files, as the workflow's do
        snapshots = [snapshot_path(tmp / "run", m) for m in model_spec(cfg, args.model).marks]
        files = run_profile_files(tmp / "run")
        times = {"evaluate (4 snapshots)": [], f"sweep ({len(DEFAULT_GRID)} σ_rel)": []}
        for _ in range(args.repeats):  # alternating, so both see the same machine load
            t = time.perf_counter()
            list(ev.evaluate_snapshots(snapshots, data, eval_set, dstar, device="cpu"))
            times["evaluate (4 snapshots)"].append(time.perf_counter() - t)
            t = time.perf_counter()
            sweep_model(files, DEFAULT_GRID, data, eval_set, dstar, device="cpu")
            times[f"sweep ({len(DEFAULT_GRID)} σ_rel)"].append(time.perf_counter() - t)
    (name_a, a), (name_b, b) = times.items()
    for name, values in times.items():
        print(f"{args.model} {name}: median {statistics.median(values):.2f} s over {len(values)} "
              f"({', '.join(f'{v:.2f}' for v in values)})")
    print(f"ratio sweep / evaluate: {statistics.median(b) / statistics.median(a):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
