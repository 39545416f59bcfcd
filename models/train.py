"""`python -m models.train --config CONFIG.yaml --model NAME --data DATASET.npz --out RUN_DIR` — the training loop.

One Accelerate loop for every launch mode (plain CPU, multi-GPU DDP, DeepSpeed ZeRO-2; see workflow/accelerate/),
EDM2-style: a thin CLI builds the settings and calls `train`, which counts progress in images seen.

What one step does (global batch B split evenly over the processes, b = B / processes each):
  x0, labels  ← the next B images of a seeded per-epoch permutation (a pure function of images seen, so resuming
                needs no data-loader state); this process takes its b of them
  σ ~ schedule.sample_sigma (the variant's noise distribution, or the optimal-loss schedule), ε ~ N(0, I), drawn
                for all b at once: micro-batching below does not change them
  then per micro-batch of training.batch_gpu images (EDM2's gradient accumulation; DDP syncs gradients on the last
  one only, DeepSpeed counts them as its gradient_accumulation_steps):
  D, logvar   = Denoiser(net, variant)(x0 + σ·ε, σ, labels)        (D = c_skip·x + c_out·F(c_in·x, c_noise))
  x0-loss_i   = mean_dims (D_i − x0_i)²            → the per-σ-bin tracker (all ranks' samples, gathered)
  loss_i      = schedule.loss_weight(σ_i)·x0-loss_i, and with the learned log-variance (training.logvar, EDM2's
                uncertainty) loss_i / exp(logvar_i) + logvar_i — per dimension: what log.jsonl reports
  backward of dims·Σ_i loss_i / B over the global batch: EDM2's gradient scale (its loss.sum() over pixels and
                images divided by the batch), not the per-dimension mean's, which is dims× smaller and lets
                Adam's eps damp the update at paper resolution
  Adam(β 0.9/0.99, eps 1e-8) with lr(t) = lr·min(t/rampup, 1)/sqrt(max(t/t_ref, 1)) (EDM2), gradient clipping
  (a norm of the per-dimension loss's gradient: grad_clip·dims on this scale), then the EMA of the weights
  (half-life in images, EDM-style ramp; see `ema_beta`).

Run folder (docs/internals.md): state.pt (resumable; atomic), snapshots/snapshot-{images:09d}.pt (EMA weights,
arch, variant, images_seen, flops counted with torch.utils.flop_counter), log.jsonl, done.json (written last).

EMA choice: EDM2 uses a "power" EMA (σ_rel profiles, reconstructable post hoc).  We keep EDM's (2022) classic
exponential EMA with a half-life in images and its ramp-up (half-life ≤ ema_rampup_ratio·images seen): one
buffer instead of two, and every snapshot of a scaling study is then averaged the same way relative to its own
length early on.  It is not the EDM2 post-hoc EMA; a study that needs that would add it here.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from models.data import Dataset, DatasetArrays as HostData, open_dataset
from models.config import load_config, micro_batch, model_training, snapshot_marks, total_images as _total_images
from models.denoiser import Denoiser
from models.sigma_bins import SigmaBinTracker
from models.atomic import atomic_path
from models import integrity

STATE_VERSION = 2  # 2: state.pt (and done.json) carry `config_fingerprint`

# ZeRO-2 communication tuning, applied unless a DeepSpeed config (e.g. a --deepspeed_config_file) sets the key.
# Accelerate's inline `deepspeed_config` (workflow/accelerate/deepspeed-zero2.yaml) cannot express these.
DS_ZERO_TUNING = {"allgather_partitions": True, "allgather_bucket_size": 200_000_000, "overlap_comm": True,
                  "reduce_scatter": True, "reduce_bucket_size": 200_000_000, "contiguous_gradients": True}


class NonFiniteLossError(FloatingPointError):
    """Training loss became NaN/inf; the message names the step and the σ values of the batch."""


class RunFolderMismatchError(ValueError):
    """The run folder's state.pt / done.json was made with other training settings than this run's."""


# ----------------------------------------------------------------------------------------------------------------
# the training set on the host, in its stored dtype
# ----------------------------------------------------------------------------------------------------------------

def open_training_data(data) -> HostData:
    """`data` as HostData (models.data.DatasetArrays, the project's one reader: the images in their stored dtype,
    memory-mapped where the file allows; `rows(idx, device)` converts only a step's batch rows, on the device):
    a models.data.Dataset (its tensor, not a copy) or any models.data spec (models.data.open_dataset)."""
    if isinstance(data, Dataset):
        return HostData.from_dataset(data)
    return open_dataset(data)


# ----------------------------------------------------------------------------------------------------------------
# schedules (pure functions, tested on their own)
# ----------------------------------------------------------------------------------------------------------------

def learning_rate(images_seen: float, training: dict) -> float:
    """EDM2's schedule in images: linear ramp-up over lr_rampup_images, then lr/sqrt(t/t_ref) after t_ref."""
    lr = float(training["lr"])
    decay = float(training.get("lr_decay_images") or 0)
    rampup = float(training.get("lr_rampup_images") or 0)
    if decay > 0:
        lr /= math.sqrt(max(images_seen / decay, 1.0))
    if rampup > 0:
        lr *= min(images_seen / rampup, 1.0)
    return lr


def ema_beta(images_seen: float, batch_size: int, training: dict) -> float:
    """Per-step EMA decay for a half-life in images: β = 0.5^(B / h); h ramps as min(h, ratio·images seen)."""
    halflife = float(training.get("ema_halflife_images") or 0)
    ratio = training.get("ema_rampup_ratio")
    if ratio:
        halflife = min(halflife, float(ratio) * images_seen)
    if halflife <= 0:
        return 0.0
    return 0.5 ** (batch_size / halflife)


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch) + 17)
    return torch.randperm(n, generator=g)


