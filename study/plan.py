"""The cost of a study before anything runs: per model its parameters, counted training FLOPs per image, training
length, total FLOPs, nodes, GPUs, GPU-hours at a stated throughput, wall hours and the number of runtime-limited
jobs (`snakemake plan`, or `python -m study.plan --config STUDY.yaml`).

FLOPs per image are counted (models.family.training_flops_per_image: torch's FlopCounterMode over one forward +
backward on the meta device, 2 FLOPs per multiply-add), not estimated. The data shape comes from the config alone
(dataset.spec / dataset.resolution / the `plan` section), never from reading the dataset, so the plan works where
the data is not (yet) reachable. Throughput: GPU-hours = total FLOPs / (plan.peak_tflops × MFU), the MFU of a
model being its `plan_mfu`, else `plan.mfu` (one study-wide number, or per arch name over MEASURED_MFU), else
MEASURED_MFU[arch], else plan.default_mfu.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Mapping

import pandas as pd

from study.atomic import atomic_path
from study.checks import array_shape, parse_dataset_spec
from study.config import ConfigError, load_config
from study.spec import resolve_specs, step_resources

# models.family (torch) is imported only where parameters and FLOPs are counted (plan_rows): the plan rule prints a
# finished plan (format_plan, read_plan) in the Snakefile's own process, which needs no torch for it.

# Training MFU of the EDM2 sizes measured on one H200 (bf16, 989 TFLOP/s dense peak; docs/performance.md,
# "Training throughput, GPU"), the default throughput of the plan.
MEASURED_MFU = {"xs": 0.170, "s": 0.236, "m": 0.299, "l": 0.317, "xl": 0.359, "xxl": 0.364}
COLUMNS = ["model", "arch", "params", "flops_per_image", "total_images", "total_flops", "gpus", "gpu_hours",
           "mfu", "wall_hours", "nodes", "jobs"]


def data_shape(cfg: Mapping) -> tuple[int, int, int, list[str]]:
    """(resolution, channels, label_dim, notes) of the study's training images, from the config alone."""
    ds, plan = cfg.get("dataset") or {}, cfg.get("plan") or {}
    kind, path = parse_dataset_spec(ds.get("spec", "digits"))
    resolution, channels = ds.get("resolution") or plan.get("resolution"), plan.get("channels")
    labels, notes = plan.get("label_dim"), []
    if kind == "digits":
        resolution, channels, labels = resolution or 8, channels or 1, 10 if labels is None else labels
    elif kind == "cifar10":
        resolution, channels, labels = resolution or 32, channels or 3, 10 if labels is None else labels
    elif kind in ("imagefolder", "dir"):
        channels = channels or 3  # training.dataset converts every image to RGB
        folder = Path(path).expanduser()
        if labels is None and folder.is_dir():  # listing the class folders is not reading the data
            labels = sum(1 for p in folder.iterdir() if p.is_dir()) or None
    else:  # .npy / .npz: the array header, where the file exists
        shape = array_shape(Path(path).expanduser())
        if shape is not None and len(shape) == 4:
            c, h = (shape[1], shape[2]) if shape[1] in (1, 2, 3, 4) else (shape[3], shape[1])
            channels, resolution = channels or int(c), resolution or int(h)
    if resolution is None:
        raise ConfigError(f"plan.resolution: needed for the plan of dataset {ds.get('spec')!r} (neither "
                          "dataset.resolution nor the spec tells it)")
    if channels is None:
        raise ConfigError(f"plan.channels: needed for the plan of dataset {ds.get('spec')!r}")
    if not ds.get("conditional"):
        labels = 0
    elif labels is None:
        labels = 1000
        notes.append("label count unknown (set plan.label_dim): 1000 assumed; the class embedding is < 0.01% "
                     "of the FLOPs")
    return int(resolution), int(channels), int(labels), notes


def model_mfu(cfg: Mapping, model: str, arch: str) -> float:
    plan = cfg.get("plan") or {}
    own = (cfg["models"][model] or {}).get("plan_mfu")
    if own is not None:
        return float(own)
    mfu = plan.get("mfu")
    if isinstance(mfu, (int, float)) and not isinstance(mfu, bool):
        return float(mfu)
    table = {**MEASURED_MFU, **(mfu or {})}
    return float(table.get(arch, plan.get("default_mfu", 0.3)))


def plan_rows(cfg: Mapping) -> tuple[list[dict], list[str]]:
    """One row per model (COLUMNS) and notes on the assumptions made."""
    from models import family  # deferred (torch): see the imports

    resolution, channels, label_dim, _ = data_shape(cfg)
    peak = float((cfg.get("plan") or {}).get("peak_tflops", 989.0)) * 1e12
    rows, specs = [], resolve_specs(cfg)
    for model, spec in specs.items():
        arch, launch = spec.arch, spec.training["launch"]
        net = family.build(arch, resolution=resolution, channels=channels, label_dim=label_dim, device="meta")
        fpi = int(family.training_flops_per_image(arch, resolution=resolution, channels=channels,
                                                  label_dim=label_dim))
        gpus = int(launch["num_processes"])
        mfu = model_mfu(cfg, model, arch)
        gpu_hours = fpi * spec.total / (peak * mfu) / 3600
        wall_hours = gpu_hours / gpus
        runtime_hours = step_resources(cfg, "train", model)["runtime"] / 60
        rows.append({"model": model, "arch": arch, "params": family.count_params(net), "flops_per_image": fpi,
                     "total_images": spec.total, "total_flops": float(fpi) * spec.total, "gpus": gpus,
                     "gpu_hours": gpu_hours, "mfu": mfu, "wall_hours": wall_hours,
                     "nodes": int(launch.get("num_machines", 1)), "jobs": math.ceil(wall_hours / runtime_hours)})
    return rows, plan_notes(cfg) + ema_notes(cfg, rows, specs)


