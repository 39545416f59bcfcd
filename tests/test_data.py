"""Tests for training/dataset.py (with dataset_arrays.py and dataset_formats.py): every loader against data the
test writes itself, and every error path."""

import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from training.dataset import Dataset, DatasetError, load_dataset, main, save_npz


def test_digits_shape_range_labels():
    from sklearn.datasets import load_digits

    ds = load_dataset("digits")
    raw = load_digits()
    assert ds.x.shape == (1797, 1, 8, 8) and ds.x.dtype == torch.float32
    assert float(ds.x.min()) == -1.0 and float(ds.x.max()) == 1.0
    # the affine map 0..16 → [−1, 1] applied to sklearn's own values
    np.testing.assert_allclose(ds.x[:, 0].numpy(), raw.images / 8 - 1, atol=1e-6)
    assert ds.labels.dtype == torch.int64 and ds.labels.tolist() == raw.target.tolist()
    assert ds.num_classes == 10 and ds.name == "digits"


def test_digits_resize():
    ds = load_dataset("digits", resolution=4)
    assert ds.x.shape == (1797, 1, 4, 4)
    assert float(ds.x.min()) >= -1 and float(ds.x.max()) <= 1
    # area-like downsampling keeps the image mean close
    full = load_dataset("digits").x
    assert abs(float(ds.x.mean() - full.mean())) < 0.05