def batch_indices(images_seen: int, batch_size: int, n: int, seed: int) -> torch.Tensor:
    """Dataset indices of the global batch that starts at `images_seen` in the endless stream of seeded epochs."""
    pos = torch.arange(images_seen, images_seen + batch_size)
    out = torch.empty(batch_size, dtype=torch.long)
    for epoch in torch.unique(pos // n).tolist():
        sel = (pos // n) == epoch
        out[sel] = epoch_permutation(n, seed, epoch)[pos[sel] % n]
    return out


# ----------------------------------------------------------------------------------------------------------------
# the run folder's settings fingerprint
# ----------------------------------------------------------------------------------------------------------------

def config_fingerprint(training: dict, arch: dict, variant: dict, data_shape, label_dim: int) -> dict:
    """What a run folder's state belongs to: the model's merged training section, its net (arch name and the
    complete kwargs), the diffusion variant, and the dataset's shape and label count. Plain JSON data (lists, not
    tuples), so it compares equal after a round trip through state.pt or done.json.  training.batch_gpu is left
    out: micro-batching changes no image, σ or noise, so a run may resume with another (e.g. on smaller GPUs)."""
    training = {k: v for k, v in training.items() if k != "batch_gpu"}
    fp = {"training": training, "arch": arch, "variant": variant,
          "dataset": {"shape": list(data_shape), "label_dim": int(label_dim)}}
    return json.loads(json.dumps(fp))


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def fingerprint_differences(old: dict, new: dict) -> list[str]:
    """'key: old → new' for every dotted key whose value differs (a key missing on one side shows as <unset>)."""
    a, b = _flatten(old), _flatten(new)

    def show(d, k):
        text = repr(d[k]) if k in d else "<unset>"
        return text if len(text) <= 60 else text[:57] + "..."

    missing = object()
    return [f"{k}: {show(a, k)} → {show(b, k)}" for k in sorted(set(a) | set(b))
            if a.get(k, missing) != b.get(k, missing)]


def check_fingerprint(saved: dict | None, current: dict, what: Path, out: Path) -> None:
    """Refuse to continue (or report done) a run folder that was made with other settings. Files from before
    fingerprints (saved None) cannot be checked and are accepted."""
    if saved is None:
        return
    diffs = fingerprint_differences(saved, current)
    if diffs:
        raise RunFolderMismatchError(
            f"{what} was made with other settings than this run's ({len(diffs)} differ: {'; '.join(diffs)}); "
            f"resuming would mix two configurations. Use a fresh --out, or delete {out} to train afresh.")


# ----------------------------------------------------------------------------------------------------------------
# pieces of the loop
# ----------------------------------------------------------------------------------------------------------------

def per_example_losses(denoiser, schedule, x0, sigma, noise, labels):
    """(training loss per example, unweighted x0-loss per example) for one batch."""
    view = (-1,) + (1,) * (x0.ndim - 1)
    x = x0 + sigma.reshape(view) * noise
    D, logvar = denoiser(x, sigma, labels, return_logvar=True)
    x0_loss = ((D - x0) ** 2).flatten(1).mean(1)
    loss = schedule.loss_weight(sigma).to(x0_loss) * x0_loss
    if logvar is not None:
        logvar = logvar.to(torch.float32).reshape(-1)
        loss = loss / torch.exp(logvar) + logvar
    return loss, x0_loss


def count_step_flops(build_meta, variant, x_shape, label_dim: int, fallback_net=None) -> int:
    """Training FLOPs of one forward+backward of the actual per-process batch, counted by
    torch.utils.flop_counter.FlopCounterMode.  Runs on the meta device (shapes only: exact and free); falls back
    to a throw-away copy of the real net when the meta run fails."""
    from torch.utils.flop_counter import FlopCounterMode

    def run(net, device):
        b = x_shape[0]
        den = Denoiser(net, variant, label_dim=label_dim)
        x0 = torch.zeros(x_shape, device=device)
        sigma = torch.ones(b, device=device)
        noise = torch.zeros(x_shape, device=device)
        labels = torch.zeros(b, label_dim, device=device) if label_dim else None
        counter = FlopCounterMode(display=False)
        with counter:
            loss, _ = per_example_losses(den, variant, x0, sigma, noise, labels)
            loss.mean().backward()
        return int(counter.get_total_flops())

    try:
        return run(build_meta(), "meta")
    except Exception:  # noqa: BLE001 - any op without a meta kernel: count on a real copy instead
        if fallback_net is None:
            raise
        device = next(fallback_net.parameters()).device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            return run(copy.deepcopy(fallback_net).train(), device)


def rng_state(generator: torch.Generator) -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
             "noise": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    generator.set_state(state["noise"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_torch_save(obj, path: Path) -> None:
    """Write via a temp file in the same folder + os.replace, so a crash never leaves a half-written file."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def atomic_write_text(text: str, path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _promote_scalar_params(net: torch.nn.Module) -> None:
    """DeepSpeed broadcasts each parameter as `p.view(torch.uint8)`, which fails for 0-dim tensors (EDM2's scalar
    gains).  Give those a shape of [1] for the DeepSpeed run; every use of them broadcasts the same way.  The EMA
    copy keeps the original shapes, so snapshots are identical across launch modes."""
    for module in net.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and p.ndim == 0:
                module._parameters[name] = torch.nn.Parameter(p.detach().reshape(1), requires_grad=p.requires_grad)


def make_schedule(variant, schedule_cfg: dict, jstar):
    """The object that draws σ and weights the loss: the variant (baseline) or models.schedule's
    OptimalLossSchedule (imported only when asked: another module, written later)."""
    name = schedule_cfg.get("name", "baseline")
    if name == "baseline":
        return variant
    if name == "optimal-loss":
        if jstar is None:
            raise ValueError("training.schedule.name = optimal-loss needs the J* table: pass --jstar FILE "
                             "(results/<study>/optimal_loss/jstar.csv)")
        if not Path(jstar).is_file():
            raise FileNotFoundError(f"--jstar file not found: {jstar}")
        from models.schedule import OptimalLossSchedule

        kwargs = {k: v for k, v in schedule_cfg.items() if k not in ("name", "kwargs", "update_every_images")}
        kwargs.update(schedule_cfg.get("kwargs") or {})
        return OptimalLossSchedule(variant, str(jstar), **kwargs)
    raise ValueError(f"training.schedule.name: unknown schedule {name!r} (baseline or optimal-loss)")


# ----------------------------------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------------------------------

def train(cfg: dict, model: str, data, out, *, jstar=None, stop_after_images: int | None = None,
          progress: bool = True, accelerator=None) -> dict:
    """Train model NAME of study config `cfg` (a dict from load_config, or a path) on `data` (a .npz path, a
    models.data spec, or a models.data.Dataset) into run folder `out`; resumes from out/state.pt if present.

    Returns a summary dict {status: "done" | "stopped" | "already-done", images_seen, flops, snapshots, ...}.
    `stop_after_images` (debug) stops after that many images seen, with the state saved — as if killed."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, gather_object

    from models import family
    from models.diffusion import get_variant

    if not isinstance(cfg, dict) or "training" not in cfg:
        cfg = load_config(cfg)
    training = model_training(cfg, model)
    entry = cfg["models"][model]
    arch_name = entry["arch"]
    out = Path(out)
    total = _total_images(training)
    marks = snapshot_marks(training)
    batch = int(training["batch_size"])

    # ---- data (stays on the host in its stored dtype; each step copies only this rank's rows to the device) ----
    data_src = open_training_data(data)
    conditional = bool(cfg["dataset"].get("conditional"))
    if conditional and data_src.labels is None:
        raise ValueError(f"dataset.conditional is true but dataset {data_src.name!r} ({data}) has no labels")
    label_dim = data_src.num_classes if conditional else 0
    n_data, C, H, W = data_src.shape
    if H != W:
        raise ValueError(f"dataset {data_src.name!r}: images must be square, got {H}x{W}")
    labels_all = data_src.labels if conditional else None

    # ---- what this run is: checked against the run folder before anything is resumed or reported done ----
    arch_kw = family.arch_kwargs(arch_name, resolution=H, channels=C, label_dim=label_dim,
                                 logvar=bool(training["logvar"]), dropout=float(training["dropout"]))
    vcfg = entry.get("variant") or cfg["variant"]  # a model's own variant or the study's
    variant = get_variant(vcfg["name"], **(vcfg.get("kwargs") or {}))
    variant_record = {"name": variant.name, "kwargs": variant.kwargs()}
    fingerprint = config_fingerprint(training, {"name": arch_name, "kwargs": arch_kw}, variant_record,
                                     data_src.shape, label_dim)

    if (out / "done.json").exists():
        done = json.loads((out / "done.json").read_text())
        check_fingerprint(done.get("config_fingerprint"), fingerprint, out / "done.json", out)
        return {**done, "status": "already-done"}

    accelerator = accelerator or Accelerator(mixed_precision=training["mixed_precision"])
    world, rank = accelerator.num_processes, accelerator.process_index
    is_main = accelerator.is_main_process
    device = accelerator.device
    use_ds = accelerator.distributed_type == DistributedType.DEEPSPEED
    launched = int(os.environ.get("WORLD_SIZE", world))
    if launched != world:  # e.g. DeepSpeed on CPU: Accelerate then sets up no process group of its own
        raise RuntimeError(f"the launcher started {launched} processes but Accelerate sees {world} "
                           f"({accelerator.distributed_type}, {device}); on CPU run several processes as DDP "
                           "(ACCELERATE_USE_CPU=1 with torchrun or accelerate launch) and DeepSpeed with one")
    local = batch // world
    batch_gpu, rounds = micro_batch(training, world)  # with the processes this run really has
    # accelerator.backward divides by this (DeepSpeed's engine does, with its own gradient_accumulation_steps)
    accelerator.gradient_accumulation_steps = rounds
    dims = C * H * W

    # ---- net, variant, schedule, optimiser ----
    torch.manual_seed(int(training["seed"]))  # identical initial weights on every rank
    net = family.net_from_kwargs(arch_kw, device="cpu").to(device).train()
    ema = copy.deepcopy(net).eval().requires_grad_(False).to(torch.float32)
    if use_ds:
        _promote_scalar_params(net)  # after the EMA copy: snapshots keep the family's shapes
    n_params = sum(p.numel() for p in net.parameters())
    arch_record = {"name": arch_name, "resolution": H, "channels": C, "label_dim": label_dim, "kwargs": arch_kw}
    schedule = make_schedule(variant, training["schedule"], jstar)
    tracker = SigmaBinTracker(variant.sigma_min, variant.sigma_max, training["sigma_bins"],
                              training["sigma_bin_decay"])
    if hasattr(schedule, "set_model_loss"):
        schedule.set_model_loss(tracker)
    optimizer = torch.optim.Adam(net.parameters(), lr=learning_rate(batch, training), betas=(0.9, 0.99), eps=1e-8)
    noise_gen = torch.Generator(device=device).manual_seed(int(training["seed"]) * 1000 + 7919 * (rank + 1))

    # ---- resume ----
    state_path = out / "state.pt"
    images_seen, written = 0, []
    loaded = None
    if state_path.exists():
        loaded = torch.load(state_path, map_location="cpu", weights_only=False)
        check_fingerprint(loaded.get("config_fingerprint"), fingerprint, state_path, out)
        if loaded.get("world_size") != world:
            raise ValueError(f"{state_path}: saved with {loaded.get('world_size')} processes, now {world}; "
                             "exact resumption needs the same number")
        if not use_ds:
            net.load_state_dict(loaded["net"])
            optimizer.load_state_dict(loaded["optimizer"])
        ema.load_state_dict(loaded["ema"])
        tracker.load_state_dict(loaded["tracker"])
        if hasattr(schedule, "load_state_dict") and loaded.get("schedule") is not None and schedule is not variant:
            schedule.load_state_dict(loaded["schedule"])
        images_seen, written = int(loaded["images_seen"]), list(loaded["snapshots"])

    if use_ds:  # no DataLoader goes through prepare, so DeepSpeed's "auto" batch/clip values are set here
        ds_cfg = accelerator.state.deepspeed_plugin.deepspeed_config
        ds_cfg["train_micro_batch_size_per_gpu"] = batch_gpu
        ds_cfg["train_batch_size"] = batch
        ds_cfg["gradient_accumulation_steps"] = rounds
        ds_cfg["gradient_clipping"] = float(training["grad_clip"] or 0.0) * dims
        zero = ds_cfg.setdefault("zero_optimization", {})
        for key, value in DS_ZERO_TUNING.items():
            zero.setdefault(key, value)
    model_p, optimizer_p = accelerator.prepare(net, optimizer)
    if accelerator.gradient_accumulation_steps != rounds:  # prepare takes DeepSpeed's value: it must be ours
        raise RuntimeError(f"gradient accumulation is {accelerator.gradient_accumulation_steps} micro-batches, "
                           f"expected {rounds} (training.batch_gpu = {batch_gpu})")
    if loaded is not None and use_ds:
        accelerator.load_state(str(out / loaded["ds_dir"]))
    if loaded is not None:
        set_rng_state(loaded["rng"][rank], noise_gen)
    denoiser = Denoiser(model_p, variant, label_dim=label_dim)
    raw_net = accelerator.unwrap_model(model_p)

    # FLOPs of one training step of this process's batch, counted once (×world per global step)
    def build_meta():
        # eval(): skips the EDM2 forced weight renormalisation (elementwise, not counted) — twice as fast to
        # trace; the counted convolutions / matmuls / attention are those of the training step
        return family.net_from_kwargs(arch_kw, device="meta").eval()

    flops_per_image = (count_step_flops(build_meta, variant, (batch_gpu, C, H, W), label_dim, fallback_net=raw_net)
                       / batch_gpu)

    # ---- bookkeeping ----
    snap_dir = out / "snapshots"
    if is_main:
        snap_dir.mkdir(parents=True, exist_ok=True)
        _truncate_log(out / "log.jsonl", images_seen)
    log_every = int(training["log_every_images"])
    sched_every = int(training["schedule"].get("update_every_images") or log_every)
    state_every = int(training.get("state_every_images") or 0)
    loss_sum, loss_n, t_start, img_start = 0.0, 0, time.time(), images_seen
    bar = None
    if progress and is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=images_seen, unit="img", unit_scale=True, desc=f"train {model}",
                   dynamic_ncols=True, file=sys.stderr)

    if loaded is not None:  # the interrupted log interval's running loss continues where it was
        loss_sum, loss_n = loaded.get("log_accumulator", (0.0, 0))

    def save_state():
        rngs = gather_object([rng_state(noise_gen)])
        ds_dir = None
        if use_ds:  # ZeRO partitions optimizer state over ranks: DeepSpeed's own (collective) checkpoint
            ds_dir = f"state-ds/{images_seen:09d}"
            accelerator.save_state(str(out / ds_dir))
        if is_main:
            state = {"version": STATE_VERSION, "images_seen": images_seen, "snapshots": written,
                     "world_size": world, "ema": ema.state_dict(), "tracker": tracker.state_dict(), "rng": rngs,
                     "flops_per_image": flops_per_image, "model": model, "ds_dir": ds_dir,
                     "log_accumulator": (loss_sum, loss_n), "config_fingerprint": fingerprint,
                     "schedule": schedule.state_dict() if schedule is not variant and
                     hasattr(schedule, "state_dict") else None}
            if not use_ds:
                state["net"] = raw_net.state_dict()
                state["optimizer"] = optimizer.state_dict()
            atomic_torch_save(state, state_path)
            if use_ds:  # older DeepSpeed checkpoints are no longer referenced
                import shutil

                for old in (out / "state-ds").iterdir():
                    if old.name != f"{images_seen:09d}":
                        shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()

    def save_snapshot():
        path = snap_dir / f"snapshot-{images_seen:09d}.pt"
        if is_main:
            atomic_torch_save({"ema": ema.state_dict(), "arch": arch_record, "variant": variant_record,
                               "images_seen": images_seen, "flops": flops_per_image * images_seen,
                               "params": n_params, "model": model, "training": training,
                               "world_size": world}, path)
            integrity.stamp(path)  # checksum of the file as written: later readers detect corruption
        written.append(path.name)

    # ---- steps ----
    status = "done"
    while images_seen < total:
        step = images_seen // batch
        idx = batch_indices(images_seen, batch, n_data, int(training["seed"]))[rank * local:(rank + 1) * local]
        x0 = data_src.rows(idx, device)
        labels = labels_all[idx].to(device) if labels_all is not None else None
        sigma = schedule.sample_sigma(local, generator=noise_gen, device=device).to(torch.float32)
        noise = torch.randn(x0.shape, generator=noise_gen, device=device)

        lr = learning_rate(images_seen + batch, training)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x0_loss, loss_global = [], 0.0
        for r in range(rounds):
            part = slice(r * batch_gpu, (r + 1) * batch_gpu)
            last = r == rounds - 1
            accelerator.sync_gradients = last  # DeepSpeed: its accumulation boundary (and optimizer step)
            with contextlib.nullcontext() if last else accelerator.no_sync(model_p):  # DDP: all-reduce once
                with accelerator.autocast():
                    loss_ex, x0_part = per_example_losses(denoiser, schedule, x0[part], sigma[part], noise[part],
                                                          None if labels is None else labels[part])
                # every rank needs the same verdict, so the check uses the all-reduced loss (before a DeepSpeed
                # backward on the last micro-batch steps the optimizer)
                loss_part = accelerator.reduce(loss_ex.detach().mean(), reduction="mean")
                if not torch.isfinite(loss_part):
                    all_sigma = accelerator.gather(sigma.detach())
                    raise NonFiniteLossError(
                        f"non-finite training loss ({float(loss_part)}) at step {step} (images seen {images_seen})"
                        f" of model {model}; σ of the batch: {[float(f'{s:.4g}') for s in all_sigma.tolist()]}")
                # EDM2's scale: Σ over dims and images / b; backward divides by `rounds`, DDP averages over ranks
                accelerator.backward(loss_ex.sum() * (dims / batch_gpu))
            x0_loss.append(x0_part.detach())
            loss_global += float(loss_part) / rounds
        x0_loss = torch.cat(x0_loss)
        if training["grad_clip"] and not use_ds:
            accelerator.clip_grad_norm_(model_p.parameters(), float(training["grad_clip"]) * dims)
        optimizer_p.step()
        optimizer_p.zero_grad(set_to_none=True)
        images_seen += batch

        beta = ema_beta(images_seen, batch, training)
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), raw_net.parameters()):
                p_ema.lerp_(p.detach().to(torch.float32).reshape(p_ema.shape), 1.0 - beta)
            for b_ema, b in zip(ema.buffers(), raw_net.buffers()):
                b_ema.copy_(b)

        tracker.update(accelerator.gather(sigma.detach()), accelerator.gather(x0_loss.float()))
        loss_sum, loss_n = loss_sum + loss_global, loss_n + 1
        if bar is not None:
            bar.update(batch)
            bar.set_postfix(loss=f"{loss_global:.4f}", refresh=False)
        if hasattr(schedule, "set_model_loss") and images_seen // sched_every != (images_seen - batch) // sched_every:
            schedule.set_model_loss(tracker)
        if images_seen // log_every != (images_seen - batch) // log_every or images_seen >= total:
            if is_main:
                elapsed = max(time.time() - t_start, 1e-9)
                record = {"images_seen": images_seen, "step": step + 1, "loss": loss_sum / max(loss_n, 1),
                          "lr": lr, "ema_beta": beta, "flops": flops_per_image * images_seen,
                          "images_per_s": (images_seen - img_start) / elapsed, "world_size": world,
                          **tracker.summary()}
                with open(out / "log.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
            loss_sum, loss_n = 0.0, 0
        is_mark = any(images_seen == m for m in marks)
        if is_mark:
            save_snapshot()
        stop = stop_after_images is not None and images_seen >= stop_after_images and images_seen < total
        periodic = state_every and images_seen // state_every != (images_seen - batch) // state_every
        if is_mark or stop or periodic:
            save_state()
        if stop:
            status = "stopped"
            break

    if bar is not None:
        bar.close()
    summary = {"model": model, "arch": arch_name, "images_seen": images_seen,
               "flops": flops_per_image * images_seen, "flops_per_image": flops_per_image, "params": n_params,
               "world_size": world, "snapshots": [f"snapshots/{s}" for s in written],
               "snapshot_marks": marks}
    if status == "done" and is_main:
        # done only over snapshots that match their checksums (IntegrityError otherwise: no done.json)
        sums = {f"snapshots/{s}": (integrity.verify(snap_dir / s, full=True)
                                   or integrity.stamp(snap_dir / s))["sha256"] for s in written}
        atomic_write_text(json.dumps({**summary, "snapshot_sha256": sums, "config_fingerprint": fingerprint},
                                     indent=1) + "\n", out / "done.json")
    accelerator.wait_for_everyone()
    return {**summary, "status": status}


def _truncate_log(path: Path, images_seen: int) -> None:
    """On resume, drop log lines written after the saved state (they will be written again)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line)["images_seen"] <= images_seen]
    atomic_write_text("".join(line + "\n" for line in keep), path)


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.train", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="study config YAML (workflow/config/*.yaml)")
    p.add_argument("--model", required=True, help="NAME in the config's models table")
    p.add_argument("--data", required=True, help="dataset: .npz from models.data (or any models.data spec)")
    p.add_argument("--out", required=True, help="run folder (resumes from OUT/state.pt if present)")
    p.add_argument("--jstar", default=None, help="optimal_loss/jstar.csv (needed by schedule optimal-loss)")
    p.add_argument("--stop-after-images", type=int, default=None,
                   help="debug: stop (state saved, no done.json) once this many images are seen")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    args = p.parse_args(argv)
    cfg = load_config(args.config)
    try:
        result = train(cfg, args.model, args.data, args.out, jstar=args.jstar,
                       stop_after_images=args.stop_after_images, progress=not args.no_progress)
    except (RunFolderMismatchError, integrity.IntegrityError) as e:  # one line naming the file, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: result[k] for k in ("status", "model", "images_seen", "flops", "world_size")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
