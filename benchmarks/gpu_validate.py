"""One prepared validation of a GPU machine, in one command and a fixed time budget — not a test.

    bash benchmarks/gpu_validate.sh                   # one GPU, ≤ 8 minutes
    bash benchmarks/gpu_validate.sh --cpu-rehearsal   # the same script with tiny sizes on the CPU (≤ 3 minutes)

Four parts, each with its own time budget (a part or model that runs out of it is reported, not waited for, and
killed with its whole process tree: kill_tree), and items derived from them:
  step    every paper model (EDM2 xs … xxl at paper-img64's shape and its configured batch_gpu, then DiT dit12 …
          dit27 at 32×32×4 latents, 32 images per GPU) takes optimizer steps at that batch under the DDP path (one
          process: net, Adam, bf16 autocast, fp32 EMA) and under DeepSpeed ZeRO-2 (DeepSpeed's torch_autocast on,
          as the trainer builds it; benchmarks/bench_train_gpu.py: measure), both engines of a model in one worker
          before the next model: images/s, MFU, peak memory (torch.cuda's allocated and reserved maxima)
  parity  the trainer (python -m training.train) runs the same few steps of xs once on the DDP path and once under
          ZeRO-2 (accelerate launch, deepspeed-zero2.yaml), in fp32 and in bf16; their denoisers must agree to a
          small fraction of what the steps changed (output_difference)
  study   a short study of xs through the real `snakemake` DAG (workflow/config/gpu-validate.yaml) on a synthetic
          labelled 64×64 set at paper-img64's settings: the loss falls, every snapshot is evaluated, fits and
          figures are made; the trainer's steps-only images/s (log.jsonl's images_per_s_steps)
  dstar   the exact D* (estimate_optimal_loss, "full") at ImageNet-64's dimension (3×64×64) against the plain
          matmul of the same FLOPs (benchmarks/bench_optimal_loss.py's cases), at a σ where J* > 0 (printed)
  ratios  ZeRO-2 / DDP throughput (not ok below 0.9) and peak memory (not ok above 1.1) per model; the trainer's
          steps-only rate over the step part's DDP rate of the same model (not ok below 0.9)
Writes OUT/report.md and OUT/results.csv (default OUT = results/gpu-validate, cleared first), every row with the
card's name, driver, torch version and date. Exit status 0 when every item is ok.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# DiT has no paper config here: its paper's global batch of 256 over 8 GPUs, at ImageNet-256's SD-VAE latents.
DIT_SHAPE, DIT_BATCH_GPU = (32, 4, 1000), 32
PEAK_TFLOPS = 989.0  # dense bf16 peak of an H100 / H200 SXM, the MFU's denominator (as the plan's)
RATIO_FLOOR, RATIO_CEILING = 0.9, 1.1   # ZeRO-2 / DDP throughput and peak memory; trainer / bench steps-only rate
PARITY_TOLERANCE = 1e-2  # ‖D_ZeRO-2 − D_DDP‖ / ‖D_DDP − D_init‖ after the parity steps (output_difference)
COLUMNS = ["card", "driver", "torch", "date", "part", "item", "status", "params", "batch_gpu", "shape",
           "ddp_images_per_s", "ddp_mfu", "ddp_peak_gib", "ddp_reserved_gib",
           "zero2_images_per_s", "zero2_mfu", "zero2_peak_gib", "zero2_reserved_gib", "metric", "value", "detail"]


@dataclass
class Setting:
    """What one validation runs: the GPU's paper sizes or the CPU rehearsal's tiny stand-ins."""
    device: str
    models: list            # [(item, arch, (resolution, channels, label_dim), batch_gpu)]
    steps: int
    warmup: int
    precision: str          # of the step measurements
    parity: dict            # the parity's model, batch and steps (on the study's synthetic set)
    study: dict             # overrides of workflow/config/gpu-validate.yaml, and the synthetic set's shape
    dstar: dict             # N, D, Q of the D* comparison
    budget: dict = field(default_factory=dict)   # seconds per part


def posterior_sigma(n: int, dim: int) -> float:
    """A σ at which the D* benchmark's data (n uniform points in [−1, 1]^dim, bench_optimal_loss._make) has J* > 0:
    a noisy point's logit gap from its source to another point is about ‖x_s − x_n‖²/(2σ²) = dim/(3σ²); at
    σ² = 2·dim/(3 ln n) it is ln(n)/2, so the posterior spreads over many points and the estimator does the
    whole softmax (at σ = 1 every posterior collapses onto its source, J* = 0, and the screen skips the work)."""
    return round(math.sqrt(2 * dim / (3 * math.log(n))), 1)


def gpu_setting(config: Path) -> Setting:
    """The paper models at the configured batch_gpu of `config` (paper-img64.yaml) and DiT's."""
    from models.sizes import DIT_PAPER_SIZES
    from study.config import load_config
    from study.plan import data_shape
    from study.spec import resolve_specs

    cfg = load_config(config)
    shape = data_shape(cfg)[:3]
    models = [(name, spec.arch, shape, spec.batch_gpu) for name, spec in resolve_specs(cfg).items()]
    models += [(name, name, DIT_SHAPE, DIT_BATCH_GPU) for name in DIT_PAPER_SIZES]
    # Budgets from the H200 run of 2026-12-04 (8 minutes in all): the step part measured 8 model-engine pairs in
    # 270 s, one worker per engine (process start, build, 2 + 3 steps, cuDNN autotuning twice per shape): now one
    # worker for both engines of a model (autotuned once), 1 + 2 steps, 22 pairs, and ZeRO-2 no longer twice the
    # DDP time; parity took 85 s for two fp32 runs (DDP 20 s, ZeRO-2 65 s with DeepSpeed's start), now four runs
    # (fp32 and bf16; DeepSpeed's ops compiled by the first); the study 193 s, of which training 109 s with 2 GB
    # saves re-read for their checksums (now written in the background, hashed as written) and J* 43 s on 8,192
    # images: now 24 steps on 4,096 images; D* about 30 s.
    return Setting(device="cuda", models=models, steps=2, warmup=1, precision="bf16",
                   parity={"arch": "xs", "batch": 16, "steps": 4},
                   study={"n": 4096, "resolution": 64, "classes": 1000, "overrides": {}},
                   dstar={"n": 65536, "dim": 3 * 64 * 64, "queries": 1024, "sigma": posterior_sigma(65536, 3 * 64 * 64)},
                   budget={"step": 230, "parity": 100, "study": 120, "dstar": 30})


