"""The train rule's one command (training/run_job.py) with a stand-in trainer: the run folder cleared when its
settings changed or a file fails its checksum, kept when only batch_gpu changed, left alone while a trainer holds
it; the trainer's command line, environment and exit status; the snapshots published read-only with their
sidecars. The real trainer under it: the smoke study (tests/test_damaged_study.py) and tests/test_workflow.py."""

import os
import shlex
import stat
import subprocess
import sys

import pytest
import yaml

from study import integrity
from training import lifeline, run_job

# writes the snapshot the job publishes (stamped, as the trainer does) and what it was started with
FAKE_TRAINER = """
import json, os, sys
from pathlib import Path
from study import integrity
argv = sys.argv[1:]
out = Path(argv[argv.index("--out") + 1])
(out / "snapshots").mkdir(parents=True, exist_ok=True)
snap = out / "snapshots" / "snapshot-000000064.pt"
snap.write_bytes(b"weights" * 100)
integrity.stamp(snap)
if os.environ.get("FAKE_TRAINER_DAMAGE"):
    snap.write_bytes(b"garbled")
(out / "started.json").write_text(json.dumps({"argv": argv, "omp": os.environ.get("OMP_NUM_THREADS"),
                                              "mkl": os.environ.get("MKL_NUM_THREADS")}))
print("trained", flush=True)
"""
REBUILD = "snakemake --configfile s.yaml --forcerun train_t0"


@pytest.fixture
def job(tmp_path):
    """(the job's arguments, the run folder, the log) for model t0 with the stand-in trainer."""
    trainer = tmp_path / "fake_trainer.py"
    trainer.write_text(FAKE_TRAINER)
    config = tmp_path / "configs" / "t0.yaml"
    config.parent.mkdir()
    write_config(config, batch_gpu=32, lr=0.01)
    run, log = tmp_path / "runs" / "t0", tmp_path / "logs" / "train_t0.log"
    log.parent.mkdir()
    args = ["--model", "t0", "--run-dir", str(run), "--config", str(config), "--data", str(tmp_path / "d.npz"),
            "--jstar", str(tmp_path / "jstar.csv"), "--threads", "3",
            "--launch", f"{shlex.quote(sys.executable)} {shlex.quote(str(trainer))}", "--log", str(log),
            "--publish", str(tmp_path / "snapshots" / "t0" / "snapshot-000000064.pt"), "--rebuild", REBUILD]
    return args, run, log


def write_config(path, **training):
    path.write_text(yaml.safe_dump({"study": "s", "training": training, "models": {"t0": {"arch": "t0"}}}))


def with_arg(args, flag, value):
    at = args.index(flag)
    return [*args[: at + 1], value, *args[at + 2:]]


def run(args, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(sys.path))  # the stand-in trainer imports study.integrity
    return run_job.main(args)


def test_a_fresh_job_trains_then_publishes(job, tmp_path, monkeypatch):
    args, run_dir, log = job
    assert run(args, monkeypatch) == 0
    started = yaml.safe_load((run_dir / "started.json").read_text())
    assert started["argv"] == ["--config", args[5], "--model", "t0", "--data", args[7], "--out", str(run_dir),
                               "--jstar", args[9], "--no-progress"]
    assert started["omp"] == started["mkl"] == "3"
    assert (run_dir / ".study-config.yaml").read_text() == (tmp_path / "configs" / "t0.yaml").read_text()
    assert "trained" in log.read_text()
    published = tmp_path / "snapshots" / "t0" / "snapshot-000000064.pt"
    assert published.read_bytes() == (run_dir / "snapshots" / published.name).read_bytes()
    assert not published.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
    assert integrity.verify(published)["rebuild"] == REBUILD


def test_changed_settings_start_afresh_but_batch_gpu_does_not(job, tmp_path, monkeypatch):
    args, run_dir, log = job
    assert run(args, monkeypatch) == 0
    (run_dir / "kept").write_text("")
    write_config(tmp_path / "configs" / "t0.yaml", batch_gpu=16, lr=0.01)  # micro-batching only
    assert run(args, monkeypatch) == 0 and (run_dir / "kept").exists()
    assert "starting afresh" not in log.read_text()
    write_config(tmp_path / "configs" / "t0.yaml", batch_gpu=16, lr=0.02)
    assert run(args, monkeypatch) == 0 and not (run_dir / "kept").exists()
    assert f"train t0: settings changed since {run_dir} was started: starting afresh" in log.read_text()


def test_a_file_failing_its_checksum_starts_afresh(job, monkeypatch):
    args, run_dir, log = job
    assert run(args, monkeypatch) == 0
    (run_dir / "kept").write_text("")
    snap = run_dir / "snapshots" / "snapshot-000000064.pt"
    snap.write_bytes(snap.read_bytes()[:-10])
    assert run(args, monkeypatch) == 0 and not (run_dir / "kept").exists()
    text = log.read_text()
    assert f"{snap}: " in text and f"train t0: a file in {run_dir} fails its checksum: starting afresh" in text


def test_a_refused_state_stops_the_job(job, payload, tmp_path, monkeypatch):
    import torch

    args, run_dir, log = job
    assert run(args, monkeypatch) == 0
    marker = tmp_path / "payload-ran"
    torch.save({"images_seen": 64, "rng": payload(marker)}, run_dir / "state.pt")
    assert run(args, monkeypatch) == 2
    assert f"error: {run_dir / 'state.pt'}: refused" in log.read_text()
    assert (run_dir / "state.pt").exists() and not marker.exists()


def test_a_busy_run_folder_is_left_alone(job, tmp_path, monkeypatch):
    args, run_dir, log = job
    assert run(args, monkeypatch) == 0
    write_config(tmp_path / "configs" / "t0.yaml", batch_gpu=32, lr=0.5)  # would clear it
    with lifeline.run_folder_lock(run_dir):
        assert run(args, monkeypatch) == 2
    assert "another trainer is writing this run folder" in log.read_text()
    assert (run_dir / "started.json").exists()


def test_a_multi_node_job_needs_srun(job, monkeypatch):
    args, run_dir, log = job
    monkeypatch.setattr(run_job.shutil, "which", lambda name: None)
    assert run([*args, "--machines", "2"], monkeypatch) == 1
    assert ("train t0: training.launch.num_machines = 2 runs under SLURM (srun not found): use --profile "
            "workflow/profiles/slurm") in log.read_text()
    assert not run_dir.exists()


@pytest.mark.parametrize("launch,rc", [("sh -c 'exit 7' sh", 7), ("sh -c 'kill -9 $$' sh", 137)])
def test_a_failed_trainer_is_the_job_status_and_publishes_nothing(job, tmp_path, monkeypatch, launch, rc):
    args, _, _ = job
    assert run(with_arg(args, "--launch", launch), monkeypatch) == rc
    assert not (tmp_path / "snapshots").exists()


def test_a_snapshot_failing_its_checksum_is_not_published(job, tmp_path, monkeypatch):
    args, run_dir, log = job
    monkeypatch.setenv("FAKE_TRAINER_DAMAGE", "1")
    assert run(args, monkeypatch) == 2
    assert f"error: {run_dir / 'snapshots' / 'snapshot-000000064.pt'}: " in log.read_text()
    assert not (tmp_path / "snapshots" / "t0" / "snapshot-000000064.pt").exists()


def test_the_job_holds_no_torch():
    """The job waits for the whole training: it never imports torch (the run folder's check is a process of its
    own)."""
    code = "import sys, training.run_job; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
                          check=False).returncode == 0
