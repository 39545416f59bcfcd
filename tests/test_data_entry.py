"""Bad data are refused where they enter, in one line naming the file (training.dataset.check_images): the dataset job,
the trainer, J*'s estimators and the evaluation each refuse non-finite values, too few images and labels that do
not match the images, before any work is done — never a traceback from whichever step meets them first."""

import re

import numpy as np
import pytest
from test_workflow import load_cfg, run_module, write_cfg

from training.dataset import DatasetError, load_dataset, open_dataset, save_npz


@pytest.fixture(scope="module")
def digits64():
    """64 digits as a float32 dataset (digits are not on the uint8 grid: stored as float, so NaN can hide in it)."""
    ds = load_dataset("digits")
    ds.x, ds.labels = ds.x[:64].clone(), ds.labels[:64].clone()
    return ds


def write(tmp_path, ds, name="data.npz", nan_at=None, n=None, labels_n=None):
    x = ds.x.numpy()[:n].copy()
    if nan_at is not None:
        x[nan_at, 0, 3, 4] = np.nan
    labels = ds.labels.numpy()[:labels_n if labels_n is not None else len(x)]
    path = tmp_path / name
    np.savez(path, x=x, labels=labels, layout="NCHW")
    return path


def the_error(text: str, path) -> str:
    """The one error line of a CLI's output, which names `path`; no traceback."""
    assert "Traceback" not in text, text[-3000:]
    (line,) = [line for line in text.splitlines() if line.startswith("error:")]
    assert str(path) in line
    return line


def train_cli(tmp_path, data):
    cfg = load_cfg("smoke")
    cfg["models"] = {"t0": {"arch": "t0"}}
    cfg["training"].update(total_images=128, batch_size=32, snapshots={"count": 1})
    config = write_cfg(cfg, tmp_path / "study.yaml")
    out = tmp_path / "run"
    rc, text = run_module("training.train", "--config", config, "--model", "t0", "--data", data, "--out", out,
                          "--no-progress")
    return rc, text, out


def test_dataset_job_refuses_fewer_images_than_a_batch(tmp_path, digits64):
    src = write(tmp_path, digits64, n=16)
    out = tmp_path / "dataset.npz"
    rc, text = run_module("training.dataset", src, "--out", out, "--at-least", "training.batch_size=64",
                          "--at-least", "optimal_loss.subset_size=8")
    assert rc == 2 and the_error(text, src).endswith("16 images, fewer than training.batch_size (64)")
    assert not out.exists()
    assert run_module("training.dataset", src, "--out", out, "--at-least", "training.batch_size=16")[0] == 0


def test_dataset_job_refuses_nan_pixels(tmp_path, digits64):
    src = write(tmp_path, digits64, nan_at=5)
    rc, text = run_module("training.dataset", src, "--out", tmp_path / "dataset.npz")
    assert rc == 2 and "NaN or inf" in the_error(text, src)


def test_trainer_refuses_nan_pixels_before_any_step(tmp_path, digits64):
    data = write(tmp_path, digits64, nan_at=41)
    rc, text, out = train_cli(tmp_path, data)
    assert rc == 2 and the_error(text, data).endswith("image 41 holds NaN or inf values")
    assert not (out / "state.pt").exists() and not (out / "snapshots").exists()


def test_trainer_refuses_fewer_images_than_a_batch(tmp_path, digits64):
    data = write(tmp_path, digits64, n=20)
    rc, text, out = train_cli(tmp_path, data)
    assert rc == 2 and the_error(text, data).endswith("20 images, fewer than training.batch_size (32)")


def test_trainer_refuses_labels_that_do_not_match_the_images(tmp_path, digits64):
    data = write(tmp_path, digits64, labels_n=63)
    rc, text, _ = train_cli(tmp_path, data)
    assert rc == 2 and "labels must be 64 integers [N], got shape (63,)" in the_error(text, data)


def test_estimators_refuse_a_set_smaller_than_their_subset(tmp_path, digits64):
    data = write(tmp_path, digits64, n=1)
    rc, text = run_module("analysis.optimal_loss", "--dataset", data, "--estimator", "dol", "--num-sigmas", "3",
                          "--out", tmp_path / "jstar.csv")
    assert rc == 2 and "1 images, fewer than the subset of dol (--subset-size) (2)" in the_error(text, data)
    data = write(tmp_path, digits64, name="nan.npz", nan_at=0)
    rc, text = run_module("analysis.optimal_loss", "--dataset", data, "--num-sigmas", "3",
                          "--out", tmp_path / "jstar.csv")
    assert rc == 2 and "image 0 holds NaN" in the_error(text, data)


def test_evaluation_checks_the_rows_it_reads(tmp_path, digits64):
    from analysis.evaluate import load_rows

    data = write(tmp_path, digits64, nan_at=7)
    eval_set = {"index": np.array([3, 9, 3]), "sigma": np.ones(3), "noise_seed": np.arange(3)}
    x, _, ev = load_rows(data, eval_set)  # image 7 is not among them
    assert x.shape[0] == 2 and ev["index"].tolist() == [0, 1, 0]
    with pytest.raises(DatasetError, match=f"^{re.escape(str(data))}.*: image 7 holds NaN"):
        load_rows(data, {**eval_set, "index": np.array([3, 7])})


def test_uint8_sets_are_not_read_for_the_finite_check(tmp_path, monkeypatch):
    """uint8 images are finite by their type: the check reads no row of them (a large set costs nothing)."""
    from training import dataset as data_mod
    from training.dataset import Dataset

    x = np.random.default_rng(0).integers(0, 256, size=(8, 1, 4, 4)).astype(np.uint8)
    path = tmp_path / "u8.npz"
    save_npz(Dataset(x=data_mod.UINT8_TABLE[x.astype(np.int64)], labels=None, name="u8"), path, compact=True)
    arrays = open_dataset(path)
    assert arrays.dtype == np.uint8
    monkeypatch.setattr(type(arrays), "stored_rows", lambda *a: pytest.fail("read rows"))
    data_mod.check_images(arrays, at_least={"training.batch_size": 8})


def test_sample_quality_refuses_nan_pixels(tmp_path, digits64):
    data = write(tmp_path, digits64, nan_at=2)
    rc, text = run_module("analysis.sample_quality", "train-classifier", "--data", data, "--out", tmp_path / "c.pt")
    assert rc == 1 and the_error(text, data).endswith("image 2 holds NaN or inf values")