def ema_notes(cfg: Mapping, rows: list[dict], specs: Mapping | None = None) -> list[str]:
    """What EDM2's power-EMA profiles (training.ema.kind: power) add: one fp32 copy of the weights per profile in
    every training process (the classic EMA keeps one), and per stored point (snapshot or profile file) on disk.
    `specs`: the study's resolve_specs, where the caller has them."""
    specs = specs if specs is not None else resolve_specs(cfg)
    notes = []
    for row in rows:
        spec = specs[row["model"]]
        ema = spec.training.get("ema") or {}
        if ema.get("kind") != "power":
            continue
        profiles = len(ema.get("sigma_rel") or (0.05, 0.10))
        every = int(ema.get("profile_every_images") or 0)
        points = set(spec.marks) | set(range(every, spec.total + 1, every) if every else ())
        profile_gb = 4 * row["params"] / 1e9
        notes.append(f"{row['model']}: {profiles} power-EMA profiles, {profiles * profile_gb:.2f} GB of fp32 weights "
                     f"in each training process ({(profiles - 1) * profile_gb:+.2f} GB over the classic EMA), the same "
                     f"on disk at each of ~{len(points)} stored points (~{len(points) * profiles * profile_gb:,.0f} GB "
                     "in all)")
    return notes


def plan_notes(cfg: Mapping) -> list[str]:
    """The assumptions of a plan, one line each (cheap: no FLOP counting)."""
    resolution, channels, label_dim, notes = data_shape(cfg)
    peak = float((cfg.get("plan") or {}).get("peak_tflops", 989.0))
    runtimes = sorted({step_resources(cfg, "train", m)["runtime"] for m in cfg["models"]})
    limit = " or ".join(f"{r / 60:g} h" for r in runtimes)
    return [f"data {channels}×{resolution}×{resolution}, {label_dim} labels; peak {peak:g} TFLOP/s per GPU; "
            "GPU-hours = total FLOPs / (peak × MFU); wall hours = GPU-hours / GPUs",
            "the MFU is one GPU's, without communication: wall hours on several GPUs and nodes are a lower bound",
            f"jobs = training jobs of the train rule's runtime ({limit}) one after another, each resuming from "
            "state.pt", *notes]


def write_plan(cfg: Mapping, out) -> tuple[list[dict], list[str]]:
    rows, notes = plan_rows(cfg)
    with atomic_path(out) as tmp:
        pd.DataFrame(rows, columns=COLUMNS).to_csv(tmp, index=False)
    return rows, notes


def format_plan(rows: list[dict], notes: list[str] = (), study: str = "") -> str:
    head = (f"{'model':<10} {'arch':<6} {'params (M)':>10} {'GFLOP/img':>10} {'images':>15} {'total EFLOP':>12} "
            f"{'nodes':>5} {'GPUs':>5} {'MFU':>6} {'GPU-hours':>10} {'wall hours':>10} {'jobs':>5}")
    lines = [f"plan of study {study}" if study else "plan", head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['model']:<10} {r['arch']:<6} {r['params'] / 1e6:>10.1f} {r['flops_per_image'] / 1e9:>10.2f} "
                     f"{int(r['total_images']):>15,} {r['total_flops'] / 1e18:>12.2f} {int(r['nodes']):>5} "
                     f"{int(r['gpus']):>5} {r['mfu']:>6.1%} {r['gpu_hours']:>10,.0f} {r['wall_hours']:>10,.1f} "
                     f"{int(r['jobs']):>5}")
    total_flops = sum(r["total_flops"] for r in rows)
    total_hours = sum(r["gpu_hours"] for r in rows)
    lines.append("-" * len(head))
    lines.append(f"{'total':<10} {'':<6} {'':>10} {'':>10} {'':>15} {total_flops / 1e18:>12.2f} {'':>5} {'':>5} "
                 f"{'':>6} {total_hours:>10,.0f}")
    lines += [f"note: {n}" for n in notes]
    return "\n".join(lines)


def read_plan(path) -> list[dict]:
    return pd.read_csv(path).to_dict("records")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m study.plan", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="study config YAML")
    ap.add_argument("--out", default=None, help="write the table as CSV here too")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config)
        rows, notes = write_plan(cfg, args.out) if args.out else plan_rows(cfg)
    except (ConfigError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_plan(rows, notes, cfg["study"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