def cpu_rehearsal_setting() -> Setting:
    """Tiny stand-ins on the CPU: every code path of the GPU run, in fp32 where bf16 would only be emulated."""
    from models.sizes import DIT_TINY_SIZES

    edm2 = [(f"{big}~{tiny}", tiny, (8, 1, 10), 4) for big, tiny in
            zip(("xs", "s", "m", "l", "xl", "xxl"), ("t0", "t1", "t2", "t3", "t4", "t5"))]
    dit = [(f"{big}~{tiny}", tiny, (8, 1, 10), 4) for big, tiny in
           zip(("dit12", "dit15", "dit19", "dit24", "dit27"), DIT_TINY_SIZES)]
    study = {"n": 512, "resolution": 16, "classes": 10, "overrides": {
        "models": {"t0": {"arch": "t0"}},
        "training": {"total_images": 1024, "batch_size": 64, "batch_gpu": 32, "lr": 0.01, "lr_rampup_images": 128,
                     "ema_halflife_images": 128, "snapshots": {"count": 3, "spacing": "geometric",
                                                                "first_images": 256},
                     "log_every_images": 128, "state_every_images": 256},
        "optimal_loss": {"n_samples": 64},
        "evaluation": {"samples_per_sigma": 16, "batch_size": 256},
        "resources": {"dataset": {"gpus": 0, "cpus": 1}, "optimal_loss": {"gpus": 0, "cpus": 1},
                      "train": {"gpus": 0, "cpus": 1}, "evaluate": {"gpus": 0, "cpus": 1}},
        "plan": {"label_dim": 10}}}
    return Setting(device="cpu", models=edm2 + dit, steps=1, warmup=1, precision="fp32",
                   parity={"arch": "t0", "batch": 16, "steps": 4},
                   study=study, dstar={"n": 4096, "dim": 768, "queries": 128, "sigma": posterior_sigma(4096, 768)},
                   budget={"step": 90, "parity": 90, "study": 150, "dstar": 30})


# ----------------------------------------------------------------------------------------------------------------
# the card
# ----------------------------------------------------------------------------------------------------------------

