"""Saves that cost what they must: state.pt keeps its own schedule (training.state_every_images; the snapshot
marks only when that is unset), a file's sha256 is taken from its bytes as they are written (no re-read), and the
steps go on while a snapshot or state is written (only the copy to the host stalls them) — with the same files
and the same resumed run as before."""

import hashlib
import json
import threading

import pytest
import torch

from study import integrity
from study.config import load_config
from training import run_folder
from training.train import train

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def config(**training):
    tr = dict(total_images=256, batch_size=32, lr_rampup_images=64, lr_decay_images=128, ema_halflife_images=100,
              snapshots={"images": [64, 128, 192, 256]}, log_every_images=32)
    tr.update(training)
    return load_config({"study": "saves", "training": tr, "models": {"t0": {"arch": "t0"}}})


def test_checksum_is_taken_while_writing(tmp_path, monkeypatch):
    def no_rereading(path):
        raise AssertionError(f"{path} read again for its checksum")

    monkeypatch.setattr(integrity, "file_sha256", no_rereading)
    path = tmp_path / "state.pt"
    first = run_folder.atomic_torch_save({"w": torch.randn(300, 70), "n": 3}, path)
    second = run_folder.atomic_torch_save({"w": torch.randn(200, 5), "n": 4}, path)   # rewritten in place
    data = path.read_bytes()
    side = json.loads(integrity.sidecar(path).read_text())
    assert side == second and side["sha256"] == hashlib.sha256(data).hexdigest() and side["size"] == len(data)
    assert side["previous"] == {k: first[k] for k in ("size", "sha256", "sample_sha256")}
    monkeypatch.undo()
    assert integrity.load_torch(path)["n"] == 4        # verified against the sidecar, then read
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pt", "state.pt.sha256"]   # no temp file left


def recorded_state_saves(monkeypatch) -> list[int]:
    seen = []
    real = run_folder.write_state

    def recording(out, state, ds_dir):
        seen.append(state["images_seen"])
        real(out, state, ds_dir)

    monkeypatch.setattr(run_folder, "write_state", recording)
    return seen


def test_state_keeps_its_own_schedule(digits, tmp_path, monkeypatch):
    seen = recorded_state_saves(monkeypatch)
    train(config(state_every_images=96), "t0", digits, tmp_path / "a", progress=False)
    assert seen == [96, 192]                    # not also at the snapshot marks 64, 128, 256
    seen.clear()
    train(config(), "t0", digits, tmp_path / "b", progress=False)
    assert seen == [64, 128, 192, 256]          # unset: the snapshot marks are its schedule


class Killed(BaseException):
    pass


def test_a_run_killed_between_states_resumes_to_the_same_files(digits, tmp_path, monkeypatch):
    """Killed at 160 images (snapshots 64 and 128 written, state.pt of 96): the resumed run retrains from 96 and
    ends with the uninterrupted run's snapshots, bit for bit."""
    cfg = config(state_every_images=96)
    train(cfg, "t0", digits, tmp_path / "whole", progress=False)
    real_log = run_folder.append_log

    def kill_at_160(out, record):
        real_log(out, record)
        if record["images_seen"] == 160:
            raise Killed

    monkeypatch.setattr(run_folder, "append_log", kill_at_160)
    with pytest.raises(Killed):
        train(cfg, "t0", digits, tmp_path / "killed", progress=False)
    assert torch.load(tmp_path / "killed/state.pt", weights_only=True)["images_seen"] == 96
    monkeypatch.undo()
    result = train(cfg, "t0", digits, tmp_path / "killed", progress=False)
    assert result["status"] == "done"
    for mark in (64, 128, 192, 256):
        name = f"snapshots/snapshot-{mark:09d}.pt"
        a = torch.load(tmp_path / "whole" / name, weights_only=True)["ema"]
        b = integrity.load_torch(tmp_path / "killed" / name)["ema"]
        assert all(torch.equal(a[k], b[k]) for k in a), name
    done = json.loads((tmp_path / "killed/done.json").read_text())
    assert sorted(done["snapshot_sha256"]) == [f"snapshots/snapshot-{m:09d}.pt" for m in (64, 128, 192, 256)]


def test_steps_go_on_while_a_snapshot_is_written(digits, tmp_path, monkeypatch):
    """The snapshot at 64 images is held back until the loop has logged a later step (20 s at most): it is
    written while the steps go on, not before them."""
    logged_beyond = threading.Event()
    real_log, real_snapshot = run_folder.append_log, run_folder.write_snapshot
    waited = {}

    def logging(out, record):
        real_log(out, record)
        if record["images_seen"] > 64:
            logged_beyond.set()

    def slow_snapshot(out, images_seen, record):
        if images_seen == 64:
            waited["steps went on"] = logged_beyond.wait(timeout=20)
        real_snapshot(out, images_seen, record)

    monkeypatch.setattr(run_folder, "append_log", logging)
    monkeypatch.setattr(run_folder, "write_snapshot", slow_snapshot)
    train(config(state_every_images=128), "t0", digits, tmp_path / "run", progress=False)
    assert waited == {"steps went on": True}
    log = [json.loads(line) for line in (tmp_path / "run/log.jsonl").read_text().splitlines()]
    assert all(line["images_per_s_steps"] > 0 and line["images_per_s"] > 0 for line in log)
    assert integrity.verify(tmp_path / "run/snapshots/snapshot-000000064.pt", full=True) is not None
