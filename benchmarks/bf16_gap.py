"""Is the bf16 gap between the plain trainer and ZeRO-2 a difference of the paths, or bf16 rounding amplified by
the steps?  One config (t1, 64 digits a step at lr 0.05, as benchmarks/engine_parity.py) trained four ways, in
fp32 and in bf16, with the weights kept after every step (EMA half-life 0):
  plain      the plain trainer (the reference)
  plain-mb   the plain trainer in two micro-batches (batch_gpu 32): the same arithmetic but for the order in which
             the gradient's two halves are summed — a perturbation at fp32 rounding level, nothing else
  zero2-1    DeepSpeed ZeRO-2, one process
and prints, per step, the max relative weight difference of each from `plain`.  If ZeRO-2's bf16 gap grows like
plain-mb's, it is rounding amplified by the steps; if it stands out, the paths differ.

    python benchmarks/bf16_gap.py [--steps 24] [--model t1] [--keep DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from engine_parity import train  # noqa: E402

from study.config import load_config  # noqa: E402
from study.spec import model_spec  # noqa: E402
from training.dataset import load_dataset, save_npz  # noqa: E402

WAYS = {"plain": ("plain", None), "plain-mb": ("plain", 32), "zero2-1": ("zero2-1", None)}


def weights(out: Path, images: int) -> dict:
    return torch.load(out / f"snapshots/snapshot-{images:09d}.pt", weights_only=True)["ema"]


def max_relative_difference(a: dict, b: dict) -> float:
    return max(float((b[k] - a[k]).abs().max() / a[k].abs().max().clamp_min(1e-30)) for k in a)


def run_all(tmp: Path, args) -> dict:
    """{(precision, way): [difference from plain after each step]}"""
    batch, data = 64, save_npz(load_dataset("digits"), tmp / "digits.npz")
    marks = [batch * (s + 1) for s in range(args.steps)]
    table = {}
    for precision in ("no", "bf16"):
        for way, (engine, batch_gpu) in WAYS.items():
            training = dict(total_images=marks[-1], batch_size=batch, batch_gpu=batch_gpu, lr=args.lr,
                            lr_rampup_images=0, lr_decay_images=0, ema_halflife_images=0, grad_clip=None,
                            dropout=0.0, mixed_precision=precision, snapshots={"images": marks},
                            log_every_images=marks[-1])
            config = tmp / f"{precision}-{way}.yaml"
            config.write_text(yaml.safe_dump({"study": "gap", "training": training,
                                              "models": {"m": {"arch": args.model}}}))
            error = train(engine, config, data, tmp / f"{precision}-{way}")
            if error:
                raise SystemExit(f"{precision} {way}: {error}")
        written = model_spec(load_config(config), "m").marks  # the snapshots every way wrote: one per step
        for way in WAYS:
            table[precision, way] = [max_relative_difference(weights(tmp / f"{precision}-plain", m),
                                                             weights(tmp / f"{precision}-{way}", m)) for m in written]
    return table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="t1")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--keep", default=None, help="keep the run folders here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(args.keep or tmp)
        tmp.mkdir(parents=True, exist_ok=True)
        table = run_all(tmp, args)
    print(f"{args.model}, 64 images a step, lr {args.lr}: max relative weight difference from the plain trainer")
    heads = [f"{precision} {way}" for precision in ("no", "bf16") for way in WAYS if way != "plain"]
    print("| step | " + " | ".join(h.replace("no ", "fp32 ") for h in heads) + " |")
    print("|---" * (len(heads) + 1) + "|")
    for s in range(args.steps):
        cells = [f"{table[precision, way][s]:.1e}" for precision in ("no", "bf16") for way in WAYS if way != "plain"]
        print(f"| {s + 1} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
