"""A training run folder's state: the settings fingerprint, state.pt / done.json / snapshot I/O and the log.

Layout (docs/internals.md): state.pt (resumable; atomic, with its checksum sidecar), snapshots/snapshot-
{images:09d}.pt (EMA weights, arch, variant, images_seen, flops), log.jsonl, done.json (written last: its presence
means the run finished), state-ds/<images>/ (DeepSpeed's own checkpoint, whose files state.pt records),
.trainer.lock (held by the trainer writing the folder: training.lifeline).

Every file here is read with study.integrity.load_torch (tensors and plain data only), so state.pt holds nothing
else: the numpy RNG state is stored as a dict of a tensor and numbers. DeepSpeed reads its checkpoint with pickle,
so state.pt records the size and sha256 of each of its files and they are checked before DeepSpeed opens one.

    python -m training.run_folder same-settings OLD NEW   exit 0 when two resolved model configs train the same model
    python -m training.run_folder check-run RUN_DIR       exit 3 if a snapshot or the state fails its checksum,
                                                           exit 2 if its state.pt is refused (UnsafeFileError)
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import yaml

from study import integrity
from study.atomic import atomic_path
from study.spec import RESULT_NEUTRAL_KEYS

if TYPE_CHECKING:
    import torch

# torch is imported where a torch file is written or the RNGs are read: the train job's wrapper (training.run_job)
# checks the settings stamp with this module and then waits for the whole training without holding torch.

STATE_VERSION = 3  # 2: state.pt (and done.json) carry `config_fingerprint`; 3: plain RNG state, `ds_files`


class RunFolderMismatchError(ValueError):
    """The run folder's state.pt / done.json was made with other training settings than this run's."""


# ----------------------------------------------------------------------------------------------------------------
# the settings fingerprint
# ----------------------------------------------------------------------------------------------------------------

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
# files
# ----------------------------------------------------------------------------------------------------------------

def atomic_torch_save(obj, path: Path) -> dict:
    """The one way a run folder's torch files are written: torch.save via a temp file in the same folder, renamed
    into place with its checksum sidecar (study.integrity.replace_stamped: a kill at any moment leaves a `path`
    that matches its sidecar, never a half-written file); the sha256 is taken from the bytes as they are written
    (integrity.HashingWriter), not by reading a multi-GB file again.  Written through a file object, torch names
    the folder inside the zip 'archive', whatever the temp file is called.  Returns the sidecar's record."""
    import torch  # deferred: see the imports

    hashed: dict = {}

    def finish(tmp, final):
        hashed["record"] = integrity.replace_stamped(tmp, final, written=hashed.get("written"))

    with atomic_path(path, finish=finish) as tmp:
        with open(tmp, "wb") as f:
            writer = integrity.HashingWriter(f)
            torch.save(obj, writer)
        hashed["written"] = writer.written()
    return hashed["record"]


