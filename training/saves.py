"""The run folder's writes during training: state.pt, snapshots and power-EMA profile files, each copied to the host
while the steps wait and written on one background thread while the next steps run (the step loop, training/loop.py,
calls these at its marks; training/run_folder.py owns the files' formats and atomic writes)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from accelerate.utils import gather_object

from training import run_folder
from training.power_ema import profile_path

# `run` below is training.loop.Run (not imported: the loop imports this module)


class BackgroundSaves:
    """The run folder's writes on one worker thread, in order: a save stalls the steps only while its tensors are
    copied to the host (`host_copy`); the bytes go to disk, hashed on the way (run_folder.atomic_torch_save),
    while the next steps run.  `wait()` finishes every pending write and re-raises one that failed."""

    def __init__(self):
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="run-folder-save")
        self.pending: list = []

    def submit(self, write, *args) -> None:
        self.pending.append(self.pool.submit(write, *args))

    def wait(self) -> None:
        pending, self.pending = self.pending, []
        for future in pending:
            future.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.pool.shutdown(wait=True)


def host_copy(obj, memo: dict | None = None):
    """`obj` with every tensor (and numpy array) copied to the host: what a background write may read while the
    next steps update the weights, moments and EMA in place.  Tensors that are views of one storage (the snapshot's
    `ema` and the first power-EMA profile) stay one tensor, so the file still stores them once."""
    memo = {} if memo is None else memo
    if isinstance(obj, torch.Tensor):
        key = (obj.untyped_storage().data_ptr(), obj.storage_offset(), tuple(obj.shape), obj.stride(), obj.dtype)
        if key not in memo:
            memo[key] = obj.detach().to("cpu", copy=True)
        return memo[key]
    if isinstance(obj, np.ndarray):
        return obj.copy()
    if isinstance(obj, dict):
        return type(obj)((k, host_copy(v, memo)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(host_copy(v, memo) for v in obj)
    return obj


def write_in_background(run, write, *args) -> None:
    """write(*args) on the run's save thread (run_steps sets one up), or here and now without one."""
    if run.saves is None:
        write(*args)
    else:
        run.saves.submit(write, *args)


def save_state(run) -> None:
    """state.pt (every rank takes part: the RNG states are gathered, DeepSpeed's checkpoint is collective)."""
    acc = run.accelerator
    rngs = gather_object([run_folder.rng_state(run.noise_gen)])
    ds_dir = None
    if run.use_ds:  # ZeRO partitions optimizer state over ranks: DeepSpeed's own (collective) checkpoint
        if run.saves is not None:
            run.saves.wait()  # the last state.pt is written (it removes the checkpoints older than its own)
        ds_dir = f"state-ds/{run.images_seen:09d}"
        acc.save_state(str(run.out / ds_dir))
        acc.wait_for_everyone()  # every rank's files are written before state.pt records their checksums
    if acc.is_main_process:
        schedule = run.schedule
        own_schedule = schedule is not run.variant and hasattr(schedule, "state_dict")
        state = {"images_seen": run.images_seen, "snapshots": list(run.written), "world_size": acc.num_processes,
                 "ema": run.ema.state_dict(), "tracker": run.tracker.state_dict(), "rng": rngs,
                 "flops_per_image": run.flops_per_image, "model": run.model,
                 "log_accumulator": (run.loss_sum, run.loss_n), "config_fingerprint": run.fingerprint,
                 "schedule": schedule.state_dict() if own_schedule else None}
        if run.power_ema is not None:
            state["ema_power"] = run.power_ema.state_dict()
        if not run.use_ds:
            state["net"] = run.raw_net.state_dict()
            state["optimizer"] = run.optimizer.state_dict()
        write_in_background(run, run_folder.write_state, run.out, host_copy(state), ds_dir)
    acc.wait_for_everyone()


def save_snapshot(run) -> None:
    if run.accelerator.is_main_process:
        record = {
            "ema": run.ema.state_dict(), "arch": run.arch_record, "variant": run.variant_record,
            "images_seen": run.images_seen, "flops": run.flops_per_image * run.images_seen, "params": run.n_params,
            "model": run.model, "training": run.training, "world_size": run.accelerator.num_processes}
        if run.power_ema is not None:  # its first profile's tensors are `ema`'s: stored once
            record["ema_power"] = run.power_ema.record(int(run.training["batch_size"]))
        write_in_background(run, run_folder.write_snapshot, run.out, run.images_seen, host_copy(record))
    run.written.append(run_folder.snapshot_path(run.out, run.images_seen).name)


def save_profiles(run) -> None:
    """A profile-only file (ema_profiles/profile-<images>.pt): the power-EMA profiles, densely in time for the
    post-hoc reconstruction, without the rest of a snapshot."""
    if run.accelerator.is_main_process:
        path = profile_path(run.out, run.images_seen)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_in_background(run, run_folder.atomic_torch_save, host_copy({
            "ema_power": run.power_ema.record(int(run.training["batch_size"])),
            "images_seen": run.images_seen, "model": run.model}), path)
