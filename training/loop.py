"""The training step loop: what one step does, its schedules, and when it saves (the writes: training/saves.py).

What one step does (global batch B split evenly over the processes, b = B / processes each):
  x0, labels  ← the next B images of a seeded per-epoch permutation (a pure function of images seen, so resuming
                needs no data-loader state); this process takes its b of them
  σ ~ schedule.sample_sigma (the variant's noise distribution, or the optimal-loss schedule), ε ~ N(0, I), drawn
                for all B at once from one seeded stream, alike on every rank, which keeps its b: neither the
                number of processes nor the micro-batching below changes an image's draws
  then per micro-batch of training.batch_gpu images (EDM2's gradient accumulation; DDP syncs gradients on the last
  one only, DeepSpeed counts them as its gradient_accumulation_steps), under bf16 autocast where
  training.mixed_precision says so (weights, gradients and their accumulation stay fp32 under every engine):
  D, logvar   = Denoiser(net, variant)(x0 + σ·ε, σ, labels)        (D = c_skip·x + c_out·F(c_in·x, c_noise))
                with dropout masks a hash of (seed, each image's position in the stream, layer, element)
  x0-loss_i   = mean_dims (D_i − x0_i)²            → the per-σ-bin tracker (all ranks' samples, gathered)
  loss_i      = schedule.loss_weight(σ_i)·x0-loss_i, and with the learned log-variance (training.logvar, EDM2's
                uncertainty) loss_i / exp(logvar_i) + logvar_i — per dimension: what log.jsonl reports
  backward of dims·Σ_i loss_i / B over the global batch: EDM2's gradient scale (its loss.sum() over pixels and
                images divided by the batch), not the per-dimension mean's, which is dims× smaller and lets
                Adam's eps damp the update at paper resolution
  Adam(β 0.9/0.99, eps 1e-8) with lr(t) = lr·min(t/rampup, 1)/sqrt(max(t/t_ref, 1)) (EDM2), gradient clipping
  (a norm of the per-dimension loss's gradient: grad_clip·dims on this scale), then the EMA of the weights
  (half-life in images, EDM-style ramp; see `ema_beta`), then EDM2's forced weight normalisation of the weights
  the optimizer owns (models/weight_norm.py; also once before the first step).

EMA choice (training.ema): by default EDM's (2022) classic exponential EMA with a half-life in images and its
ramp-up (half-life ≤ ema_rampup_ratio·images seen): one buffer.  `kind: power` keeps EDM2's power-function EMA
profiles instead (training/power_ema.py: one buffer per σ_rel, stored with every snapshot and, every
profile_every_images, in profile files), from which any other EMA length is reconstructed after training.

training/train.py builds a `Run` (net, optimiser, data, schedule, resumed state) and calls `run_steps`.
"""

from __future__ import annotations

import contextlib
import math
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from models.dropout import dropout_stream
from models.weight_norm import normalize_forced_weights_
from training import run_folder
from training.saves import BackgroundSaves, save_profiles, save_snapshot, save_state


class NonFiniteLossError(FloatingPointError):
    """Training loss became NaN/inf; the message names the step and the σ values of the batch."""


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


def forward_precision(training: dict, device: torch.device):
    """The forward's autocast: bf16 under training.mixed_precision = bf16 (weights, gradients and the optimizer
    stay fp32 under every engine), none otherwise."""
    if training["mixed_precision"] == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------------------------
# one step's loss
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


