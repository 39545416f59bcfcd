"""Datasets behind one reader: `open_dataset(spec) -> DatasetArrays` (the images as stored, memory-mapped where the
file allows; `.rows(idx)` converts only the asked rows) and `load_dataset(spec) -> Dataset(x [N,C,H,W] float32,
labels [N] int64 | None, name)` (the whole set as one float32 tensor, for small sets and tests).

Specs (a string):
- `digits`                      sklearn's bundled 8×8 digits (1797 images, values 0..16 → [−1, 1], labels 0..9).
- `PATH.npy` / `PATH.npz`       arrays. `.npz` keys: image array under `x`, `images` or `latents` (first found),
                                labels under `labels` or `y` (optional). uint8 arrays are scaled to [−1, 1]; float
                                arrays (e.g. latents) are kept as given. Layout rule: an optional `layout` key
                                ("NCHW"/"NHWC"; save_npz writes "NCHW") decides; without it a 4-D array is NHWC —
                                and is transposed to NCHW — iff its last dim is in {1, 3, 4} and its dim 1 is not.
                                A 3-D array [N, H, W] gets one channel.
- `cifar10:DIR`                  CIFAR-10 python batches `data_batch_1..5` found in DIR (the official format is
                                pickled: only these five files, only with this explicit spec, and with an
                                unpickler that allows nothing but the numpy array constructors the format needs).
- `imagefolder:DIR` (or any other DIR)                one sub-folder per class (labels = index in sorted names),
                                or images directly in DIR (no labels); read with Pillow as RGB, center-cropped to
                                a square and resized to `resolution` (default: the first image's cropped size).

`resolution` also resizes digits, CIFAR and uint8 arrays (antialiased bilinear); float arrays are never resized.
Every bad input raises `DatasetError` (a ValueError and FileNotFoundError) whose message names the path/shape.

Stored form and conversion. uint8 images are kept as uint8 until a row is asked for; a row then becomes
`u/127.5 − 1` through a 256-entry float32 table computed with exactly that formula on the CPU (UINT8_TABLE), so every
reader, on every device, gives the same bits (CUDA would turn `/ 127.5` into `* (1/127.5)`). Float arrays (latents)
are kept as given and converted to float32 per row. A `.npy`, or a member of an uncompressed `.npz` (np.savez and
this module's writer never compress), is memory-mapped: opening reads headers only, `rows(idx)` touches only those
rows, and a memory-mapped file is shared by every process through the page cache.

CLI (what Snakemake's data rule calls):  python -m training.dataset SPEC --out FILE.npz [--resolution R] [--no-compact]
writes the compact form: uint8 wherever the images are exactly u/127.5 − 1 (CIFAR, image folders, uint8 arrays
without resizing), else float32 (digits, whose values k/8 − 1 are not on that grid, resized or float data),
streamed chunk by chunk into an uncompressed .npz so that it can be memory-mapped.
"""

from __future__ import annotations

import argparse
import os
import pickle
import struct
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from study.atomic import atomic_path
from study.integrity import add_stamp_options, stamp_outputs, verify

# Imported where used: scikit-learn (a slow import, SciPy with it) only for the bundled digits, Pillow only for
# image folders (an optional package: study.checks.PATH_PACKAGES).

__all__ = ["Dataset", "DatasetArrays", "DatasetError", "UINT8_TABLE", "load_dataset", "main", "open_dataset",
           "save_npz", "write_npz"]

_X_KEYS = ("x", "images", "latents")
_LABEL_KEYS = ("labels", "y")
_CHANNEL_SIZES = (1, 3, 4)
_IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


class DatasetError(ValueError, FileNotFoundError):
    """A dataset spec that cannot be loaded; the message names the path, key or shape at fault."""


