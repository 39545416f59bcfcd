"""Training entry point: the CLI and `train()`, which sets up a run and hands it to the step loop (training/loop.py).

    python -m training.train --config CONFIG.yaml --model NAME --data DATASET.npz --out RUN_DIR

One Accelerate loop for every launch mode (plain CPU, multi-GPU DDP, DeepSpeed ZeRO-2; see workflow/accelerate/),
EDM2-style: a thin CLI builds the settings and calls `train`, which counts progress in images seen.  `train` resolves
the model's spec once (study/spec.py), reads the data, checks the run folder, builds the net, optimiser and
schedule, resumes, and hands over to training/loop.py (what one step does); training/run_folder.py holds the run
folder's files and the check of its settings fingerprint.

Run folder (docs/internals.md): state.pt (resumable; atomic), snapshots/snapshot-{images:09d}.pt (EMA weights,
arch, variant, images_seen, flops counted with torch.utils.flop_counter), log.jsonl, done.json (written last).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs
from tqdm.auto import tqdm

from models import family
from models.denoiser import Denoiser
from models.diffusion import get_variant
from models.loss_weighting import OptimalLossSchedule
from models.weight_norm import forced_weights, normalize_forced_weights_
from study import integrity
from study.checks import deepspeed_precision_problems, torch_autocast_section
from study.config import load_config
from study.spec import ModelSpec, ema_settings, model_spec
from training import lifeline, run_folder
from training.dataset import Dataset, DatasetArrays, DatasetError, check_images, open_dataset
from training.loop import Run, learning_rate, run_steps
from training.power_ema import PowerEMA, profile_marks
from training.run_folder import RunFolderMismatchError
from training.sigma_bins import SigmaBinTracker

# ZeRO-2 communication tuning, applied unless a DeepSpeed config (e.g. a --deepspeed_config_file) sets the key.
# Accelerate's inline `deepspeed_config` (workflow/accelerate/deepspeed-zero2.yaml) cannot express these.
DS_ZERO_TUNING = {"allgather_partitions": True, "allgather_bucket_size": 200_000_000, "overlap_comm": True,
                  "reduce_scatter": True, "reduce_bucket_size": 200_000_000, "contiguous_gradients": True}


# ----------------------------------------------------------------------------------------------------------------
# the training set on the host, in its stored dtype
# ----------------------------------------------------------------------------------------------------------------

def open_training_data(data) -> DatasetArrays:
    """`data` as training.dataset.DatasetArrays (the project's one reader: the images in their stored dtype,
    memory-mapped where the file allows; `rows(idx, device)` converts only a step's batch rows, on the device):
    a training.dataset.Dataset (its tensor, not a copy) or any training.dataset spec (training.dataset.open_dataset)."""
    if isinstance(data, Dataset):
        return DatasetArrays.from_dataset(data)
    return open_dataset(data)


# ----------------------------------------------------------------------------------------------------------------
# pieces of the set-up
# ----------------------------------------------------------------------------------------------------------------

def promote_scalar_params(net: torch.nn.Module) -> None:
    """DeepSpeed broadcasts each parameter as `p.view(torch.uint8)`, which fails for 0-dim tensors (EDM2's scalar
    gains).  Give those a shape of [1] for the DeepSpeed run; every use of them broadcasts the same way.  The EMA
    copy keeps the original shapes, so snapshots are identical across launch modes."""
    for module in net.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and p.ndim == 0:
                module._parameters[name] = torch.nn.Parameter(p.detach().reshape(1), requires_grad=p.requires_grad)


def make_accelerator(trackers=(), out=None):
    """The Accelerator of a training process.  mixed_precision "no" whatever the launch config says: the engine
    (DDP or DeepSpeed) keeps fp32 weights, fp32 gradients and their accumulation, and training.mixed_precision
    only turns on autocast around the forward (training/loop.py), as EDM2 does.  DeepSpeed without GPUs: Accelerate
    finds no device backend and would count one process whatever the launcher started; naming gloo makes it set
    up DeepSpeed's process group over all of them.  `trackers` (training.trackers) log under the run folder `out`."""
    handlers = []
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if deepspeed and not torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    return Accelerator(mixed_precision="no", kwargs_handlers=handlers, log_with=list(trackers) or None,
                       project_dir=None if out is None else str(out))


def check_fp32_engine(ds_cfg: dict, mixed_precision: str = "no") -> None:
    """DeepSpeed must train as the DDP path does (study.checks.deepspeed_precision_problems, also checked when
    the DAG is built): an fp32 engine (its bf16/fp16 modes make the module weights, the averaged weights and the
    gradient accumulation half precision), the forward in the autocast training.mixed_precision names, gradients
    reduced in fp32.  ZeRO stage 3 partitions the parameters themselves, which the forced weight normalisation
    does not handle."""
    problems = deepspeed_precision_problems(ds_cfg, mixed_precision)
    if problems:
        raise ValueError("the DeepSpeed config " + "; ".join(problems))
    stage = int((ds_cfg.get("zero_optimization") or {}).get("stage", 0))
    if stage > 2:
        raise ValueError(f"DeepSpeed ZeRO stage {stage} is not supported (forced weight normalisation needs "
                         "whole parameters on every rank): use stage 1 or 2")


def trainer_backends() -> None:
    """The trainer's backend settings (the step benchmarks set the same): fp32 means fp32 outside bf16 autocast, as
    in EDM2's training loop — no TF32 in matmuls or cuDNN convolutions — and cuDNN autotunes each convolution
    shape once (EDM2's cudnn.benchmark)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = True


def make_schedule(variant, schedule_cfg: dict, jstar):
    """The object that draws σ and weights the loss: the variant (baseline) or models.loss_weighting's
    OptimalLossSchedule."""
    name = schedule_cfg.get("name", "baseline")
    if name == "baseline":
        return variant
    if name == "optimal-loss":
        if jstar is None:
            raise ValueError("training.schedule.name = optimal-loss needs the J* table: pass --jstar FILE "
                             "(results/<study>/optimal_loss/jstar.csv)")
        if not Path(jstar).is_file():
            raise FileNotFoundError(f"--jstar file not found: {jstar}")
        kwargs = {k: v for k, v in schedule_cfg.items() if k not in ("name", "kwargs", "update_every_images")}
        kwargs.update(schedule_cfg.get("kwargs") or {})
        return OptimalLossSchedule(variant, str(jstar), **kwargs)
    raise ValueError(f"training.schedule.name: unknown schedule {name!r} (baseline or optimal-loss)")


def start_trackers(accelerator, study: str, model: str, training: dict, arch: dict, variant: dict) -> None:
    """Accelerate's trackers (training.trackers) on the main process: project = the study, run = the model (W&B,
    MLflow); TensorBoard writes under the run folder (RUN_DIR/<study>/). The settings go in as flat scalars."""
    settings = {}

    def flatten(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                flatten(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            settings[prefix] = value if isinstance(value, (int, float, str, bool)) else str(value)

    flatten("training", {k: v for k, v in training.items() if k != "trackers"})
    flatten("arch", {"name": arch["name"], "resolution": arch["resolution"], "label_dim": arch["label_dim"]})
    flatten("variant", variant)
    accelerator.init_trackers(study or model, config={"model": model, **settings},
                              init_kwargs={"wandb": {"name": model}, "mlflow": {"run_name": model}})


# ----------------------------------------------------------------------------------------------------------------
# train(): set up, then run the loop
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunSpec:
    """What a training run is: the model's resolved spec (study.spec.ModelSpec) completed with what only the job
    knows — the data, the net's complete kwargs for the data's shape, the variant built — and so the settings
    fingerprint the run folder is checked against before anything is resumed or reported done."""
    model_spec: ModelSpec
    data: DatasetArrays
    labels: torch.Tensor | None  # the data's labels when the study is class-conditional
    arch_record: dict            # name, resolution, channels, label_dim, kwargs: what a snapshot rebuilds from
    variant: Any
    variant_record: dict
    fingerprint: dict

    @property
    def training(self) -> dict:
        return self.model_spec.training

    @property
    def arch_kwargs(self) -> dict:
        return self.arch_record["kwargs"]

    @property
    def label_dim(self) -> int:
        return self.arch_record["label_dim"]


def describe_run(cfg: dict, model: str, data) -> RunSpec:
    """Model NAME of study config `cfg` on `data`: its resolved spec, the data opened (it stays on the host in its
    stored dtype; each step copies only this rank's rows to the device), the architecture for its shape, the
    variant, the fingerprint."""
    resolved = model_spec(cfg, model)
    training = resolved.training
    data_src = check_images(open_training_data(data), at_least={"training.batch_size": training["batch_size"]})
    conditional = bool(cfg["dataset"].get("conditional"))
    if conditional and data_src.labels is None:
        raise ValueError(f"dataset.conditional is true but dataset {data_src.name!r} ({data}) has no labels")
    label_dim = data_src.num_classes if conditional else 0
    _, C, H, W = data_src.shape
    if H != W:
        raise ValueError(f"dataset {data_src.name!r}: images must be square, got {H}x{W}")
    arch_kw = family.arch_kwargs(resolved.arch, resolution=H, channels=C, label_dim=label_dim,
                                 logvar=bool(training["logvar"]), dropout=float(training["dropout"]))
    variant = get_variant(resolved.variant["name"], **(resolved.variant.get("kwargs") or {}))
    variant_record = {"name": variant.name, "kwargs": variant.kwargs()}
    arch_record = {"name": resolved.arch, "resolution": H, "channels": C, "label_dim": label_dim, "kwargs": arch_kw}
    return RunSpec(model_spec=resolved, data=data_src, labels=data_src.labels if conditional else None,
                   arch_record=arch_record, variant=variant, variant_record=variant_record,
                   fingerprint=resolved.fingerprint(arch_kw, variant_record, data_src.shape, label_dim))


def check_world(accelerator) -> None:
    """The launcher's process count is the one Accelerate sees (a CPU launch set up wrongly runs one process)."""
    world = accelerator.num_processes
    launched = int(os.environ.get("WORLD_SIZE", world))
    if launched != world:
        raise RuntimeError(f"the launcher started {launched} processes but Accelerate sees {world} "
                           f"({accelerator.distributed_type}, {accelerator.device}); on CPU launch DDP with "
                           "ACCELERATE_USE_CPU=1 and DeepSpeed without it (training.train.make_accelerator)")


def configure_deepspeed(ds_cfg: dict, training: dict, batch_gpu: int, rounds: int, image_dims: int) -> None:
    """DeepSpeed's batch, accumulation and clipping values (its "auto" ones: no DataLoader goes through prepare)
    and the ZeRO tuning the config leaves unset, in place; refuses a config that would not train as the DDP path
    does, and turns DeepSpeed's own autocast on under bf16 (its engine forward re-enters autocast by it)."""
    mixed_precision = str(training["mixed_precision"])
    check_fp32_engine(ds_cfg, mixed_precision)
    ds_cfg["torch_autocast"] = {**torch_autocast_section(mixed_precision), **(ds_cfg.get("torch_autocast") or {})}
    ds_cfg["train_micro_batch_size_per_gpu"] = batch_gpu
    ds_cfg["train_batch_size"] = int(training["batch_size"])
    ds_cfg["gradient_accumulation_steps"] = rounds
    ds_cfg["gradient_clipping"] = float(training["grad_clip"] or 0.0) * image_dims
    zero = ds_cfg.setdefault("zero_optimization", {})
    for key, value in DS_ZERO_TUNING.items():
        zero.setdefault(key, value)


def restore_state(loaded: dict, *, net, optimizer, ema, tracker, schedule, variant, use_ds: bool) -> None:
    """A resumed state.pt into the pieces that are not prepared yet (DeepSpeed restores its engine's own)."""
    if not use_ds:
        net.load_state_dict(loaded["net"])
        optimizer.load_state_dict(loaded["optimizer"])
    ema.load_state_dict(loaded["ema"])
    tracker.load_state_dict(loaded["tracker"])
    if hasattr(schedule, "load_state_dict") and loaded.get("schedule") is not None and schedule is not variant:
        schedule.load_state_dict(loaded["schedule"])


def prepare_engine(accelerator, net, optimizer, rounds: int, batch_gpu: int):
    """(prepared net, prepared optimizer): the engine must accumulate `rounds` micro-batches, as configured."""
    model_p, optimizer_p = accelerator.prepare(net, optimizer)
    if accelerator.gradient_accumulation_steps != rounds:  # prepare takes DeepSpeed's value: it must be ours
        raise RuntimeError(f"gradient accumulation is {accelerator.gradient_accumulation_steps} micro-batches, "
                           f"expected {rounds} (training.batch_gpu = {batch_gpu})")
    return model_p, optimizer_p


def unwrapped_fp32(accelerator, model_p):
    """The prepared net's module, whose weights must be fp32 as EDM2's (the EMA, Adam and gradient accumulation
    see them)."""
    raw_net = accelerator.unwrap_model(model_p)
    not_fp32 = sorted({str(p.dtype) for p in raw_net.parameters() if p.dtype != torch.float32})
    if not_fp32:
        raise RuntimeError(f"the prepared net holds {', '.join(not_fp32)} weights; training keeps them float32 "
                           "(training.mixed_precision only sets the forward's autocast)")
    return raw_net


def build_run(spec: RunSpec, accelerator, out: Path, *, jstar=None) -> Run:
    """The net, its EMA, the schedule and σ tracker, the optimiser and the noise stream, resumed from out/state.pt
    when it holds this run, prepared by Accelerate: everything training.loop.run_steps needs."""
    training, variant = spec.training, spec.variant
    world, device = accelerator.num_processes, accelerator.device
    use_ds = accelerator.distributed_type == DistributedType.DEEPSPEED
    batch_gpu, rounds = spec.model_spec.micro_batch(world)  # with the processes this run really has
    # accelerator.backward divides by this (DeepSpeed's engine does, with its own gradient_accumulation_steps)
    accelerator.gradient_accumulation_steps = rounds

    torch.manual_seed(int(training["seed"]))  # identical initial weights on every rank
    net = family.net_from_kwargs(spec.arch_kwargs, device="cpu").to(device).train()
    ema = copy.deepcopy(net).eval().requires_grad_(False).to(torch.float32)
    ema_kind, sigma_rels = ema_settings(training)
    power_ema = PowerEMA(ema, sigma_rels) if ema_kind == "power" else None  # `ema` becomes its first profile
    if use_ds:
        promote_scalar_params(net)  # after the EMA copy: snapshots keep the family's shapes
    n_params = sum(p.numel() for p in net.parameters())
    schedule = make_schedule(variant, training["schedule"], jstar)
    tracker = SigmaBinTracker(variant.sigma_min, variant.sigma_max, training["sigma_bins"],
                              training["sigma_bin_decay"])
    if hasattr(schedule, "set_model_loss"):
        schedule.set_model_loss(tracker)
    optimizer = torch.optim.Adam(net.parameters(), lr=learning_rate(int(training["batch_size"]), training),
                                 betas=(0.9, 0.99), eps=1e-8)
    # σ and ε: one stream for the global batch, the same on every rank (training/loop.py takes each rank's slice)
    noise_gen = torch.Generator(device=device).manual_seed(int(training["seed"]) * 1000 + 7919)

    loaded = run_folder.read_state(out, spec.fingerprint, world)
    if loaded is not None:
        restore_state(loaded, net=net, optimizer=optimizer, ema=ema, tracker=tracker, schedule=schedule,
                      variant=variant, use_ds=use_ds)
        if power_ema is not None:
            power_ema.load_state_dict(loaded["ema_power"], str(out / "state.pt"))
    if use_ds:
        image_dims = spec.arch_record["channels"] * spec.arch_record["resolution"] ** 2
        configure_deepspeed(accelerator.state.deepspeed_plugin.deepspeed_config, training, batch_gpu, rounds,
                            image_dims)
    model_p, optimizer_p = prepare_engine(accelerator, net, optimizer, rounds, batch_gpu)
    if loaded is not None and use_ds:
        accelerator.load_state(str(out / loaded["ds_dir"]))
    if loaded is not None:
        run_folder.set_rng_state(loaded["rng"][accelerator.process_index], noise_gen)
    raw_net = unwrapped_fp32(accelerator, model_p)
    forced = forced_weights(raw_net)
    if loaded is None:  # a resumed state holds weights normalised after their last step
        normalize_forced_weights_(forced)

    run = Run(spec=spec, accelerator=accelerator, model_p=model_p, optimizer=optimizer, optimizer_p=optimizer_p,
              raw_net=raw_net, ema=ema, denoiser=Denoiser(model_p, variant, label_dim=spec.label_dim),
              schedule=schedule, tracker=tracker, forced_weights=forced, noise_gen=noise_gen, out=out,
              batch_gpu=batch_gpu, rounds=rounds, use_ds=use_ds,
              # FLOPs of one training forward+backward per image (counted on the meta device; ×images seen)
              flops_per_image=float(family.training_flops_of(spec.arch_kwargs)), n_params=n_params,
              power_ema=power_ema,
              profile_marks=profile_marks(training, spec.model_spec.total) if power_ema is not None else [])
    if loaded is not None:
        run.images_seen, run.written = int(loaded["images_seen"]), list(loaded["snapshots"])
        # the interrupted log interval's running loss continues where it was
        run.loss_sum, run.loss_n = loaded.get("log_accumulator", (0.0, 0))
    return run


def train(cfg: dict, model: str, data, out, *, jstar=None, stop_after_images: int | None = None,
          progress: bool = True, accelerator=None) -> dict:
    """train_unlocked while holding the run folder's lock (training.lifeline: the global main process holds it; a
    second trainer of the same folder stops with RunFolderBusyError naming the folder and the holder)."""
    main_process = int(os.environ.get("RANK", "0")) == 0
    with lifeline.run_folder_lock(out) if main_process else contextlib.nullcontext():
        return train_unlocked(cfg, model, data, out, jstar=jstar, stop_after_images=stop_after_images,
                              progress=progress, accelerator=accelerator)


def train_unlocked(cfg: dict, model: str, data, out, *, jstar=None, stop_after_images: int | None = None,
                   progress: bool = True, accelerator=None) -> dict:
    """Train model NAME of study config `cfg` (a dict from load_config, or a path) on `data` (a .npz path, a
    training.dataset spec, or a training.dataset.Dataset) into run folder `out`; resumes from out/state.pt if present.

    Returns a summary dict {status: "done" | "stopped" | "already-done", images_seen, flops, snapshots, ...}.
    `stop_after_images` (debug) stops after that many images seen, with the state saved — as if killed."""
    if not isinstance(cfg, dict) or "training" not in cfg:
        cfg = load_config(cfg)
    out = Path(out)
    spec = describe_run(cfg, model, data)
    done = run_folder.read_done(out, spec.fingerprint)
    if done is not None:
        return {**done, "status": "already-done"}

    trainer_backends()
    trackers = list(spec.training.get("trackers") or [])  # Accelerate's trackers (log.jsonl is the record)
    accelerator = accelerator or make_accelerator(trackers, out)
    check_world(accelerator)
    run = build_run(spec, accelerator, out, jstar=jstar)
    is_main = accelerator.is_main_process
    if is_main:
        (out / "snapshots").mkdir(parents=True, exist_ok=True)
        run_folder.truncate_log(out / "log.jsonl", run.images_seen)
    if trackers:
        start_trackers(accelerator, cfg.get("study", ""), model, spec.training, spec.arch_record,
                       spec.variant_record)
    bar = None
    if progress and is_main:
        bar = tqdm(total=run.total, initial=run.images_seen, unit="img", unit_scale=True, desc=f"train {model}",
                   dynamic_ncols=True, file=sys.stderr)

    status = run_steps(run, stop_after_images=stop_after_images, bar=bar)
    if bar is not None:
        bar.close()
    summary = {"model": model, "arch": spec.arch_record["name"], "images_seen": run.images_seen,
               "flops": run.flops_per_image * run.images_seen, "flops_per_image": run.flops_per_image,
               "params": run.n_params, "world_size": accelerator.num_processes,
               "snapshots": [f"snapshots/{s}" for s in run.written], "snapshot_marks": run.marks}
    if status == "done" and is_main:
        run_folder.write_done(out, summary, run.written, spec.fingerprint)
    for tracker in accelerator.trackers:  # the main process's (flushes TensorBoard's event file)
        tracker.finish()
    accelerator.wait_for_everyone()
    return {**summary, "status": status}


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="study config YAML (workflow/config/*.yaml)")
    p.add_argument("--model", required=True, help="NAME in the config's models table")
    p.add_argument("--data", required=True, help="dataset: .npz from training.dataset (or any training.dataset spec)")
    p.add_argument("--out", required=True, help="run folder (resumes from OUT/state.pt if present)")
    p.add_argument("--jstar", default=None, help="optimal_loss/jstar.csv (needed by schedule optimal-loss)")
    p.add_argument("--stop-after-images", type=int, default=None,
                   help="debug: stop (state saved, no done.json) once this many images are seen")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    args = p.parse_args(argv)
    lifeline.bind_to_job()  # never outlive the workflow job (or the launcher) that started this process
    cfg = load_config(args.config)
    try:
        result = train(cfg, args.model, args.data, args.out, jstar=args.jstar,
                       stop_after_images=args.stop_after_images, progress=not args.no_progress)
    except (RunFolderMismatchError, integrity.IntegrityError, lifeline.RunFolderBusyError, DatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: result[k] for k in ("status", "model", "images_seen", "flops", "world_size")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