def card_info(device: str) -> dict:
    import torch

    from benchmarks.bench_optimal_loss import _cpu_name

    if device == "cuda":
        card = torch.cuda.get_device_name(0)
        try:
            driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=30).stdout.split("\n")[0].strip()
        except (OSError, subprocess.SubprocessError):
            driver = ""
    else:
        card, driver = f"cpu: {_cpu_name()}", "none"
    return {"card": card, "driver": driver or "unknown", "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def log(message: str) -> None:
    print(f"[gpu_validate {time.strftime('%H:%M:%S')}] {message}", flush=True)


THREADS: dict = {}  # OMP_NUM_THREADS for every part's processes (the CPU rehearsal: one each)


def process_table() -> dict[int, tuple[int, int, int]]:
    """{pid: (parent pid, process group, session)} of every process now, read from /proc/PID/stat."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry}/stat").read_text()
        except OSError:  # gone meanwhile
            continue
        fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) ": state, ppid, pgrp, session
        table[int(entry)] = (int(fields[1]), int(fields[2]), int(fields[3]))
    return table


def process_tree(root: int, table: dict) -> set[int]:
    """`root`, its descendants, and whatever still runs in its process group or session (started with
    start_new_session, so an orphan re-parented to init is still found by them); a descendant that made a new
    session of its own (snakemake's jobs, torchrun's workers) is found by parenthood."""
    tree = {pid for pid, (_, group, session) in table.items() if root in (pid, group, session)}
    grew = True
    while grew:
        children = {pid for pid, (parent, _, _) in table.items() if parent in tree} - tree
        tree |= children
        grew = bool(children)
    return tree - {os.getpid()}


def kill_tree(root: int) -> set[int]:
    """Stop every process of `root`'s tree (so none forks or is re-parented while the tree is walked again),
    until a walk finds no new one, then kill them all: a part that runs out of time leaves nothing behind.
    Returns the pids killed."""
    stopped: set[int] = set()
    for _ in range(100):
        found = process_tree(root, process_table()) - stopped
        if not found:
            break
        for pid in found:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGSTOP)
        stopped |= found
    for pid in stopped:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    return stopped


def run(cmd, *, timeout: float, cwd=ROOT, env=None, log_to: Path | None = None) -> tuple[int | None, str]:
    """(return code or None on timeout, the output's tail) of `cmd`; its whole output goes to `log_to`.  On a
    timeout the whole process tree is killed (kill_tree), not only the process group."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **THREADS, **(env or {})}
    with open(log_to or os.devnull, "w") as out:
        proc = subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            kill_tree(proc.pid)
            proc.wait()
            rc = None
    tail = Path(log_to).read_text()[-2000:] if log_to else ""
    return rc, tail


def last_line(text: str) -> str:
    lines = [x for x in text.strip().splitlines() if x.strip() and "WARNING" not in x]
    return lines[-1][:300] if lines else ""


# ----------------------------------------------------------------------------------------------------------------
# part 1: one optimizer step per paper model, DDP path and ZeRO-2 (a worker process runs the models)
# ----------------------------------------------------------------------------------------------------------------

RESTART = 3  # a step worker's exit status: go on with the remaining models in a fresh process


def step_worker(argv) -> int:
    """Runs inside its own process: measure each (model, engine) job of --jobs (JSON) in order, one JSON line each.
    One process for both engines of a model: cuDNN autotunes each shape once (the trainer's backend settings)."""
    import torch

    from benchmarks.bench_train_gpu import fast_gpu_settings, measure

    a = argparse.Namespace(**json.loads(argv[0]))
    device = torch.device(a.device)
    if device.type == "cuda":
        fast_gpu_settings()
    with open(a.out, "a") as out:
        for item, arch, (resolution, channels, label_dim), batch, engine in a.jobs:
            out.write(json.dumps({"item": item, "engine": engine, "started": True}) + "\n")
            out.flush()
            try:  # FLOPs are counted meanwhile by another process (flops_worker): not here
                r = measure(arch, batch=batch, steps=a.steps, warmup=a.warmup, device=device, engine=engine,
                            precision=a.precision, resolution=resolution, channels=channels, label_dim=label_dim,
                            flops_per_image=math.nan)
            except torch.cuda.OutOfMemoryError as e:
                out.write(json.dumps({"item": item, "engine": engine,
                                      "status": f"out of memory: {str(e).splitlines()[0][:150]}"}) + "\n")
                return RESTART  # what an out-of-memory error leaves behind must not count against the next model
            out.write(json.dumps({"item": item, "engine": engine, **r, "status": "ok"}) + "\n")
            out.flush()
    return 0


def count_flops(model) -> float | None:
    """Counted training FLOPs per image of one model (None where it cannot be built: its step reports why)."""
    from models.family import training_flops_per_image

    _, arch, (resolution, channels, label_dim), _ = model
    try:
        return float(training_flops_per_image(arch, resolution=resolution, channels=channels, label_dim=label_dim))
    except Exception:  # noqa: BLE001
        return None


def flops_worker(argv) -> int:
    """Runs inside its own process, beside the step workers: each model's counted training FLOPs per image (on
    the meta device, one CPU process per model), as one JSON object {item: flops}."""
    from multiprocessing import Pool

    models, out = json.loads(argv[0]), Path(argv[1])
    with Pool(max(1, min(len(models), (os.cpu_count() or 2) // 2))) as pool:
        flops = pool.map(count_flops, models)
    out.write_text(json.dumps({m[0]: f for m, f in zip(models, flops)}))
    return 0


def run_step_jobs(setting: Setting, work: Path, jobs: list, deadline: float) -> dict:
    """{(item, engine): record} of the jobs, in order, by worker processes: a worker that dies or runs out of
    memory is followed by a fresh one for the rest; what the time left cannot reach is 'not run: time budget'."""
    out, status, todo = work / "step.jsonl", {}, list(jobs)
    while todo:
        left = deadline - time.time()
        if left < 5:
            break
        log(f"step: {', '.join(f'{j[0]}/{j[4]}' for j in todo)} ({left:.0f} s)")
        args = {"device": setting.device, "jobs": todo, "steps": setting.steps, "warmup": setting.warmup,
                "precision": setting.precision, "out": str(out)}
        rc, tail = run([sys.executable, Path(__file__), "--worker-step", json.dumps(args)], timeout=left,
                       log_to=work / "step.log")
        keys = [(j[0], j[4]) for j in todo]
        records = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
        records = [r for r in records if (r["item"], r["engine"]) in keys]  # this worker's
        finished = {(r["item"], r["engine"]): r for r in records if not r.get("started")}
        started = {(r["item"], r["engine"]) for r in records if r.get("started")} - set(finished)
        why = "time budget" if rc is None else f"failed: {last_line(tail)}"
        for key in keys:
            if key in finished:
                status[key] = finished[key]
            elif key in started or (rc not in (0, RESTART) and not started and not finished):
                status[key] = {"status": why}  # it died there, or before any model
        todo = [j for j in todo if (j[0], j[4]) not in status]
        if rc is None:
            break
    for job in todo:
        status[(job[0], job[4])] = {"status": "not run: time budget"}
    return status


def part_step(setting: Setting, work: Path, budget: float, engines=("ddp", "zero2")) -> list[dict]:
    """Each model under every engine before the next model (setting.models: the EDM2 sizes before the DiTs), in
    worker processes (run_step_jobs). The FLOPs per image (for MFU) are counted by a process of their own
    meanwhile."""
    rows = {item: {"part": "step", "item": item, "params": None, "batch_gpu": batch,
                   "shape": f"{c}×{r}×{r}, {k} labels"} for item, _, (r, c, k), batch in setting.models}
    deadline = time.time() + budget
    flops_file = work / "flops.json"
    flops_log = open(work / "flops.log", "w")
    counting = subprocess.Popen([sys.executable, Path(__file__), "--worker-flops", json.dumps(setting.models),
                                 flops_file], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **THREADS},
                                stdout=flops_log, stderr=subprocess.STDOUT, start_new_session=True)
    status = run_step_jobs(setting, work, [(*m, e) for m in setting.models for e in engines], deadline)
    try:
        counting.wait(timeout=max(deadline - time.time(), 30))
    except subprocess.TimeoutExpired:
        kill_tree(counting.pid)
        counting.wait()
    flops_log.close()
    flops = json.loads(flops_file.read_text()) if flops_file.exists() else {}
    for item, row in rows.items():
        states = []
        for engine in engines:
            rec = status.get((item, engine), {"status": "not run"})
            states.append(rec["status"])
            if rec["status"] == "ok":
                row["params"] = rec["params"]
                mfu = rec["images_per_s"] * flops[item] / (PEAK_TFLOPS * 1e12) if flops.get(item) else None
                row.update({f"{engine}_images_per_s": rec["images_per_s"], f"{engine}_mfu": mfu,
                            f"{engine}_peak_gib": rec["mem_gib"], f"{engine}_reserved_gib": rec["reserved_gib"]})
                if mfu is None:
                    states[-1] = "FLOPs per image not counted (time budget)"
        row["status"] = "ok" if set(states) == {"ok"} else "; ".join(f"{e}: {s}" for e, s in zip(engines, states)
                                                                     if s != "ok")
    return list(rows.values())


def engine_ratios(step_rows: list[dict], judged: bool) -> list[dict]:
    """ZeRO-2 / DDP per model: throughput (not ok below RATIO_FLOOR) and peak allocated memory (not ok above
    RATIO_CEILING). `judged` False (the CPU rehearsal's tiny stand-ins, no device memory): reported, not judged."""
    rows = []
    for r in step_rows:
        for metric, key, limit in (("throughput ZeRO-2 / DDP", "images_per_s", RATIO_FLOOR),
                                   ("peak memory ZeRO-2 / DDP", "peak_gib", RATIO_CEILING)):
            a, b = r.get(f"zero2_{key}"), r.get(f"ddp_{key}")
            measured = a is not None and b is not None and not math.isnan(a) and not math.isnan(b) and b > 0
            value = a / b if measured else None
            if not judged:
                status = "ok"
            elif value is None:
                status = f"not measured: {r['status']}"
            elif (value < limit) if key == "images_per_s" else (value > limit):
                status = f"not ok: {'below' if key == 'images_per_s' else 'above'} {limit}"
            else:
                status = "ok"
            rows.append({"part": "ratios", "item": r["item"], "metric": metric, "value": value, "status": status,
                         "detail": "" if judged else "CPU rehearsal: reported, not judged"})
    return rows


# ----------------------------------------------------------------------------------------------------------------
# part 2: ZeRO-2 vs DDP through the trainer
# ----------------------------------------------------------------------------------------------------------------

def parity_config(setting: Setting, folder: Path, data: Path, precision: str = "no") -> Path:
    import yaml

    p = setting.parity
    images = p["batch"] * p["steps"]
    cfg = {"study": "parity", "dataset": {"spec": str(data), "conditional": True},
           "variant": {"name": "edm", "kwargs": {"P_mean": -0.8, "P_std": 1.6, "sigma_data": 0.5}},
           "training": {"total_images": images, "batch_size": p["batch"], "lr": 0.012, "lr_rampup_images": 0,
                        "lr_decay_images": 0, "ema_halflife_images": 0, "grad_clip": None,
                        "mixed_precision": precision, "snapshots": {"images": [images]},
                        "log_every_images": p["batch"]},
           "models": {"m": {"arch": p["arch"]}}}
    path = folder / f"parity-{precision}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def output_difference(ddp_run: Path, zero2_run: Path, data: Path, seed: int = 0) -> float:
    """‖D_ZeRO-2 − D_DDP‖ / ‖D_DDP − D_init‖: the two runs' denoisers (snapshot EMA with half-life 0 = the
    weights) on 16 noisy training images at σ = 0.1, 1 and 10, relative to what training changed (D_init: the
    initial weights, rebuilt as the trainer builds them). Outputs, not stored weights: the function each engine
    trained, whatever it stores."""
    import torch

    from models import family
    from models.denoiser import Denoiser
    from study.integrity import load_torch
    from training.dataset import load_dataset

    snapshot = next((ddp_run / "snapshots").glob("snapshot-*.pt"))
    ddp = Denoiser.from_snapshot(snapshot)
    zero2 = Denoiser.from_snapshot(zero2_run / "snapshots" / snapshot.name)
    torch.manual_seed(seed)
    arch = load_torch(snapshot)["arch"]["kwargs"]
    init = Denoiser(family.net_from_kwargs(arch, device="cpu"), ddp.variant, label_dim=ddp.label_dim).eval()
    ds = load_dataset(str(data))
    x0, labels = ds.x[:16], ds.labels[:16]
    g = torch.Generator().manual_seed(1)
    diff = moved = 0.0
    with torch.no_grad():
        for sigma in (0.1, 1.0, 10.0):
            x = x0 + sigma * torch.randn(x0.shape, generator=g)
            a, b, c = (d(x, sigma, labels).double() for d in (ddp, zero2, init))
            diff += float((b - a).pow(2).sum())
            moved += float((a - c).pow(2).sum())
    return math.sqrt(diff / moved)


def part_parity(setting: Setting, work: Path, data: Path, budget: float) -> list[dict]:
    """The trainer on the DDP path and under ZeRO-2, in fp32 and in bf16 (where ZeRO-2's forward must run the DDP
    path's autocast: an fp32 forward against a bf16 one parts them by far more than the tolerance)."""
    folder = work / "parity"
    folder.mkdir()
    deadline = time.time() + budget
    rows = []
    for precision in ("no", "bf16"):
        rows += parity_runs(setting, folder, data, precision, deadline)
    return rows


def parity_runs(setting: Setting, folder: Path, data: Path, precision: str, deadline: float) -> list[dict]:
    cfg = parity_config(setting, folder, data, precision)
    name = "fp32" if precision == "no" else precision
    item = f"{setting.parity['arch']} {name}"
    accelerate = Path(sys.executable).with_name("accelerate")
    launchers = {
        "ddp": [sys.executable, "-m", "training.train"],
        "zero2": [accelerate, "launch", "--config_file", ROOT / "workflow/accelerate/deepspeed-zero2.yaml",
                  "--num_processes", "1", "--main_process_port", "0", "-m", "training.train"],
    }
    losses = {}
    for engine, launcher in launchers.items():
        log(f"parity: the trainer, {engine}, {name}")
        out = folder / f"{engine}-{name}"
        rc, tail = run(launcher + ["--config", cfg, "--model", "m", "--data", data, "--out", out, "--no-progress"],
                       timeout=deadline - time.time(), log_to=folder / f"{engine}-{name}.log")
        if rc != 0:
            why = "time budget" if rc is None else f"{engine} failed: {last_line(tail)}"
            return [{"part": "parity", "item": item, "metric": m, "status": why}
                    for m in ("output_rel_diff", "loss_rel_diff")]
        losses[engine] = [json.loads(x)["loss"] for x in (out / "log.jsonl").read_text().splitlines()]
    rel = output_difference(folder / f"ddp-{name}", folder / f"zero2-{name}", data)
    loss_gap = max(abs(a - b) / abs(a) for a, b in zip(losses["ddp"], losses["zero2"]))
    steps = setting.parity["steps"]
    return [{"part": "parity", "item": item, "metric": "output_rel_diff", "value": rel,
             "status": "ok" if rel < PARITY_TOLERANCE else f"FAILED: above {PARITY_TOLERANCE:g}",
             "detail": f"{steps} {name} steps of {setting.parity['batch']} images; ‖D_zero2 − D_ddp‖ / "
                       "‖D_ddp − D_init‖ at σ = 0.1, 1, 10"},
            {"part": "parity", "item": item, "metric": "loss_rel_diff", "value": loss_gap,
             "status": "ok" if loss_gap < PARITY_TOLERANCE else f"FAILED: above {PARITY_TOLERANCE:g}",
             "detail": "largest relative difference of a logged step's loss"}]


# ----------------------------------------------------------------------------------------------------------------
# part 3: a short study through the snakemake DAG
# ----------------------------------------------------------------------------------------------------------------

def study_config(setting: Setting, work: Path, data: Path) -> Path:
    import yaml

    from study.spec import deep_merge

    cfg = yaml.safe_load((ROOT / "workflow/config/gpu-validate.yaml").read_text())
    overrides = setting.study["overrides"]
    if "models" in overrides:
        cfg["models"] = overrides["models"]
    cfg = deep_merge(cfg, {k: v for k, v in overrides.items() if k != "models"})
    cfg["dataset"]["spec"] = str(data)
    path = work / "study.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def part_study(setting: Setting, work: Path, data: Path, budget: float) -> list[dict]:
    import pandas as pd
    import yaml

    config = study_config(setting, work, data)
    cfg = yaml.safe_load(config.read_text())
    dag = work / "dag"
    dag.mkdir()
    log(f"study: snakemake --configfile {config.relative_to(work.parent)} (working directory {dag})")
    start = time.time()
    rc, tail = run([sys.executable, "-m", "snakemake", "--directory", dag, "--configfile", config,
                    "--cores", str(min(os.cpu_count() or 1, 8)), "--resources", "gpu=1"],
                   timeout=budget, log_to=work / "study.log")
    seconds = time.time() - start
    study = dag / "results" / cfg["study"]
    model = next(iter(cfg["models"]))
    if rc != 0:
        why = "time budget" if rc is None else f"snakemake failed: {last_line(tail)}"
        return [{"part": "study", "item": "snakemake", "status": why, "value": seconds, "metric": "seconds"}]
    log_lines = [json.loads(x) for x in (study / "runs" / model / "log.jsonl").read_text().splitlines()]
    loss = [line["loss"] for line in log_lines]
    rates = sorted(line["images_per_s_steps"] for line in log_lines[1:] if line.get("images_per_s_steps"))
    snapshots = sorted((study / "snapshots" / model).glob("snapshot-*.pt"))
    evals = sorted((study / "eval" / model).glob("*.csv"))
    fits = pd.read_csv(study / "analysis" / "exponents.csv")
    fitted = int(fits["exponent"].notna().sum())
    figures = sorted((study / "figures").glob("*.png"))
    losses = pd.read_csv(study / "analysis" / "losses.csv")
    total = losses[losses["sigma"].isna()].sort_values("images_seen")  # the weighted totals
    return [
        {"part": "study", "item": "snakemake", "status": "ok", "metric": "seconds", "value": seconds,
         "detail": f"model {model} ({cfg['models'][model]['arch']}), {cfg['training']['total_images']} images"},
        {"part": "study", "item": "loss falls", "metric": "last / first logged loss", "value": loss[-1] / loss[0],
         "status": "ok" if loss[-1] < loss[0] else "FAILED: the loss did not fall",
         "detail": f"{loss[0]:.4f} → {loss[-1]:.4f} over {len(loss)} log intervals"},
        {"part": "study", "item": "snapshots evaluated", "metric": "evaluations", "value": len(evals),
         "status": "ok" if len(evals) == len(snapshots) > 1 else "FAILED: a snapshot was not evaluated",
         "detail": f"{len(snapshots)} snapshots; total L − J* {total['gap'].iloc[0]:.4f} → {total['gap'].iloc[-1]:.4f}"},
        {"part": "study", "item": "fits and figures", "metric": "fitted rows of exponents.csv", "value": fitted,
         "status": "ok" if fitted and figures else "FAILED: no fit or no figure",
         "detail": f"{len(fits)} rows, {len(figures)} figures"},
        {"part": "study", "item": "trainer steps-only rate", "metric": "images/s",
         "value": rates[len(rates) // 2] if rates else None, "status": "ok" if rates else "FAILED: no rate logged",
         "arch": cfg["models"][model]["arch"],
         "detail": f"median of log.jsonl's images_per_s_steps over {len(rates)} intervals after the first"},
    ]


# ----------------------------------------------------------------------------------------------------------------
# part 4: D* at ImageNet-64's dimension against the same-FLOP matmul (bench_optimal_loss.py's cases)
# ----------------------------------------------------------------------------------------------------------------

def part_dstar(setting: Setting, work: Path, budget: float) -> list[dict]:
    d = setting.dstar
    deadline = time.time() + budget
    results = {}
    for case in ("matmul", "exact"):
        log(f"dstar: {case}, N = {d['n']:,}, D = {d['dim']:,}, Q = {d['queries']:,}")
        rc, tail = run([sys.executable, ROOT / "benchmarks/bench_optimal_loss.py", f"--case={case}",
                        f"--device={setting.device}", f"--n={d['n']}", f"--dim={d['dim']}",
                        f"--queries={d['queries']}", f"--sigma={d['sigma']}", "--repeats=3"],
                       timeout=deadline - time.time(), log_to=work / f"dstar-{case}.log")
        if rc != 0:
            why = "time budget" if rc is None else f"failed: {last_line(tail)}"
            return [{"part": "dstar", "item": case, "status": why}]
        results[case] = json.loads(last_line(tail))
    shape = f"N = {d['n']:,}, D = {d['dim']:,}, Q = {d['queries']:,}, σ = {d['sigma']:g}"
    m, e = results["matmul"], results["exact"]
    work_done = "ok" if e["jstar"] > 0 else "not ok: J* = 0, every posterior collapsed (the screen skipped the work)"
    return [{"part": "dstar", "item": "matmul", "metric": "seconds", "value": m["seconds"], "status": "ok",
             "detail": f"{shape}; float32, TF32 off, {m['gflops']:.0f} GFLOP/s"},
            {"part": "dstar", "item": "exact D*", "metric": "seconds", "value": e["seconds"], "status": work_done,
             "detail": f"estimate_optimal_loss(full); J* = {e['jstar']:.5g}; peak +{e['peak_extra_mib']:.0f} MiB"},
            {"part": "dstar", "item": "exact / matmul speed", "metric": "ratio", "value": m["seconds"] / e["seconds"],
             "status": "ok", "detail": "> 1: faster than the plain matmul of the same FLOPs"}]


# ----------------------------------------------------------------------------------------------------------------
# items derived from the parts: ZeRO-2 / DDP, the trainer against the bench
# ----------------------------------------------------------------------------------------------------------------

def trainer_against_bench(rows: list[dict], setting: Setting, judged: bool) -> list[dict]:
    """The study's trainer, steps only (log.jsonl), over the step part's DDP-path rate of the same model at the
    same batch_gpu (not ok below RATIO_FLOOR): the benchmark is the trainer's step when they agree."""
    trainer = next((r for r in rows if r.get("item") == "trainer steps-only rate" and r.get("value")), None)
    bench_item = next((m[0] for m in setting.models if trainer and m[1] == trainer["arch"]), None)
    bench = next((r for r in rows if r["part"] == "step" and r["item"] == bench_item), {})
    value = trainer["value"] / bench["ddp_images_per_s"] if trainer and bench.get("ddp_images_per_s") else None
    if not judged:
        status = "ok"
    elif value is None:
        status = "not measured: the study or the step part did not give its rate"
    else:
        status = "ok" if value >= RATIO_FLOOR else f"not ok: below {RATIO_FLOOR}"
    return [{"part": "ratios", "item": bench_item or "trainer", "metric": "trainer steps-only / bench images/s",
             "value": value, "status": status,
             "detail": "" if judged else "CPU rehearsal: the study's shape is not the bench's; reported, not judged"}]


def derived_items(rows: list[dict], setting: Setting, parts: list[str]) -> list[dict]:
    judged = setting.device == "cuda"
    step_rows = [r for r in rows if r["part"] == "step"]
    out = engine_ratios(step_rows, judged) if "step" in parts else []
    if {"step", "study"} <= set(parts):
        out += trainer_against_bench(rows, setting, judged)
    return out


# ----------------------------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------------------------

def fmt(value, spec=".3g") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return format(value, spec)


def write_results(rows: list[dict], card: dict, out: Path) -> None:
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: ("" if row.get(c) is None else row.get(c)) for c in COLUMNS} | card)


def report_text(rows: list[dict], card: dict, setting: Setting, command: str, seconds: float) -> str:
    by = {p: [r for r in rows if r["part"] == p] for p in ("step", "parity", "study", "ratios", "dstar")}
    bad = [r for r in rows if r["status"] != "ok"]
    kind = "CPU rehearsal (tiny stand-ins; no GPU number here)" if setting.device == "cpu" else "GPU validation"
    lines = [f"# {kind}: {card['card']}", "",
             f"Driver {card['driver']} · torch {card['torch']} · {card['date']} · `{command}` · "
             f"{seconds / 60:.1f} min · **{'all ok' if not bad else f'{len(bad)} not ok'}**", ""]
    lines += ["## One optimizer step per paper model at its configured batch_gpu", "",
              f"{setting.steps} timed steps after {setting.warmup} ({setting.precision}); DDP path: one process with "
              "net, Adam, autocast and the fp32 EMA; ZeRO-2: DeepSpeed (the trainer's settings, fp32 engine, autocast). "
              "Peak memory: allocated (reserved) GiB.", "",
              "| model | params (M) | batch_gpu | shape | DDP img/s | DDP MFU | DDP peak | ZeRO-2 img/s | ZeRO-2 MFU "
              "| ZeRO-2 peak | status |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in by["step"]:
        cells = [r["item"], fmt(r["params"] and r["params"] / 1e6, ".1f"), str(r["batch_gpu"]), r["shape"]]
        for e in ("ddp", "zero2"):
            cells += [fmt(r.get(f"{e}_images_per_s"), ".1f"), fmt(r.get(f"{e}_mfu"), ".1%"),
                      f"{fmt(r.get(f'{e}_peak_gib'), '.1f')} ({fmt(r.get(f'{e}_reserved_gib'), '.1f')})"]
        lines.append("| " + " | ".join(cells + [r["status"]]) + " |")
    for part, title in (("parity", "ZeRO-2 vs DDP, the trainer"), ("study", "A short study through snakemake"),
                        ("ratios", "ZeRO-2 / DDP from the step part, and the trainer's steps-only rate against the bench"),
                        ("dstar", "D* at ImageNet-64's dimension against the same-FLOP matmul, where J* > 0")):
        lines += ["", f"## {title}", "", "| item | metric | value | status | detail |", "|---|---|---|---|---|"]
        lines += [f"| {r['item']} | {r.get('metric') or ''} | {fmt(r.get('value'), '.4g')} | {r['status']} | "
                  f"{r.get('detail') or ''} |" for r in by[part]]
    lines += ["", "Files: results.csv (these rows, each with the card), work/ (every part's log)."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------------

PARTS = ("step", "parity", "study", "dstar")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker-step"]:
        return step_worker(argv[1:])
    if argv[:1] == ["--worker-flops"]:
        return flops_worker(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-rehearsal", action="store_true", help="tiny stand-ins on the CPU (CI)")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "gpu-validate", help="cleared, then written")
    p.add_argument("--config", type=Path, default=ROOT / "workflow/config/paper-img64.yaml",
                   help="the paper config whose models and batch_gpu are measured")
    p.add_argument("--parts", default=",".join(PARTS), help=f"a subset of {','.join(PARTS)}")
    p.add_argument("--budget-scale", type=float, default=1.0, help="multiply every part's time budget")
    a = p.parse_args(argv)
    parts = [x for x in a.parts.split(",") if x]
    if set(parts) - set(PARTS):
        p.error(f"--parts: unknown {sorted(set(parts) - set(PARTS))}; known: {','.join(PARTS)}")
    import torch

    if not a.cpu_rehearsal and not torch.cuda.is_available():
        p.error("no CUDA device is visible: run it on a GPU machine, or --cpu-rehearsal here")
    setting = cpu_rehearsal_setting() if a.cpu_rehearsal else gpu_setting(a.config)
    if a.cpu_rehearsal:  # one intra-op thread per process: the fastest and steadiest on a small shared CPU
        THREADS.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    command = "bash benchmarks/gpu_validate.sh" + (" --cpu-rehearsal" if a.cpu_rehearsal else "")
    out = a.out.resolve()
    shutil.rmtree(out, ignore_errors=True)
    work = out / "work"
    work.mkdir(parents=True)
    card = card_info(setting.device)
    log(f"{card['card']} | driver {card['driver']} | torch {card['torch']} | {card['date']} | out {out}")
    start = time.time()
    rows = []
    data = work / f"synthetic-{setting.study['resolution']}.npz"
    if {"parity", "study"} & set(parts):
        from benchmarks.make_synthetic_dataset import make

        s = setting.study
        make(data, s["n"], s["resolution"], 3, seed=0, classes=s["classes"])
    budget = {k: v * a.budget_scale for k, v in setting.budget.items()}
    for part in parts:
        t0 = time.time()
        try:
            if part == "step":
                rows += part_step(setting, work, budget["step"])
            elif part == "parity":
                rows += part_parity(setting, work, data, budget["parity"])
            elif part == "study":
                rows += part_study(setting, work, data, budget["study"])
            else:
                rows += part_dstar(setting, work, budget["dstar"])
        except Exception as e:  # noqa: BLE001  a broken part is reported; the others still run
            rows.append({"part": part, "item": part, "status": f"FAILED: {type(e).__name__}: {e}"[:300]})
        log(f"{part}: {time.time() - t0:.0f} s, " + ", ".join(f"{r['item']} {r['status']}" for r in rows
                                                              if r["part"] == part))
    rows += derived_items(rows, setting, parts)
    seconds = time.time() - start
    write_results(rows, card, out)
    (out / "report.md").write_text(report_text(rows, card, setting, command, seconds))
    bad = [r for r in rows if r["status"] != "ok"]
    log(f"done in {seconds:.0f} s: {out / 'report.md'}, {out / 'results.csv'}; "
        + ("all ok" if not bad else f"{len(bad)} not ok"))
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
