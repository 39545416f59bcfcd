"""How each kind of dataset file is read into a training.dataset_arrays.DatasetArrays without converting its images:
.npy / .npz arrays (the image and label keys, the layout rule), sklearn's digits, CIFAR-10 python batches (through an
unpickler that allows only what the format needs) and image folders (Pillow). The specs that name them, and what
each gives, are training.dataset's docstring.

A `.npy`, or a member of an uncompressed `.npz` (np.savez and training.dataset's writer never compress), is
memory-mapped: opening reads headers only, `rows(idx)` touches only those rows, and a memory-mapped file is shared by
every process through the page cache.
"""

from __future__ import annotations

import os
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import torch

from training.dataset_arrays import DatasetArrays, DatasetError, checked_labels, resize_images

# Imported where used: scikit-learn (a slow import, SciPy with it) only for the bundled digits, Pillow only for
# image folders (an optional package: study.checks.PATH_PACKAGES).

_X_KEYS = ("x", "images", "latents")
_LABEL_KEYS = ("labels", "y")
_CHANNEL_SIZES = (1, 3, 4)
_IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


# ---- .npy / .npz arrays ------------------------------------------------------------------------------------------

def _npz_member_memmap(path: Path, key: str):
    """A read-only np.memmap of the array `key` inside an uncompressed .npz (the .npy bytes of a stored member lie
    as-is in the file, after the member's local zip header), or None where that is impossible (compressed member,
    unknown header version, object dtype). The one place that knows the zip layout."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(f"{key}.npy")
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)  # the member's local file header: fixed part, then name and extra field
        if len(local) < 30 or local[:4] != b"PK\x03\x04":
            return None
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        f.seek(info.header_offset + 30 + name_len + extra_len)
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            return None
        offset = f.tell()
    if dtype.hasobject or 0 in shape:
        return None
    # np.memmap itself refuses a file shorter than offset + size (a truncated member): DatasetError upstream
    return np.memmap(path, dtype=dtype, mode="r", shape=shape, order="F" if fortran else "C", offset=offset)


def _pread_rows(filename, offset: int, row_shape: tuple, dtype: np.dtype, to_nchw):
    """A row reader for a C-ordered array stored at `offset` in a file: runs of consecutive rows in one pread."""
    row_bytes = int(np.prod(row_shape, dtype=np.int64)) * dtype.itemsize

    def read(idx: np.ndarray) -> np.ndarray:
        buf = np.empty((idx.size, *row_shape), dtype=dtype)
        view = memoryview(buf.reshape(-1).view(np.uint8))
        starts = np.flatnonzero(np.diff(idx, prepend=-2) != 1)          # first position of each run
        ends = np.append(starts[1:], idx.size)
        fd = os.open(filename, os.O_RDONLY)
        try:
            for a, b in zip(starts.tolist(), ends.tolist()):
                want, pos = (b - a) * row_bytes, offset + int(idx[a]) * row_bytes
                got = os.preadv(fd, [view[a * row_bytes:b * row_bytes]], pos)
                while 0 < got < want:   # a short read is legal; go on from where it stopped
                    n = os.preadv(fd, [view[a * row_bytes + got:b * row_bytes]], pos + got)
                    got += n if n > 0 else want   # 0: end of file, caught below
                if got != want:
                    raise DatasetError(f"{filename}: rows {int(idx[a])}..{int(idx[b - 1])} lie beyond the end of "
                                       "the file (truncated?)")
        finally:
            os.close(fd)
        return to_nchw(buf)

    return read


def _to_nchw(a: np.ndarray, where: str, layout: str | None = None) -> np.ndarray:
    """NCHW from a 3-D/4-D array (a view: rows of a memmap stay lazy); `layout` ("NCHW"/"NHWC", stored by
    save_npz) overrides the guess."""
    if a.ndim == 3:
        return a[:, None]
    if a.ndim != 4:
        raise DatasetError(f"{where}: expected images [N, C, H, W] / [N, H, W, C] / [N, H, W], got shape {a.shape}")
    if layout not in (None, "NCHW", "NHWC"):
        raise DatasetError(f"{where}: layout must be 'NCHW' or 'NHWC', got {layout!r}")
    if layout is None:
        layout = "NHWC" if a.shape[-1] in _CHANNEL_SIZES and a.shape[1] not in _CHANNEL_SIZES else "NCHW"
    return a.transpose(0, 3, 1, 2) if layout == "NHWC" else a


def npz_members(z, path: Path) -> tuple[str, str | None, str, str | None]:
    """(image key, label key or None, name, layout or None) of an open .npz in training.dataset's format."""
    xkey = next((k for k in _X_KEYS if k in z.files), None)
    if xkey is None:
        raise DatasetError(f"{path}: no image array under any of the keys {list(_X_KEYS)} (found {z.files})")
    lkey = next((k for k in _LABEL_KEYS if k in z.files), None)
    name = str(z["name"]) if "name" in z.files and z["name"].ndim == 0 else Path(path).stem
    layout = str(z["layout"]) if "layout" in z.files else None
    return xkey, lkey, name, layout