@dataclass
class Dataset:
    x: torch.Tensor                    # float32 [N, C, H, W]; images in [−1, 1], latents as given
    labels: torch.Tensor | None        # int64 [N] or None
    name: str

    def __post_init__(self):
        if self.x.ndim != 4:
            raise DatasetError(f"dataset {self.name!r}: x must be [N, C, H, W], got shape {tuple(self.x.shape)}")
        if self.labels is not None and self.labels.shape != (self.x.shape[0],):
            raise DatasetError(f"dataset {self.name!r}: labels shape {tuple(self.labels.shape)} does not match "
                               f"N = {self.x.shape[0]}")

    @property
    def num_classes(self) -> int:
        return 0 if self.labels is None else int(self.labels.max()) + 1


# ---- the one uint8 → float conversion -------------------------------------------------------------------------

# u/127.5 − 1 for every uint8 value, computed once on the CPU: a row converted through this table has the same bits
# whichever reader, device or chunking produced it.
UINT8_TABLE = torch.arange(256, dtype=torch.float32) / 127.5 - 1

_CHUNK_ELEMENTS = 1 << 22   # values converted per step when a whole set is converted (≤ 32 MB of int64 indices)


def _chunk_rows(row_elements: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(1, row_elements))


def _convert(a: np.ndarray, out: torch.Tensor) -> torch.Tensor:
    """Rows `a` in their stored dtype (uint8 or float) → `out` (float32, same shape, on the CPU), chunk by chunk so
    that no temporary is larger than a chunk."""
    step = _chunk_rows(int(np.prod(a.shape[1:], dtype=np.int64)))
    for lo in range(0, a.shape[0], step):
        part, dst = np.asarray(a[lo:lo + step]), out[lo:lo + step]
        if part.dtype == np.uint8:
            torch.index_select(UINT8_TABLE, 0, torch.from_numpy(part.astype(np.int64).reshape(-1)),
                               out=dst.view(-1))
        else:   # float data kept as given: one cast to float32 (numpy's, as load_dataset always did)
            dst.numpy()[...] = part
    return out


def _resize(x: torch.Tensor, resolution: int | None, what: str) -> torch.Tensor:
    if resolution is None or (x.shape[-2] == resolution and x.shape[-1] == resolution):
        return x
    if resolution < 1:
        raise DatasetError(f"{what}: resolution must be >= 1, got {resolution}")
    out = torch.nn.functional.interpolate(x, size=(resolution, resolution), mode="bilinear",
                                          antialias=True, align_corners=False)
    return out.clamp(-1, 1).contiguous()


def _labels(arr, n: int, where: str) -> torch.Tensor:
    a = np.asarray(arr)
    if a.ndim != 1 or a.shape[0] != n or not np.issubdtype(a.dtype, np.integer):
        raise DatasetError(f"{where}: labels must be {n} integers [N], got shape {a.shape} dtype {a.dtype}")
    if n and a.min() < 0:
        raise DatasetError(f"{where}: labels must be >= 0, got min {a.min()}")
    return torch.from_numpy(a.astype(np.int64))


# ---- the reader ---------------------------------------------------------------------------------------------

