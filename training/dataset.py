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

The stored form and its one conversion are training.dataset_arrays'; how each kind of file is read,
training.dataset_formats'.

CLI (what Snakemake's data rule calls):  python -m training.dataset SPEC --out FILE.npz [--resolution R] [--no-compact]
writes the compact form: uint8 wherever the images are exactly u/127.5 − 1 (CIFAR, image folders, uint8 arrays
without resizing), else float32 (digits, whose values k/8 − 1 are not on that grid, resized or float data),
streamed chunk by chunk into an uncompressed .npz so that it can be memory-mapped.
"""

from __future__ import annotations

import argparse
import sys
import zipfile
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from study.atomic import atomic_path
from study.integrity import add_stamp_options, stamp_outputs, verify
from training.dataset_arrays import UINT8_TABLE, Dataset, DatasetArrays, DatasetError, chunk_rows, resize_images
from training.dataset_formats import open_array_file, read_cifar, read_digits, read_image_folder

__all__ = ["Dataset", "DatasetArrays", "DatasetError", "UINT8_TABLE", "load_dataset", "main", "open_dataset",
           "save_npz", "write_npz"]


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
    x = resize_images(arrays.float32(), resolution, arrays.where)
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
        return read_digits(resolution)
    kind, sep, rest = spec.partition(":")
    if sep and kind in ("cifar10", "imagefolder"):
        folder = Path(rest).expanduser()
        if not folder.is_dir():
            raise DatasetError(f"{kind} folder not found: {folder}")
        if kind == "cifar10":
            return _resized(read_cifar(folder), resolution)
        return read_image_folder(folder, resolution)
    path = Path(spec).expanduser()
    if path.suffix in (".npy", ".npz"):
        if not path.is_file():
            raise DatasetError(f"dataset file not found: {path}")
        verify(path)  # against PATH.sha256 where the dataset rule wrote one
        return _resized(open_array_file(path), resolution)
    if path.is_dir():
        if (path / "data_batch_1").is_file():  # pickles are read only when the spec names the format
            raise DatasetError(f"{path} holds CIFAR-10 python batches: name them as 'cifar10:{path}'")
        return read_image_folder(path, resolution)
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
    step = chunk_rows(int(np.prod(arrays.shape[1:])))
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
    step = chunk_rows(int(np.prod(arrays.shape[1:])))
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
    step = chunk_rows(int(np.prod(src.shape[1:])))
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