# ----------------------------------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class Run:
    """What the step loop reads and updates, built by training.train.build_run: the run's spec (what is trained, on
    which data, and the settings fingerprint), the engine's pieces, and the live state."""
    spec: Any                    # training.train.RunSpec: the model's study.spec.ModelSpec, data, records, fingerprint
    accelerator: Any
    model_p: Any                 # the prepared (DDP / DeepSpeed) net
    optimizer: torch.optim.Optimizer
    optimizer_p: Any             # the prepared optimizer
    raw_net: torch.nn.Module     # the unwrapped net (its weights feed the EMA)
    ema: torch.nn.Module
    denoiser: Any                # Denoiser(model_p, variant)
    schedule: Any                # draws σ and weights the loss (the variant, or the optimal-loss schedule)
    tracker: Any                 # training.sigma_bins.SigmaBinTracker
    forced_weights: list         # the MPConv weights the forced weight normalisation keeps at unit norm
    noise_gen: torch.Generator
    out: Path
    batch_gpu: int               # micro-batching with the processes this run has
    rounds: int
    use_ds: bool
    flops_per_image: float
    n_params: int
    images_seen: int = 0
    written: list = field(default_factory=list)
    loss_sum: float = 0.0        # the open log interval's running loss
    loss_n: int = 0
    saves: Any = None            # BackgroundSaves while run_steps runs
    power_ema: Any = None        # training.power_ema.PowerEMA under training.ema.kind = power (then `ema` is its first)
    profile_marks: list = field(default_factory=list)  # images seen at which a profile-only file is written

    # what the spec says, under the names the loop reads
    @property
    def model(self) -> str:
        return self.spec.model_spec.name

    @property
    def training(self) -> dict:
        return self.spec.model_spec.training

    @property
    def marks(self) -> list:
        return list(self.spec.model_spec.marks)

    @property
    def total(self) -> int:
        return self.spec.model_spec.total

    @property
    def data(self):
        """training.dataset.DatasetArrays"""
        return self.spec.data

    @property
    def labels(self) -> torch.Tensor | None:
        """all labels (conditional runs) or None"""
        return self.spec.labels

    @property
    def variant(self):
        """models.diffusion.Variant"""
        return self.spec.variant

    @property
    def fingerprint(self) -> dict:
        return self.spec.fingerprint

    @property
    def arch_record(self) -> dict:
        """{name, resolution, channels, label_dim, kwargs}: rebuilds the net"""
        return self.spec.arch_record

    @property
    def variant_record(self) -> dict:
        """{name, kwargs}: rebuilds the variant"""
        return self.spec.variant_record