def open_array_file(path: Path) -> DatasetArrays:
    """A .npy / .npz opened without converting (or, where mappable, reading) the images."""
    labels, name, layout = None, path.stem, None
    try:
        if path.suffix == ".npy":
            x, where = np.load(path, mmap_mode="r", allow_pickle=False), str(path)
        else:
            with np.load(path, allow_pickle=False) as z:
                xkey, lkey, name, layout = npz_members(z, path)
                labels = None if lkey is None else z[lkey]
                x = _npz_member_memmap(path, xkey)
                if x is None:  # a compressed member must be read whole (still in its stored dtype)
                    x = z[xkey]
            where = f"{path}[{xkey}]"
    except DatasetError:
        raise
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, struct.error) as e:
        raise DatasetError(f"{path}: cannot read the array file ({type(e).__name__}: {e})") from e
    read_rows = None
    if isinstance(x, np.memmap) and x.flags.c_contiguous and x.ndim in (3, 4):
        read_rows = _pread_rows(x.filename, x.offset, x.shape[1:], x.dtype,
                                lambda a: _to_nchw(a, where, layout))
    x = _to_nchw(x, where, layout)
    lab = None if labels is None else checked_labels(labels, x.shape[0], where)
    return DatasetArrays(x, lab, name, where, read_rows)


# ---- digits ------------------------------------------------------------------------------------------------------

def read_digits(resolution) -> DatasetArrays:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32))[:, None] / 8.0 - 1.0  # 0..16 → [−1, 1]
    return DatasetArrays(resize_images(x, resolution, "digits").numpy(), torch.from_numpy(d.target.astype(np.int64)),
                         "digits")


# ---- CIFAR-10 python batches ----------------------------------------------------------------------------------

def _latin1_bytes(text, encoding="latin1"):
    """What Python 3 protocol-2 pickles call (as _codecs.encode) to rebuild bytes; latin-1 only."""
    if encoding != "latin1":
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} is not part of the CIFAR-10 format")
    return text.encode("latin1")


class _CifarUnpickler(pickle.Unpickler):
    """The official CIFAR-10 python format is a pickle (a dict of bytes, ints, lists and one uint8 numpy array),
    so it must be unpickled; this unpickler resolves only the numpy globals that rebuild such an array (as Python
    2's cPickle wrote them, and as Python 3 pickles them) and the latin-1 bytes constructor, and refuses any other,
    so a crafted batch file cannot run code: pickle reaches every callable through find_class."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not part of the CIFAR-10 format")
        if module == "_codecs":
            return _latin1_bytes
        if module.startswith("numpy.core.") and hasattr(np, "_core"):  # numpy 2: numpy.core is a deprecated alias
            module = "numpy._core." + module[len("numpy.core."):]
        return super().find_class(module, name)


def read_cifar(folder: Path) -> DatasetArrays:
    files = [folder / f"data_batch_{i}" for i in range(1, 6) if (folder / f"data_batch_{i}").is_file()]
    if not files:
        raise DatasetError(f"{folder}: no CIFAR-10 batch files data_batch_1..5 found")
    xs, ys = [], []
    for f in files:
        try:
            with open(f, "rb") as fh:
                d = _CifarUnpickler(fh, encoding="bytes").load()
        except Exception as e:  # a truncated / non-pickle / crafted file surfaces as many exception types
            raise DatasetError(f"{f}: cannot unpickle the CIFAR-10 batch ({type(e).__name__}: {e})") from None
        if not isinstance(d, dict) or b"data" not in d or b"labels" not in d:
            raise DatasetError(f"{f}: not a CIFAR-10 batch (expected a dict with b'data' and b'labels')")
        data = np.asarray(d[b"data"])
        if data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8:
            raise DatasetError(f"{f}: b'data' must be uint8 [n, 3072], got shape {data.shape} dtype {data.dtype}")
        xs.append(data.reshape(-1, 3, 32, 32))  # CIFAR stores each image as R plane, G plane, B plane
        ys.append(checked_labels(np.asarray(d[b"labels"], dtype=np.int64), data.shape[0], str(f)))
    return DatasetArrays(np.concatenate(xs), torch.cat(ys), "cifar10", str(folder))


# ---- image folders -------------------------------------------------------------------------------------------

def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in _IMAGE_EXTS


def _center_crop_resize(img, resolution: int | None):
    from PIL import Image

    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    img = img.crop((left, top, left + s, top + s))
    if resolution is not None and s != resolution:
        img = img.resize((resolution, resolution), Image.Resampling.BICUBIC)
    return img


def read_image_folder(folder: Path, resolution) -> DatasetArrays:
    from PIL import Image, UnidentifiedImageError

    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes:
        items = [(f, k) for k, c in enumerate(classes) for f in sorted((folder / c).iterdir()) if _is_image(f)]
    else:
        items = [(f, -1) for f in sorted(folder.iterdir()) if _is_image(f)]
    if not items:
        raise DatasetError(f"{folder}: no images found (looked for {sorted(_IMAGE_EXTS)} "
                           + (f"in the class folders {classes[:5]}{'…' if len(classes) > 5 else ''})"
                              if classes else "directly in the folder)"))
    x = None
    for i, (f, _) in enumerate(items):
        try:
            with Image.open(f) as im:
                im = _center_crop_resize(im.convert("RGB"), resolution)
                arr = np.asarray(im, dtype=np.uint8)
        except (UnidentifiedImageError, OSError) as e:
            raise DatasetError(f"{f}: cannot read the image ({e})") from e
        if x is None:   # the first image fixes the size for the rest; one uint8 array, filled image by image
            resolution = arr.shape[0]
            x = np.empty((len(items), 3, resolution, resolution), dtype=np.uint8)
        x[i] = arr.transpose(2, 0, 1)
    labels = torch.tensor([k for _, k in items], dtype=torch.int64) if classes else None
    return DatasetArrays(x, labels, folder.name, str(folder))

