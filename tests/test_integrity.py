"""Checksums of snapshots and datasets (models/integrity.py) and the readers that verify them: a truncated or
corrupted file gives one error naming the file and the command that rebuilds it."""

import json
import os
import stat

import numpy as np
import pytest
import torch

from models import integrity
from models.integrity import IntegrityError


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


def test_check_run_cli(tmp_path):
    snaps = tmp_path / "run" / "snapshots"
    snaps.mkdir(parents=True)
    a, b = _file(snaps, name="snapshot-000000064.pt"), _file(snaps, name="snapshot-000000128.pt")
    integrity.stamp(a), integrity.stamp(b)
    assert integrity.main(["check-run", str(tmp_path / "run")]) == 0
    b.write_bytes(b.read_bytes()[:10])
    assert integrity.main(["check-run", str(tmp_path / "run")]) == 3
    assert integrity.bad_snapshots(tmp_path / "run") and str(b) in integrity.bad_snapshots(tmp_path / "run")[0]


# --------------------------------------------------------------------------------------------------------------
# the readers
# --------------------------------------------------------------------------------------------------------------

def _dataset(tmp_path):
    from models.data import load_dataset, save_npz

    path = save_npz(load_dataset("digits"), tmp_path / "dataset.npz")
    integrity.stamp(path, rebuild="snakemake --forcerun dataset")
    return path


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    os.chmod(path, 0o644)
    path.write_bytes(data[: int(len(data) * keep)])


def test_truncated_dataset_fails_in_every_reader(tmp_path):
    from analysis.evaluate import load_rows
    from models.data import load_dataset
    from models.train import open_training_data

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
    snaps = tmp_path / "run" / "snapshots"
    snaps.mkdir(parents=True)
    a = _file(snaps, name="snapshot-000000064.pt")
    integrity.stamp(a)
    a.unlink()
    (err,) = integrity.bad_snapshots(tmp_path / "run")
    assert str(a) in err and "missing" in err