class DatasetArrays:
    """A dataset as stored: `x` [N, C, H, W] a numpy array in its stored dtype (uint8 images, or float such as
    latents) — an np.memmap (or a transposed view of one) for .npy files and uncompressed .npz members — plus
    `labels` (int64 tensor [N] or None), `name` and `where` (the path or spec, for messages).

    Nothing is converted until `rows(idx)` asks for rows; `float32()` converts the whole set once, chunk by chunk."""

    def __init__(self, x: np.ndarray, labels: torch.Tensor | None, name: str, where: str | None = None,
                 read_rows=None):
        self.where = str(where if where is not None else name)
        if x.ndim != 4:
            raise DatasetError(f"{self.where}: x must be [N, C, H, W], got shape {tuple(x.shape)}")
        if x.dtype != np.uint8 and not np.issubdtype(x.dtype, np.floating):
            raise DatasetError(f"{self.where}: unsupported dtype {x.dtype} (use uint8 images or float arrays)")
        if x.shape[0] == 0:
            raise DatasetError(f"{self.where}: the array holds no samples (shape {tuple(x.shape)})")
        if labels is not None and tuple(labels.shape) != (x.shape[0],):
            raise DatasetError(f"{self.where}: labels shape {tuple(labels.shape)} does not match N = {x.shape[0]}")
        self.x = x
        self.labels = labels
        self.name = name
        self.shape = tuple(int(d) for d in x.shape)
        self._read_rows = read_rows    # idx (int64, in range) -> stored rows [len, C, H, W]; None: index x
        self._tables: dict[torch.device, torch.Tensor] = {}

    def stored_rows(self, idx: np.ndarray) -> np.ndarray:
        """Rows `idx` (int64 array in [0, N)) in the stored dtype, as a private array. A mapped file is read with
        pread rather than through the mapping: the page cache is shared either way, but faulted-in mapped pages
        count in the process's RSS (and the kernel maps whole large folios around each fault)."""
        return self._read_rows(idx) if self._read_rows is not None else np.asarray(self.x[idx])

    @classmethod
    def from_dataset(cls, ds: Dataset) -> "DatasetArrays":
        """A float32 Dataset behind the same interface (its tensor's memory, not a copy)."""
        return cls(ds.x.detach().cpu().numpy(), ds.labels, ds.name)

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def dtype(self) -> np.dtype:
        return self.x.dtype

    @property
    def num_classes(self) -> int:
        return 0 if self.labels is None else int(self.labels.max()) + 1

    def rows(self, idx, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """float [len(idx), C, H, W] on `device` (default CPU): only these rows are read, copied and converted
        (uint8 through UINT8_TABLE, floats by one cast to float32), then cast to `dtype`. On CUDA the rows travel
        in their stored dtype (4× less traffic for uint8, pinned and asynchronous) and are converted there."""
        device = torch.device("cpu") if device is None else torch.device(device)
        if isinstance(idx, torch.Tensor):
            idx = idx.cpu().numpy()
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise IndexError(f"{self.where}: row index out of range [0, {len(self)}): "
                             f"min {idx.min()}, max {idx.max()}")
        a = self.stored_rows(idx % len(self))
        if device.type == "cpu":
            x = _convert(a, torch.empty(a.shape, dtype=torch.float32))
        else:
            x = torch.from_numpy(np.ascontiguousarray(a))
            if device.type == "cuda":   # page-locked staging buffer: the host→device copy runs asynchronously
                x = x.pin_memory()
            x = x.to(device, non_blocking=True)
            if x.dtype == torch.uint8:
                if device not in self._tables:
                    self._tables[device] = UINT8_TABLE.to(device)
                x = self._tables[device][x.long()]
            else:
                x = x.to(torch.float32)
        return x if dtype == torch.float32 else x.to(dtype)

    def float32(self) -> torch.Tensor:
        """The whole set as one float32 tensor [N, C, H, W] (CPU), converted chunk by chunk: one float copy and
        no larger temporary. The same values as rows(arange(N))."""
        out = torch.empty(self.shape, dtype=torch.float32)
        step = _chunk_rows(int(np.prod(self.shape[1:])))
        for lo in range(0, len(self), step):
            hi = min(lo + step, len(self))
            _convert(self.stored_rows(np.arange(lo, hi)), out[lo:hi])
        return out

    def to_dataset(self, check_finite: bool = True) -> Dataset:
        x = self.float32()
        if check_finite and self.dtype != np.uint8 and not bool(torch.isfinite(x).all()):
            raise DatasetError(f"{self.where}: the array contains NaN or inf values")
        return Dataset(x, self.labels, self.name)


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
    """(image key, label key or None, name, layout or None) of an open .npz in this module's format."""
    xkey = next((k for k in _X_KEYS if k in z.files), None)
    if xkey is None:
        raise DatasetError(f"{path}: no image array under any of the keys {list(_X_KEYS)} (found {z.files})")
    lkey = next((k for k in _LABEL_KEYS if k in z.files), None)
    name = str(z["name"]) if "name" in z.files and z["name"].ndim == 0 else Path(path).stem
    layout = str(z["layout"]) if "layout" in z.files else None
    return xkey, lkey, name, layout


def _open_array_file(path: Path) -> DatasetArrays:
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
    lab = None if labels is None else _labels(labels, x.shape[0], where)
    return DatasetArrays(x, lab, name, where, read_rows)


# ---- digits ------------------------------------------------------------------------------------------------------

def _read_digits(resolution) -> DatasetArrays:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32))[:, None] / 8.0 - 1.0  # 0..16 → [−1, 1]
    return DatasetArrays(_resize(x, resolution, "digits").numpy(), torch.from_numpy(d.target.astype(np.int64)),
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


def _read_cifar(folder: Path) -> DatasetArrays:
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
        ys.append(_labels(np.asarray(d[b"labels"], dtype=np.int64), data.shape[0], str(f)))
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


def _read_image_folder(folder: Path, resolution) -> DatasetArrays:
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


# ---- the entry points ----------------------------------------------------------------------------------------

_FORMS = "'digits', PATH.npy, PATH.npz, 'cifar10:DIR', 'imagefolder:DIR' or a DIR"


def _resized(arrays: DatasetArrays, resolution: int | None) -> DatasetArrays:
    """uint8 images resized (antialiased bilinear, in float: the result is float32); float arrays never."""
    h, w = arrays.shape[-2:]
    if resolution is None or (h, w) == (resolution, resolution):
        return arrays
    if arrays.dtype != np.uint8:
        # float arrays may be latents, which must not be resampled
        raise DatasetError(f"{arrays.where}: float array of shape {arrays.shape} cannot be resized to "
                           f"resolution {resolution}; resize it before saving or drop --resolution")
    x = _resize(arrays.float32(), resolution, arrays.where)
    return DatasetArrays(x.numpy(), arrays.labels, arrays.name, arrays.where)


def open_dataset(spec, *, resolution: int | None = None) -> DatasetArrays:
    """The dataset of a spec (module docstring) in its stored form: a .npy / .npz memory-mapped where possible
    (headers and labels read, no image), CIFAR / image folders as one uint8 array, digits as float32.
    `resolution` resizes (uint8 → float32 result; float arrays raise). Errors: DatasetError naming the path."""
    spec = str(spec)
    if resolution is not None:
        resolution = int(resolution)
        if resolution < 1:
            raise DatasetError(f"dataset {spec!r}: resolution must be >= 1, got {resolution}")
    if spec == "digits":
        return _read_digits(resolution)
    kind, sep, rest = spec.partition(":")
    if sep and kind in ("cifar10", "imagefolder"):
        folder = Path(rest).expanduser()
        if not folder.is_dir():
            raise DatasetError(f"{kind} folder not found: {folder}")
        if kind == "cifar10":
            return _resized(_read_cifar(folder), resolution)
        return _read_image_folder(folder, resolution)
    path = Path(spec).expanduser()
    if path.suffix in (".npy", ".npz"):
        if not path.is_file():
            raise DatasetError(f"dataset file not found: {path}")
        verify(path)  # against PATH.sha256 where the dataset rule wrote one
        return _resized(_open_array_file(path), resolution)
    if path.is_dir():
        if (path / "data_batch_1").is_file():  # pickles are read only when the spec names the format
            raise DatasetError(f"{path} holds CIFAR-10 python batches: name them as 'cifar10:{path}'")
        return _read_image_folder(path, resolution)
    if path.exists():
        raise DatasetError(f"unknown dataset file type {path.suffix!r} for {path}; use one of {_FORMS}")
    raise DatasetError(f"unknown dataset spec {spec!r} (no such file or folder); use one of {_FORMS}")


def load_dataset(spec: str, *, resolution: int | None = None) -> Dataset:
    """The whole dataset of a spec as one float32 tensor (open_dataset(...).to_dataset(): float arrays are checked
    for NaN / inf). For small sets and tests; large-set jobs use open_dataset and read rows."""
    return open_dataset(spec, resolution=resolution).to_dataset()


def check_images(arrays: DatasetArrays, *, at_least: Mapping[str, int | None] | None = None,
                 rows=None) -> DatasetArrays:
    """The checks a dataset gets where it enters a job, each failing with one DatasetError line that names the file:
    at least as many images as each named need (`at_least`, e.g. {"training.batch_size": 64}: a batch, an
    estimator's subset), and finite values (float arrays, read chunk by chunk; `rows`: only those rows). That the
    labels match the images is DatasetArrays' own check, made when the file is opened."""
    n = len(arrays)
    for what, need in (at_least or {}).items():
        if need is not None and n < int(need):
            raise DatasetError(f"{arrays.where}: {n} images, fewer than {what} ({int(need)})")
    if arrays.dtype == np.uint8:
        return arrays
    idx = np.arange(n, dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64).reshape(-1)
    step = _chunk_rows(int(np.prod(arrays.shape[1:])))
    for lo in range(0, idx.size, step):
        check_rows_finite(arrays, idx[lo:lo + step], arrays.stored_rows(idx[lo:lo + step]))
    return arrays


def check_rows_finite(arrays: DatasetArrays, idx, values) -> None:
    """DatasetError naming the file and the first image of rows `idx` whose `values` (as read: numpy or torch,
    [len(idx), ...]) hold NaN or inf."""
    flat = torch.as_tensor(values).reshape(len(idx), -1)
    finite = torch.isfinite(flat).all(dim=1)
    if not bool(finite.all()):
        first = int(np.asarray(idx)[int(torch.nonzero(~finite)[0, 0])])
        raise DatasetError(f"{arrays.where}: image {first} holds NaN or inf values")


# ---- the writer ----------------------------------------------------------------------------------------------

def _write_member(zf: zipfile.ZipFile, key: str, shape, dtype, chunks) -> None:
    """One uncompressed .npy member written from an iterator of C-ordered chunks (never the whole array)."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
              "shape": tuple(int(d) for d in shape)}
    with zf.open(f"{key}.npy", "w", force_zip64=True) as f:
        try:
            np.lib.format.write_array_header_1_0(f, header)
        except ValueError:   # a header too long for version 1.0
            np.lib.format.write_array_header_2_0(f, header)
        for c in chunks:
            f.write(np.ascontiguousarray(c, dtype=dtype).data)


def _uint8_exact(arrays: DatasetArrays) -> bool:
    """Whether every value is exactly UINT8_TABLE[u] for some u (one pass, chunk by chunk)."""
    step = _chunk_rows(int(np.prod(arrays.shape[1:])))
    for lo in range(0, len(arrays), step):
        x = arrays.rows(np.arange(lo, min(lo + step, len(arrays))))
        u = torch.round((x + 1) * 127.5)
        if not (bool(u.min() >= 0) and bool(u.max() <= 255) and torch.equal(UINT8_TABLE[u.long()], x)):
            return False
    return True


def write_npz(arrays: DatasetArrays, path, *, compact: bool = True) -> dict:
    """Write `x` [N,C,H,W], `labels` (int64, if any), `name` and `layout="NCHW"` to an uncompressed .npz
    atomically (study.atomic), streaming `x` chunk by chunk. `x` is uint8 when stored as uint8, or (compact) when
    every value is exactly u/127.5 − 1, so that open_dataset(PATH) gives back the same float32 rows; else float32
    (NaN / inf raise DatasetError). Returns {"dtype", "min", "max"} of the float values written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    src = arrays
    as_u8 = src.dtype == np.uint8 or (compact and _uint8_exact(src))
    step = _chunk_rows(int(np.prod(src.shape[1:])))
    stats = {"dtype": "uint8" if as_u8 else "float32", "min": np.inf, "max": -np.inf}

    def chunks():
        for lo in range(0, len(src), step):
            hi = min(lo + step, len(src))
            if src.dtype == np.uint8:
                u = src.stored_rows(np.arange(lo, hi))
                stats["min"] = min(stats["min"], float(UINT8_TABLE[int(u.min())]))
                stats["max"] = max(stats["max"], float(UINT8_TABLE[int(u.max())]))
                yield u
                continue
            x = src.rows(np.arange(lo, hi))
            if not bool(torch.isfinite(x).all()):
                raise DatasetError(f"{src.where}: the array contains NaN or inf values")
            stats["min"], stats["max"] = min(stats["min"], float(x.min())), max(stats["max"], float(x.max()))
            yield torch.round((x + 1) * 127.5).to(torch.uint8).numpy() if as_u8 else x.numpy()

    with atomic_path(path) as tmp, open(tmp, "wb") as fh, \
            zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        _write_member(zf, "x", src.shape, np.uint8 if as_u8 else np.float32, chunks())
        if src.labels is not None:
            lab = src.labels.detach().cpu().to(torch.int64).numpy()
            _write_member(zf, "labels", lab.shape, np.int64, [lab])
        for key, value in (("name", str(src.name)), ("layout", "NCHW")):   # layout: the loader never guesses
            v = np.array(value)
            _write_member(zf, key, v.shape, v.dtype, [v])
    return stats


def save_npz(dataset: Dataset, path, *, compact: bool = False) -> Path:
    """Write a float32 Dataset with write_npz: float32 `x` by default (`np.load(PATH)["x"]` is the dataset);
    compact=True stores images that are exactly uint8/127.5 − 1 as uint8 (4× smaller; read back with
    open_dataset / load_dataset, which give the identical float32 values)."""
    write_npz(DatasetArrays.from_dataset(dataset), path, compact=compact)
    return Path(path)


def _need(text: str) -> tuple[str, int]:
    what, _, n = text.rpartition("=")
    if not what:
        raise ValueError(text)
    return what, int(n)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.dataset",
                                 description="Materialise a dataset spec as an uncompressed .npz (x [N,C,H,W], "
                                             "labels) that open_dataset memory-maps.")
    ap.add_argument("spec", help=f"dataset spec: {_FORMS}")
    ap.add_argument("--out", required=True, help="output .npz path (written atomically)")
    ap.add_argument("--resolution", type=int, default=None, help="resize images to R×R (not float arrays)")
    ap.add_argument("--compact", action=argparse.BooleanOptionalAction, default=True,
                    help="store uint8-exact images as uint8 (default; 4x smaller than float32); --no-compact "
                         "writes float32")
    ap.add_argument("--at-least", action="append", default=[], metavar="WHAT=N",
                    help="refuse a dataset of fewer than N images, naming WHAT (e.g. training.batch_size=64)")
    add_stamp_options(ap)
    args = ap.parse_args(argv)
    try:
        needs = dict(_need(text) for text in args.at_least)
    except ValueError:
        ap.error(f"--at-least: expected WHAT=N, got {args.at_least}")
    try:
        arrays = check_images(open_dataset(args.spec, resolution=args.resolution), at_least=needs)
        stats = write_npz(arrays, args.out, compact=args.compact)
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    classes = "no labels" if arrays.labels is None else f"{arrays.num_classes} classes"
    print(f"{arrays.name}: N={len(arrays)} shape={arrays.shape[1:]} stored {stats['dtype']} "
          f"range=[{stats['min']:.4g}, {stats['max']:.4g}] {classes} -> {args.out}")
    stamp_outputs(args, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