def atomic_write_text(text: str, path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def read_done(out: Path, fingerprint: dict) -> dict | None:
    """done.json of a finished run (checked against this run's fingerprint), or None."""
    path = out / "done.json"
    if not path.exists():
        return None
    try:
        done = json.loads(path.read_text())
        if not isinstance(done, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:  # written last from state.pt, so deleting it loses nothing
        raise integrity.IntegrityError(f"{path}: unreadable ({e}); delete it and rerun the training, which "
                                       "rewrites it from the complete state.pt") from None
    check_fingerprint(done.get("config_fingerprint"), fingerprint, path, out)
    return done


def load_state(out: Path, *, mmap: bool = False) -> dict | None:
    """state.pt read safely (study.integrity.load_torch: its checksum, then tensors and plain data only; numpy
    arrays too, for the RNG state of older files), or None when there is none."""
    path = out / "state.pt"
    if not path.exists():
        return None
    loaded = integrity.load_torch(path, mmap=mmap, numpy_arrays=True)
    if not isinstance(loaded, dict) or "images_seen" not in loaded:
        raise integrity.invalid(path, "not a training state (no images_seen)")
    return loaded


def check_deepspeed_files(out: Path, state: dict) -> None:
    """The DeepSpeed checkpoint state.pt names is exactly the files state.pt records, each matching its size and
    sha256 (DeepSpeed unpickles them, so nothing unrecorded is ever opened). IntegrityError naming the file."""
    ds_dir = state.get("ds_dir")
    if not ds_dir:
        return
    folder = out / ds_dir
    records = state.get("ds_files")
    if not isinstance(records, dict):
        raise integrity.IntegrityError(
            f"{folder}: DeepSpeed checkpoint without recorded checksums (written by an older trainer); DeepSpeed "
            f"unpickles it, so it is not read: delete {out} to train afresh")
    integrity.check_folder(folder, records)


def read_state(out: Path, fingerprint: dict, world: int) -> dict | None:
    """state.pt of an interrupted run (checked against this run's settings and process count, its DeepSpeed
    checkpoint against the checksums it records), or None."""
    path = out / "state.pt"
    loaded = load_state(out)
    if loaded is None:
        return None
    check_fingerprint(loaded.get("config_fingerprint"), fingerprint, path, out)
    if loaded.get("world_size") != world:
        raise ValueError(f"{path}: saved with {loaded.get('world_size')} processes, now {world}; "
                         "exact resumption needs the same number")
    check_deepspeed_files(out, loaded)
    return loaded


def state_problems(out: Path) -> list[str]:
    """Why a run folder's state.pt cannot be resumed from (checksum, unreadable file, its DeepSpeed checkpoint);
    empty when it can or there is none. A state.pt that is not tensors and plain data raises UnsafeFileError:
    that is no corruption to train over but a file to look at."""
    try:
        check_deepspeed_files(out, load_state(out, mmap=True) or {})
    except integrity.UnsafeFileError:
        raise
    except integrity.IntegrityError as e:
        return [str(e)]
    return []


def write_state(out: Path, state: dict, ds_dir: str | None) -> None:
    """state.pt, atomically, with its checksum sidecar (study.integrity.replace_stamped: a kill at any moment
    leaves a state.pt that matches it); with DeepSpeed (`ds_dir` its checkpoint) the checkpoint's files are
    recorded in state.pt and the older checkpoints are removed."""
    record = {"version": STATE_VERSION, **state, "ds_dir": ds_dir}
    if ds_dir is not None:
        record["ds_files"] = integrity.folder_records(out / ds_dir)
    atomic_torch_save(record, out / "state.pt")
    if ds_dir is not None:  # older DeepSpeed checkpoints are no longer referenced
        for old in (out / "state-ds").iterdir():
            if old.name != Path(ds_dir).name:
                shutil.rmtree(old, ignore_errors=True)


def snapshot_path(out: Path, images_seen: int) -> Path:
    return out / "snapshots" / f"snapshot-{images_seen:09d}.pt"


def write_snapshot(out: Path, images_seen: int, record: dict) -> None:
    """One snapshot file, atomically, with its checksum stamped as written (later readers detect corruption)."""
    atomic_torch_save(record, snapshot_path(out, images_seen))


def write_done(out: Path, summary: dict, written: list[str], fingerprint: dict) -> None:
    """done.json, only over snapshots that match their checksums (IntegrityError otherwise: no done.json)."""
    snap_dir = out / "snapshots"
    sums = {f"snapshots/{s}": (integrity.verify(snap_dir / s, full=True)
                               or integrity.stamp(snap_dir / s))["sha256"] for s in written}
    atomic_write_text(json.dumps({**summary, "snapshot_sha256": sums, "config_fingerprint": fingerprint},
                                 indent=1) + "\n", out / "done.json")


def append_log(out: Path, record: dict) -> None:
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_log(path: Path, images_seen: int) -> None:
    """On resume, drop log lines written after the saved state (they will be written again)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line)["images_seen"] <= images_seen]
    atomic_write_text("".join(line + "\n" for line in keep), path)


# ----------------------------------------------------------------------------------------------------------------
# random-number state (exact resumption)
# ----------------------------------------------------------------------------------------------------------------

def rng_state(generator: torch.Generator) -> dict:
    """Every RNG's state as tensors and plain data (state.pt is read with weights_only)."""
    import torch  # deferred: see the imports

    name, key, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"bit_generator": str(name), "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)},
             "python": random.getstate(), "noise": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _numpy_state(saved):
    """np.random.set_state's tuple from rng_state's dict (or the tuple itself, as older state files hold it)."""
    if not isinstance(saved, dict):
        return saved
    return (saved["bit_generator"], saved["key"].numpy().astype(np.uint32), saved["pos"], saved["has_gauss"],
            saved["gauss"])


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    import torch  # deferred: see the imports

    torch.set_rng_state(state["torch"])
    np.random.set_state(_numpy_state(state["numpy"]))
    random.setstate(state["python"])
    generator.set_state(state["noise"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------------------------
# the workflow's checks before a training job: the settings stamp, the files training continues from
# ----------------------------------------------------------------------------------------------------------------

def same_settings(old_config, new_config) -> bool:
    """Whether two resolved model configs (results/<study>/configs/<model>.yaml) train the same model: equal but
    for RESULT_NEUTRAL_KEYS of their training section."""
    def settings(path):
        cfg = yaml.safe_load(Path(path).read_text()) or {}
        training = {k: v for k, v in (cfg.get("training") or {}).items() if k not in RESULT_NEUTRAL_KEYS}
        return {**cfg, "training": training}

    return settings(old_config) == settings(new_config)


def bad_snapshots(rundir) -> list[str]:
    """The errors of a run folder's snapshots (snapshots/*.pt against their sidecars); empty when all are fine."""
    errors = []
    snaps = Path(rundir) / "snapshots"
    suffix = integrity.SUFFIX
    for side in sorted(snaps.glob(f"*.pt{suffix}")):  # a snapshot deleted but still recorded
        if not side.with_name(side.name[: -len(suffix)]).exists():
            errors.append(f"{side.with_name(side.name[: -len(suffix)])}: missing (its checksum is recorded)")
    for snap in sorted(snaps.glob("*.pt")):
        try:
            integrity.verify(snap, full=True)
        except integrity.IntegrityError as e:
            errors.append(str(e))
    return errors


def bad_run_files(rundir) -> list[str]:
    """The errors of a run folder that training cannot continue from: its snapshots (bad_snapshots) and its
    state.pt with the DeepSpeed checkpoint it records (state_problems). A state.pt that holds more than tensors and
    plain data raises UnsafeFileError instead: it is refused, not trained over."""
    errors = bad_snapshots(rundir)
    if (Path(rundir) / "state.pt").exists():
        errors += state_problems(Path(rundir))
    return errors


def check_run(rundir) -> int:
    """`check-run`: 0 when training can continue from the run folder; 3 (each error on stderr) when a snapshot,
    state.pt or a DeepSpeed checkpoint file fails its checksum; 2 (`error: …`) when state.pt is refused."""
    try:
        errors = bad_run_files(rundir)
    except integrity.IntegrityError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for e in errors:
        print(e, file=sys.stderr)
    return 3 if errors else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.run_folder", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    same = sub.add_parser("same-settings", help="exit 0 when the resolved model configs OLD and NEW train the same "
                                                "model (they may differ in batch_gpu and trackers), else 1")
    same.add_argument("old")
    same.add_argument("new")
    check = sub.add_parser("check-run", help="exit 3 (listing the errors) if a run folder's snapshot or state is "
                                             "bad, 2 if its state.pt is refused")
    check.add_argument("rundir")
    a = p.parse_args(argv)
    if a.command == "check-run":
        return check_run(a.rundir)
    return 0 if same_settings(a.old, a.new) else 1


if __name__ == "__main__":
    raise SystemExit(main())