def _rand_uint8(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def test_npy_uint8_nhwc_is_scaled_and_transposed(tmp_path):
    a = _rand_uint8((5, 6, 6, 3))
    np.save(tmp_path / "imgs.npy", a)
    ds = load_dataset(str(tmp_path / "imgs.npy"))
    assert ds.x.shape == (5, 3, 6, 6) and ds.labels is None and ds.name == "imgs"
    expect = a.transpose(0, 3, 1, 2).astype(np.float64) / 127.5 - 1
    np.testing.assert_allclose(ds.x.numpy(), expect, atol=1e-6)
    assert float(ds.x.min()) >= -1 and float(ds.x.max()) <= 1


def test_npz_float_nchw_latents_kept_as_given(tmp_path):
    lat = np.random.default_rng(1).normal(0, 3.0, size=(7, 4, 5, 5)).astype(np.float32)  # outside [−1, 1]
    y = np.arange(7) % 3
    np.savez(tmp_path / "lat.npz", latents=lat, y=y)
    ds = load_dataset(str(tmp_path / "lat.npz"))
    assert ds.x.shape == (7, 4, 5, 5)
    np.testing.assert_array_equal(ds.x.numpy(), lat)  # not rescaled, not transposed (dim 1 = 4 is C)
    assert ds.labels.tolist() == y.tolist()


def test_layout_rule_grayscale_and_3d(tmp_path):
    np.save(tmp_path / "g.npy", _rand_uint8((3, 8, 8, 1)))   # NHWC, one channel
    np.save(tmp_path / "h.npy", _rand_uint8((3, 8, 8)))      # [N, H, W]
    np.save(tmp_path / "c.npy", _rand_uint8((3, 1, 8, 8)))   # already NCHW
    assert load_dataset(str(tmp_path / "g.npy")).x.shape == (3, 1, 8, 8)
    assert load_dataset(str(tmp_path / "h.npy")).x.shape == (3, 1, 8, 8)
    assert load_dataset(str(tmp_path / "c.npy")).x.shape == (3, 1, 8, 8)
    # ambiguous: dim 1 = 4 is a valid channel count, so the rule keeps NCHW; a `layout` key overrides it
    np.save(tmp_path / "amb.npy", _rand_uint8((3, 4, 4, 3)))
    assert load_dataset(str(tmp_path / "amb.npy")).x.shape == (3, 4, 4, 3)
    np.savez(tmp_path / "amb.npz", x=_rand_uint8((3, 4, 4, 3)), layout="NHWC")
    assert load_dataset(str(tmp_path / "amb.npz")).x.shape == (3, 3, 4, 4)


@pytest.mark.parametrize("source", ["digits", "uint8", "float"])
def test_save_npz_round_trip_is_identical(tmp_path, source):
    if source == "digits":
        ds = load_dataset("digits")
    elif source == "uint8":
        np.savez(tmp_path / "in.npz", images=_rand_uint8((6, 3, 4, 4)), labels=np.array([0, 1, 2, 0, 1, 2]))
        ds = load_dataset(str(tmp_path / "in.npz"))
    else:
        ds = Dataset(torch.randn(4, 2, 3, 3), None, "noise")
    for compact in (False, True):
        out = save_npz(ds, tmp_path / "sub" / "out.npz", compact=compact)
        back = load_dataset(str(out))
        assert torch.equal(back.x, ds.x)
        assert (back.labels is None and ds.labels is None) or torch.equal(back.labels, ds.labels)
        assert back.name == ds.name
        with np.load(out) as z:
            if not compact:  # the default file is the dataset itself for readers using np.load
                assert z["x"].dtype == np.float32 and np.array_equal(z["x"], ds.x.numpy())
            else:  # uint8-exact images are stored compactly, others stay float32
                assert z["x"].dtype == (np.uint8 if source == "uint8" else np.float32)
        assert not [p for p in (tmp_path / "sub").iterdir() if p.name != "out.npz"]  # no temp file left


def _write_cifar_batch(path, n, seed, protocol=None):
    data = _rand_uint8((n, 3072), seed)
    labels = list(np.random.default_rng(seed).integers(0, 10, size=n))
    with open(path, "wb") as f:
        pickle.dump({b"data": data, b"labels": [int(v) for v in labels], b"batch_label": b"fake"}, f,
                    protocol=protocol)
    return data, labels


def test_cifar_batches_load_in_order(tmp_path):
    # protocol 2 is what the official (Python 2 cPickle) files use; 5 pickles the array through _frombuffer
    d1, l1 = _write_cifar_batch(tmp_path / "data_batch_1", 4, 0, protocol=2)
    d2, l2 = _write_cifar_batch(tmp_path / "data_batch_2", 3, 1, protocol=5)
    _write_cifar_batch(tmp_path / "test_batch", 5, 2)  # the test split is not training data
    ds = load_dataset(f"cifar10:{tmp_path}")
    assert ds.x.shape == (7, 3, 32, 32) and ds.name == "cifar10"
    assert ds.labels.tolist() == l1 + l2
    # pixel (row 2, col 5) of image 1: red at 0·1024 + 2·32 + 5, green at +1024, blue at +2048
    rgb = d1[1, [69, 1024 + 69, 2048 + 69]].astype(np.float64) / 127.5 - 1
    np.testing.assert_allclose(ds.x[1, :, 2, 5].numpy(), rgb, atol=1e-6)
    assert load_dataset(f"cifar10:{tmp_path}", resolution=16).x.shape == (7, 3, 16, 16)
    # a bare folder of pickles is not unpickled: the spec must name the format
    with pytest.raises(DatasetError, match=f"cifar10:{tmp_path}"):
        load_dataset(str(tmp_path))


class _Payload:
    """Unpickles as a call of os.system: what a crafted data file would carry."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_crafted_cifar_batch_is_refused_without_running(tmp_path):
    marker = tmp_path / "payload-ran"
    with open(tmp_path / "data_batch_1", "wb") as f:
        pickle.dump({b"data": _Payload(marker), b"labels": [0]}, f, protocol=2)
    with pytest.raises(DatasetError, match="data_batch_1.*system"):
        load_dataset(f"cifar10:{tmp_path}")
    assert not marker.exists()


def _write_image(path, size, color):
    Image.new("RGB", size, color).save(path)


def test_image_folder_with_classes(tmp_path):
    for cls, color in (("zebra", (255, 0, 0)), ("ant", (0, 0, 255))):
        (tmp_path / cls).mkdir()
        _write_image(tmp_path / cls / "a.png", (20, 12), color)
        _write_image(tmp_path / cls / "b.jpg", (12, 12), color)
    (tmp_path / "zebra" / "notes.txt").write_text("not an image")
    ds = load_dataset(f"imagefolder:{tmp_path}", resolution=8)
    assert ds.x.shape == (4, 3, 8, 8)
    assert ds.labels.tolist() == [0, 0, 1, 1]  # sorted names: ant = 0, zebra = 1
    # ant is blue, zebra red (JPEG may shift values slightly)
    assert float(ds.x[0, 2].mean()) > 0.9 and float(ds.x[0, 0].mean()) < -0.9
    assert float(ds.x[3, 0].mean()) > 0.9 and float(ds.x[3, 2].mean()) < -0.9
    # auto-detected folder, size fixed by the first image's center crop (12)
    assert load_dataset(str(tmp_path)).x.shape == (4, 3, 12, 12)


def test_center_crop_keeps_the_middle(tmp_path):
    img = np.zeros((10, 30, 3), dtype=np.uint8)  # wide image, white square in the middle 10 columns
    img[:, 10:20] = 255
    (tmp_path / "c").mkdir()
    Image.fromarray(img).save(tmp_path / "c" / "w.png")
    ds = load_dataset(str(tmp_path))
    assert ds.x.shape == (1, 3, 10, 10) and float(ds.x.min()) == 1.0


def test_image_folder_without_classes(tmp_path):
    _write_image(tmp_path / "x.png", (9, 9), (0, 255, 0))
    ds = load_dataset(str(tmp_path))
    assert ds.labels is None and ds.x.shape == (1, 3, 9, 9)


# ---- error paths: each names the bad thing -------------------------------------------------------------

def test_error_is_value_and_file_not_found_error():
    assert issubclass(DatasetError, ValueError) and issubclass(DatasetError, FileNotFoundError)


def test_missing_path(tmp_path):
    with pytest.raises(DatasetError, match="missing.npz"):
        load_dataset(str(tmp_path / "missing.npz"))
    with pytest.raises(DatasetError, match="nowhere"):
        load_dataset(f"cifar10:{tmp_path / 'nowhere'}")


def test_unknown_spec():
    with pytest.raises(DatasetError, match="mnist-please"):
        load_dataset("mnist-please")


def test_unknown_file_type(tmp_path):
    (tmp_path / "data.csv").write_text("1,2")
    with pytest.raises(DatasetError, match="data.csv"):
        load_dataset(str(tmp_path / "data.csv"))


def test_unreadable_files(tmp_path):
    (tmp_path / "bad.npz").write_bytes(b"definitely not a zip")
    with pytest.raises(DatasetError, match="bad.npz"):
        load_dataset(str(tmp_path / "bad.npz"))
    (tmp_path / "cif").mkdir()
    (tmp_path / "cif" / "data_batch_1").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match="data_batch_1"):
        load_dataset(f"cifar10:{tmp_path / 'cif'}")
    (tmp_path / "img" / "k").mkdir(parents=True)
    (tmp_path / "img" / "k" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="broken.png"):
        load_dataset(str(tmp_path / "img"))


def test_wrong_shapes_and_keys(tmp_path):
    np.save(tmp_path / "flat.npy", np.zeros((5, 64), dtype=np.float32))
    with pytest.raises(DatasetError, match=r"\(5, 64\)"):
        load_dataset(str(tmp_path / "flat.npy"))
    np.savez(tmp_path / "nokey.npz", pixels=np.zeros((2, 1, 4, 4), dtype=np.uint8))
    with pytest.raises(DatasetError, match="pixels"):
        load_dataset(str(tmp_path / "nokey.npz"))
    np.savez(tmp_path / "lab.npz", x=np.zeros((3, 1, 4, 4), dtype=np.uint8), labels=np.arange(4))
    with pytest.raises(DatasetError, match=r"\(4,\)"):
        load_dataset(str(tmp_path / "lab.npz"))
    with open(tmp_path / "data_batch_1", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), dtype=np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(DatasetError, match=r"\(2, 100\)"):
        load_dataset(f"cifar10:{tmp_path}")


def test_float_array_is_not_resized(tmp_path):
    np.save(tmp_path / "lat.npy", np.zeros((2, 4, 8, 8), dtype=np.float32))
    with pytest.raises(DatasetError, match="resolution 4"):
        load_dataset(str(tmp_path / "lat.npy"), resolution=4)


def test_bad_dtype_and_nonfinite(tmp_path):
    np.save(tmp_path / "i.npy", np.zeros((2, 1, 4, 4), dtype=np.int32))
    with pytest.raises(DatasetError, match="int32"):
        load_dataset(str(tmp_path / "i.npy"))
    a = np.zeros((2, 1, 4, 4), dtype=np.float32)
    a[0, 0, 0, 0] = np.nan
    np.save(tmp_path / "n.npy", a)
    with pytest.raises(DatasetError, match="NaN"):
        load_dataset(str(tmp_path / "n.npy"))


def test_empty_folders(tmp_path):
    with pytest.raises(DatasetError, match="no images"):
        load_dataset(str(tmp_path))
    (tmp_path / "cls").mkdir()
    with pytest.raises(DatasetError, match="cls"):
        load_dataset(f"imagefolder:{tmp_path}")


# ---- CLI --------------------------------------------------------------------------------------------------

def test_cli_materialises_digits(tmp_path, capsys):
    assert main(["digits", "--out", str(tmp_path / "d.npz"), "--resolution", "8"]) == 0
    out = capsys.readouterr().out
    assert "N=1797" in out and "(1, 8, 8)" in out and "10 classes" in out
    assert torch.equal(load_dataset(str(tmp_path / "d.npz")).x, load_dataset("digits").x)


def test_cli_error_exit_code(tmp_path, capsys):
    assert main([str(tmp_path / "none.npz"), "--out", str(tmp_path / "o.npz")]) == 2
    assert "none.npz" in capsys.readouterr().err
    assert not (tmp_path / "o.npz").exists()


def test_cli_module_entry_point(tmp_path):
    np.save(tmp_path / "a.npy", _rand_uint8((3, 5, 5, 3)))  # NHWC: dim 1 = 5 is not a channel count
    r = subprocess.run([sys.executable, "-m", "training.dataset", str(tmp_path / "a.npy"), "--out",
                        str(tmp_path / "a.npz")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "N=3" in r.stdout and "(3, 5, 5)" in r.stdout


# ---- the reader: open_dataset / DatasetArrays ----------------------------------------------------------------

from training.dataset import UINT8_TABLE, DatasetArrays, open_dataset, write_npz  # noqa: E402


def _old_uint8(u: np.ndarray) -> torch.Tensor:
    """The float32 path every reader used before the reader existed: u/127.5 − 1 on the whole array."""
    return torch.from_numpy(np.ascontiguousarray(u)).to(torch.float32) / 127.5 - 1


def test_uint8_table_is_the_formula_for_every_value():
    u = np.arange(256, dtype=np.uint8)
    assert torch.equal(UINT8_TABLE, _old_uint8(u))
    assert torch.equal(UINT8_TABLE.view(torch.int32), _old_uint8(u).view(torch.int32))   # bits, incl. −0.0


@pytest.mark.parametrize("kind", ["npz-u8", "npy-u8-nhwc", "npz-f32", "npy-f64", "npz-f16-nhwc"])
def test_rows_are_bit_identical_to_the_old_float32_path(tmp_path, kind):
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 5, 40)
    if "u8" in kind:
        a = _rand_uint8((40, 6, 6, 3) if "nhwc" in kind else (40, 3, 6, 6), seed=4)
        a.reshape(-1)[:256] = np.arange(256)          # every uint8 value occurs
        old = _old_uint8(a.transpose(0, 3, 1, 2) if "nhwc" in kind else a)
    else:
        dt = {"f32": np.float32, "f64": np.float64, "f16": np.float16}[kind.split("-")[1]]
        a = (rng.normal(0, 2.5, (40, 5, 5, 4) if "nhwc" in kind else (40, 4, 5, 5))).astype(dt)
        old = torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2) if "nhwc" in kind else a,
                                                    dtype=np.float32))
    if kind.startswith("npz"):
        path = tmp_path / "d.npz"
        np.savez(path, x=a, labels=labels, **({"layout": "NHWC"} if "nhwc" in kind else {}))
    else:
        path = tmp_path / "d.npy"
        np.save(path, a)
    data = open_dataset(path)
    assert isinstance(data.x, np.memmap) and data.x.dtype == a.dtype      # mapped, stored dtype, nothing converted
    assert data.shape == tuple(old.shape) and len(data) == 40
    idx = np.array([7, 0, 39, 7, 12])
    got = data.rows(idx)
    assert got.dtype == torch.float32 and torch.equal(got.view(torch.int32), old[idx].view(torch.int32))
    assert torch.equal(data.rows(torch.as_tensor(idx), dtype=torch.float64), old[idx].double())
    assert torch.equal(data.float32(), old)
    assert torch.equal(load_dataset(str(path)).x, old)
    if kind.startswith("npz"):
        assert torch.equal(data.labels, torch.from_numpy(labels))
    with pytest.raises(IndexError, match="out of range"):
        data.rows([40])


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def test_reading_rows_does_not_load_the_whole_array(tmp_path):
    n, row = 4096, 3 * 64 * 64              # 50 MB of uint8
    x = np.lib.format.open_memmap(tmp_path / "big.npy", mode="w+", dtype=np.uint8, shape=(n, 3, 64, 64))
    x[:] = 7
    x.flush()
    del x
    write_npz(open_dataset(tmp_path / "big.npy"), tmp_path / "big.npz")
    for name in ("big.npy", "big.npz"):
        data = open_dataset(tmp_path / name)
        assert isinstance(data.x, np.memmap)
        before = _rss_bytes()
        rows = data.rows(np.arange(0, n, 128))       # 32 rows
        after_rows = _rss_bytes()
        assert torch.all(rows == UINT8_TABLE[7])
        assert after_rows - before < 32 * row * 8 + (8 << 20), name   # the rows, their indices, slack
        # the control: touching every row does show up, so the bound above can fail
        assert int(np.asarray(data.x).sum(dtype=np.uint64)) == 7 * n * row
        assert _rss_bytes() - before > n * row // 2, name
        del data


def test_missing_or_truncated_files_raise_one_error_naming_the_path(tmp_path):
    with pytest.raises(DatasetError, match="gone.npz"):
        open_dataset(tmp_path / "gone.npz")
    write_npz(DatasetArrays(_rand_uint8((50, 3, 8, 8)), torch.arange(50) % 2, "t"), tmp_path / "ok.npz")
    np.save(tmp_path / "ok.npy", _rand_uint8((50, 3, 8, 8)))
    for name in ("ok.npz", "ok.npy"):
        blob = (tmp_path / name).read_bytes()
        for cut in (len(blob) // 2, len(blob) - 10, 20):
            bad = tmp_path / f"cut{cut}-{name}"
            bad.write_bytes(blob[:cut])
            with pytest.raises(DatasetError, match=bad.name):
                open_dataset(bad)
            with pytest.raises(DatasetError, match=bad.name):
                load_dataset(str(bad))


def test_write_npz_streams_the_compact_form(tmp_path, monkeypatch):
    import training.dataset_arrays as mdata

    monkeypatch.setattr(mdata, "_CHUNK_ELEMENTS", 100)     # many chunks: the streamed file is still one array
    u = _rand_uint8((23, 3, 5, 5), seed=9)
    src = DatasetArrays(u, torch.arange(23) % 4, "u8")
    stats = write_npz(src, tmp_path / "u.npz")
    assert stats["dtype"] == "uint8"
    with np.load(tmp_path / "u.npz") as z:
        assert np.array_equal(z["x"], u) and z["labels"].tolist() == (np.arange(23) % 4).tolist()
        assert str(z["layout"]) == "NCHW" and str(z["name"]) == "u8"
    back = open_dataset(tmp_path / "u.npz")
    assert isinstance(back.x, np.memmap) and torch.equal(back.float32(), _old_uint8(u))
    # float values on the uint8 grid become uint8 with compact (the default), float32 without; other floats stay
    on_grid = DatasetArrays(_old_uint8(u).numpy(), None, "grid")
    assert write_npz(on_grid, tmp_path / "g.npz")["dtype"] == "uint8"
    assert torch.equal(open_dataset(tmp_path / "g.npz").float32(), _old_uint8(u))
    assert write_npz(on_grid, tmp_path / "g32.npz", compact=False)["dtype"] == "float32"
    lat = np.random.default_rng(0).normal(0, 3, (23, 4, 2, 2)).astype(np.float64)
    assert write_npz(DatasetArrays(lat, None, "lat"), tmp_path / "lat.npz")["dtype"] == "float32"
    assert torch.equal(open_dataset(tmp_path / "lat.npz").float32(), torch.from_numpy(lat.astype(np.float32)))
    lat[20, 0, 0, 0] = np.inf
    with pytest.raises(DatasetError, match="NaN or inf"):
        write_npz(DatasetArrays(lat, None, "lat"), tmp_path / "inf.npz")
    assert not (tmp_path / "inf.npz").exists() and not list(tmp_path.glob("*.tmp*"))


def test_cli_writes_uint8_for_uint8_sources_and_float32_for_digits(tmp_path):
    (tmp_path / "cif").mkdir()
    d1, l1 = _write_cifar_batch(tmp_path / "cif" / "data_batch_1", 6, 0)
    assert main([f"cifar10:{tmp_path / 'cif'}", "--out", str(tmp_path / "c.npz")]) == 0
    c = open_dataset(tmp_path / "c.npz")
    assert c.dtype == np.uint8 and isinstance(c.x, np.memmap)
    assert torch.equal(c.float32(), _old_uint8(d1.reshape(-1, 3, 32, 32)))
    assert c.labels.tolist() == [int(v) for v in l1]
    for cls, colour in (("a", (255, 0, 0)), ("b", (0, 0, 255))):
        (tmp_path / "img" / cls).mkdir(parents=True)
        _write_image(tmp_path / "img" / cls / "0.png", (10, 10), colour)
    assert main([f"imagefolder:{tmp_path / 'img'}", "--out", str(tmp_path / "i.npz"), "--resolution", "8"]) == 0
    i = open_dataset(tmp_path / "i.npz")
    assert i.dtype == np.uint8 and torch.equal(i.float32(), load_dataset(f"imagefolder:{tmp_path / 'img'}",
                                                                         resolution=8).x)
    assert main(["digits", "--out", str(tmp_path / "d.npz")]) == 0
    d = open_dataset(tmp_path / "d.npz")   # k/8 − 1 is not on the uint8 grid: kept float32, identical values
    assert d.dtype == np.float32 and torch.equal(d.float32(), load_dataset("digits").x)
