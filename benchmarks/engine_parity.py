"""Do the training engines train the same net?  One config trained by the plain trainer (one process), 2-process
DDP, and DeepSpeed ZeRO-2 with 1 and 2 processes, on CPU; prints per engine the largest relative weight
difference from the plain trainer and the per-output-channel RMS of the forced-normalised weights.

    python benchmarks/engine_parity.py                        # t1, 24 fp32 steps of 64 digits at lr 0.05
    python benchmarks/engine_parity.py --model t0 --steps 6 --mixed-precision bf16 --dropout 0.1

Weights compared: the last snapshot's (EMA half-life 0: the weights right after the last Adam step), as
max over tensors of max|w − w_plain| / max|w_plain|.  |rms − 1|: the largest deviation from 1 of an MPConv
weight's per-channel RMS, in that snapshot ("after step") and in the weights the optimizer keeps ("kept": the
module's under plain/DDP, DeepSpeed's fp32 master partitions reassembled from its checkpoint under ZeRO).
An engine that fails to launch is reported with its error's last line.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from study.config import load_config  # noqa: E402
from study.integrity import load_torch  # noqa: E402
from study.spec import model_spec  # noqa: E402
from training.dataset import load_dataset, save_npz  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher(engine: str) -> list[str]:
    bindir = Path(sys.executable).parent
    ds = ["--config_file", str(ROOT / "workflow/accelerate/deepspeed-zero2.yaml"), "--main_process_port"]
    return {
        "plain": [sys.executable],
        "ddp-2": [str(bindir / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port())],
        "zero2-1": [str(bindir / "accelerate"), "launch", *ds, str(free_port()), "--num_processes", "1"],
        "zero2-2": [str(bindir / "accelerate"), "launch", *ds, str(free_port()), "--num_processes", "2"],
    }[engine]


def train(engine: str, config: Path, data: Path, out: Path) -> str | None:
    cmd = launcher(engine) + ["-m", "training.train", "--config", str(config), "--model", "m", "--data", str(data),
                              "--out", str(out), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    if engine == "ddp-2":
        env["ACCELERATE_USE_CPU"] = "1"
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        lines = [line for line in (proc.stderr + proc.stdout).splitlines() if re.search(r"\w+(Error|Exception): ", line)]
        return (lines or ["exit code %d" % proc.returncode])[-1].strip()
    return None


def kept_weights(out: Path) -> dict:
    state = load_torch(out / "state.pt")  # checked, tensors and plain data only
    if state.get("ds_dir") is None:
        return state["net"]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # optional package

    ds_dir = out / state["ds_dir"]
    tag = next(p.name for p in ds_dir.iterdir() if p.is_dir())
    return get_fp32_state_dict_from_zero_checkpoint(str(ds_dir), tag=tag)


def max_rms_deviation(weights: dict) -> float:
    """Over the U-Net's MPConv weights (its only `.weight`s of two or more dims)."""
    return max(float((w.float().flatten(1).square().mean(1).sqrt() - 1).abs().max()) for k, w in weights.items()
               if k.endswith(".weight") and w.ndim >= 2)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="t1")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--batch-gpu", type=int, default=None, help="micro-batch size (default: none)")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--mixed-precision", default="no", choices=["no", "bf16"])
    p.add_argument("--engines", default="plain,ddp-2,zero2-1,zero2-2")
    p.add_argument("--keep", default=None, help="keep the run folders here")
    args = p.parse_args(argv)

    total = args.steps * args.batch
    training = dict(total_images=total, batch_size=args.batch, batch_gpu=args.batch_gpu, lr=args.lr,
                    lr_rampup_images=0, lr_decay_images=0, ema_halflife_images=0, grad_clip=None,
                    dropout=args.dropout, mixed_precision=args.mixed_precision, snapshots={"images": [total]},
                    log_every_images=total)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(args.keep or tmp)
        tmp.mkdir(parents=True, exist_ok=True)
        config = tmp / "config.yaml"
        config.write_text(yaml.safe_dump({"study": "parity", "training": training,
                                          "models": {"m": {"arch": args.model}}}))
        data = save_npz(load_dataset("digits"), tmp / "digits.npz")
        snap = f"snapshots/snapshot-{model_spec(load_config(config), 'm').total:09d}.pt"  # the last snapshot
        rows, reference = [], None
        for engine in args.engines.split(","):
            out = tmp / engine
            error = train(engine, config, data, out)
            if error:
                rows.append((engine, f"failed: {error}"))
                continue
            after = load_torch(out / snap)["ema"]
            reference = reference or after
            diff = max(float((after[k] - reference[k]).abs().max() / reference[k].abs().max().clamp_min(1e-30))
                       for k in reference)
            rows.append((engine, f"max rel diff {diff:.2e}   |rms-1| after step {max_rms_deviation(after):.2e}"
                                 f"   kept {max_rms_deviation(kept_weights(out)):.2e}"))
    print(f"{args.model}, {args.steps} steps of {args.batch} images (batch_gpu {args.batch_gpu}), lr {args.lr}, "
          f"dropout {args.dropout}, mixed_precision {args.mixed_precision}")
    for engine, text in rows:
        print(f"  {engine:8s} {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