def gradient_norm(run: Run) -> float:
    """2-norm of the gradient the optimizer is about to apply (DeepSpeed: of the last step, its own count)."""
    if run.use_ds:
        return float(run.model_p.get_global_grad_norm() or float("nan"))
    norms = [p.grad.detach().float().norm() for p in run.model_p.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def peak_memory_gib(device: torch.device) -> float:
    """The device's peak allocated memory (CUDA), or the process's peak resident set (CPU), in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux: kilobytes


def tracker_values(record: dict) -> dict:
    """What a log.jsonl line shows Accelerate's trackers: its numbers, the per-σ-bin loss one scalar per bin."""
    values = {k: record[k] for k in ("loss", "lr", "images_per_s", "images_per_s_steps", "grad_norm",
                                     "max_memory_gib", "ema_beta")
              if record.get(k) is not None}
    for center, loss in zip(record["sigma_bin_centers"], record["sigma_bin_x0_loss"]):
        if loss is not None:
            values[f"sigma_bin_x0_loss/sigma={center:.3g}"] = loss
    return values


@dataclass
class Batch:
    """This process's share of one global batch: images, labels, σ, ε and their positions in the image stream."""
    x0: torch.Tensor
    labels: torch.Tensor | None
    sigma: torch.Tensor
    noise: torch.Tensor
    positions: torch.Tensor  # dropout masks are a function of them (models/dropout.py)


def draw_batch(run: Run) -> Batch:
    """The global batch of the next step, drawn alike on every rank; this rank keeps its slice."""
    acc, batch = run.accelerator, int(run.training["batch_size"])
    rank, device = acc.process_index, acc.device
    local = batch // acc.num_processes
    mine = slice(rank * local, (rank + 1) * local)
    idx = batch_indices(run.images_seen, batch, run.data.shape[0], int(run.training["seed"]))[mine]
    x0 = run.data.rows(idx, device)
    labels = run.labels[idx].to(device) if run.labels is not None else None
    # σ and ε of the whole global batch, drawn alike on every rank from one stream; each rank keeps its slice,
    # so an image's draws depend on its place in the stream, not on the number of processes
    sigma = run.schedule.sample_sigma(batch, generator=run.noise_gen, device=device).to(torch.float32)[mine]
    noise = torch.randn((batch,) + tuple(x0.shape[1:]), generator=run.noise_gen, device=device)[mine]
    positions = torch.arange(local, device=device) + (run.images_seen + rank * local)
    return Batch(x0=x0, labels=labels, sigma=sigma, noise=noise, positions=positions)


def accumulate_gradients(run: Run, b: Batch, step: int) -> tuple[torch.Tensor, float]:
    """Forward and backward of the batch in `run.rounds` micro-batches: (per-image x0-losses of this rank, the
    batch's loss averaged over every rank). Raises NonFiniteLossError on every rank when the loss is not finite."""
    acc, training = run.accelerator, run.training
    dims = math.prod(run.data.shape[1:])
    x0_loss, loss_global = [], 0.0
    for r in range(run.rounds):
        part = slice(r * run.batch_gpu, (r + 1) * run.batch_gpu)
        last = r == run.rounds - 1
        acc.sync_gradients = last  # DeepSpeed: its accumulation boundary (and optimizer step)
        with contextlib.nullcontext() if last else acc.no_sync(run.model_p):  # DDP: all-reduce once
            with forward_precision(training, acc.device), \
                    dropout_stream(run.raw_net, int(training["seed"]), b.positions[part]):
                loss_ex, x0_part = per_example_losses(run.denoiser, run.schedule, b.x0[part], b.sigma[part],
                                                      b.noise[part], None if b.labels is None else b.labels[part])
            # every rank needs the same verdict, so the check uses the all-reduced loss (before a DeepSpeed
            # backward on the last micro-batch steps the optimizer)
            loss_part = acc.reduce(loss_ex.detach().mean(), reduction="mean")
            if not torch.isfinite(loss_part):
                all_sigma = acc.gather(b.sigma.detach())
                raise NonFiniteLossError(
                    f"non-finite training loss ({float(loss_part)}) at step {step} (images seen "
                    f"{run.images_seen}) of model {run.model}; σ of the batch: "
                    f"{[float(f'{s:.4g}') for s in all_sigma.tolist()]}")
            # EDM2's scale: Σ over dims and images / b; backward divides by `rounds`, DDP averages over ranks
            acc.backward(loss_ex.sum() * (dims / run.batch_gpu))
        x0_loss.append(x0_part.detach())
        loss_global += float(loss_part) / run.rounds
    return torch.cat(x0_loss), loss_global


def optimizer_step(run: Run, logs: bool):
    """Clip (training.grad_clip), step and clear the gradients; the gradient norm where it is clipped or logged,
    else None."""
    acc, training = run.accelerator, run.training
    dims = math.prod(run.data.shape[1:])
    grad_norm = None
    if training["grad_clip"] and not run.use_ds:
        grad_norm = acc.clip_grad_norm_(run.model_p.parameters(), float(training["grad_clip"]) * dims)
    elif logs and not run.use_ds:
        grad_norm = gradient_norm(run)
    run.optimizer_p.step()
    if logs and run.use_ds:
        grad_norm = gradient_norm(run)
    run.optimizer_p.zero_grad(set_to_none=True)
    return grad_norm


def update_ema(run: Run) -> float:
    """The EMA averages the weights Adam just wrote (fp32: the master weights, or their exact copy under ZeRO),
    before the forced weight normalisation renormalises them, as EDM2's does; returns its β (the first power
    profile's under training.ema.kind = power)."""
    if run.power_ema is not None:
        return run.power_ema.update(run.raw_net)[0]
    beta = ema_beta(run.images_seen, int(run.training["batch_size"]), run.training)
    with torch.no_grad():
        for p_ema, p in zip(run.ema.parameters(), run.raw_net.parameters()):
            p_ema.lerp_(p.detach().to(torch.float32).reshape(p_ema.shape), 1.0 - beta)
        for b_ema, b in zip(run.ema.buffers(), run.raw_net.buffers()):
            b_ema.copy_(b)
    return beta


def log_record(run: Run, *, step: int, lr: float, beta: float, grad_norm, images_per_s: float,
               steps_images_per_s: float | None = None) -> dict:
    """One log.jsonl line: the running loss since the last one, the schedule, throughput (`images_per_s` since
    the run (re)started; `images_per_s_steps` of this interval's steps, the time its saves stalled left out) and
    the σ tracker."""
    acc = run.accelerator
    dims = math.prod(run.data.shape[1:])
    return {
        "images_seen": run.images_seen, "step": step + 1, "loss": run.loss_sum / max(run.loss_n, 1),
        "lr": lr, "ema_beta": beta, "flops": run.flops_per_image * run.images_seen,
        "images_per_s": images_per_s, "images_per_s_steps": steps_images_per_s, "world_size": acc.num_processes,
        # of the per-dimension loss (grad_clip's scale), as EDM2's gradient scale multiplies it by dims
        "grad_norm": float(grad_norm) / dims, "max_memory_gib": peak_memory_gib(acc.device),
        **run.tracker.summary()}


def run_steps(run: Run, *, stop_after_images: int | None = None, bar=None) -> str:
    """Train until total_images ("done") or stop_after_images ("stopped", state saved as if killed).  Snapshots
    and state.pt are written on a background thread (BackgroundSaves); every write is finished on return."""
    run.saves = BackgroundSaves()
    try:
        return step_loop(run, stop_after_images=stop_after_images, bar=bar)
    finally:
        saves, run.saves = run.saves, None
        saves.close()


def state_due(run: Run, is_mark: bool, crossed) -> bool:
    """state.pt keeps its own schedule, training.state_every_images (the snapshot marks when that is unset)."""
    state_every = int(run.training.get("state_every_images") or 0)
    return crossed(state_every) if state_every else is_mark


def step_loop(run: Run, *, stop_after_images: int | None, bar) -> str:
    acc, training, schedule = run.accelerator, run.training, run.schedule
    batch = int(training["batch_size"])
    log_every = int(training["log_every_images"])
    sched_every = int(training["schedule"].get("update_every_images") or log_every)
    t_start, img_start = time.time(), run.images_seen
    t_interval, img_interval, saving = t_start, run.images_seen, 0.0  # the open log interval, its saves' time

    def crossed(every):  # did the last step pass a multiple of `every` images?
        return run.images_seen // every != (run.images_seen - batch) // every

    while run.images_seen < run.total:
        step = run.images_seen // batch
        b = draw_batch(run)
        lr = learning_rate(run.images_seen + batch, training)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        x0_loss, loss_global = accumulate_gradients(run, b, step)
        after = run.images_seen + batch
        logs = after // log_every != run.images_seen // log_every or after >= run.total  # this step is logged
        grad_norm = optimizer_step(run, logs)
        run.images_seen += batch
        beta = update_ema(run)
        normalize_forced_weights_(run.forced_weights)  # after the EMA, on the weights the optimizer owns

        run.tracker.update(acc.gather(b.sigma.detach()), acc.gather(x0_loss.float()))
        run.loss_sum, run.loss_n = run.loss_sum + loss_global, run.loss_n + 1
        if bar is not None:
            bar.update(batch)
            bar.set_postfix(loss=f"{loss_global:.4f}", refresh=False)
        if hasattr(schedule, "set_model_loss") and crossed(sched_every):
            schedule.set_model_loss(run.tracker)
        if logs:
            if acc.is_main_process:
                now = time.time()
                speed = (run.images_seen - img_start) / max(now - t_start, 1e-9)
                # the interval's images over its time less what its saves stalled: the steps' own rate
                steps_speed = (run.images_seen - img_interval) / max(now - t_interval - saving, 1e-9)
                record = log_record(run, step=step, lr=lr, beta=beta, grad_norm=grad_norm, images_per_s=speed,
                                    steps_images_per_s=steps_speed)
                run_folder.append_log(run.out, record)
                if acc.trackers:
                    acc.log(tracker_values(record), step=run.images_seen)
            run.loss_sum, run.loss_n = 0.0, 0
            t_interval, img_interval, saving = time.time(), run.images_seen, 0.0
        t_save = time.time()
        is_mark = any(run.images_seen == m for m in run.marks)
        if is_mark:
            save_snapshot(run)
        elif run.power_ema is not None and run.images_seen in run.profile_marks:
            save_profiles(run)
        stop = stop_after_images is not None and stop_after_images <= run.images_seen < run.total
        if stop or state_due(run, is_mark, crossed):
            save_state(run)
        saving += time.time() - t_save
        if stop:
            return "stopped"
    return "done"
