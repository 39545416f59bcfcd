"""Datasets behind one interface: `load_dataset(spec) -> Dataset(x [N,C,H,W] float32, labels [N] int64 | None, name)`.

Specs (a string):
- `digits`                      sklearn's bundled 8×8 digits (1797 images, values 0..16 → [−1, 1], labels 0..9).
- `PATH.npy` / `PATH.npz`       arrays. `.npz` keys: image array under `x`, `images` or `latents` (first found),
                                labels under `labels` or `y` (optional). uint8 arrays are scaled to [−1, 1]; float
                                arrays (e.g. latents) are kept as given. Layout rule: an optional `layout` key
                                ("NCHW"/"NHWC"; save_npz writes "NCHW") decides; without it a 4-D array is NHWC —
                                and is transposed to NCHW — iff its last dim is in {1, 3, 4} and its dim 1 is not.
                                A 3-D array [N, H, W] gets one channel.
- `cifar10:DIR` (or a DIR holding `data_batch_1`)     CIFAR-10 python batches `data_batch_1..5` found in DIR.
- `imagefolder:DIR` (or any other DIR)                one sub-folder per class (labels = index in sorted names),
                                or images directly in DIR (no labels); read with Pillow as RGB, center-cropped to
                                a square and resized to `resolution` (default: the first image's cropped size).

`resolution` also resizes digits, CIFAR and uint8 arrays (antialiased bilinear); float arrays are never resized.
Every bad input raises `DatasetError` (a ValueError and FileNotFoundError) whose message names the path/shape.

CLI (what Snakemake's data rule calls):  python -m models.data SPEC --out FILE.npz [--resolution R]
"""

from __future__ import annotations

import argparse
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.atomic import atomic_path

__all__ = ["Dataset", "DatasetError", "load_dataset", "save_npz", "main"]

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


# ---- shared conversions ---------------------------------------------------------------------------------------

def _uint8_to_unit(u: np.ndarray) -> torch.Tensor:
    """uint8 0..255 → float32 [−1, 1].  save_npz relies on this being the one formula used everywhere."""
    return torch.from_numpy(np.ascontiguousarray(u)).to(torch.float32) / 127.5 - 1


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


# ---- digits ------------------------------------------------------------------------------------------------------

def _load_digits(resolution):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32))[:, None] / 8.0 - 1.0  # 0..16 → [−1, 1]
    return Dataset(_resize(x, resolution, "digits"), torch.from_numpy(d.target.astype(np.int64)), "digits")


# ---- arrays ------------------------------------------------------------------------------------------------------

def _to_nchw(a: np.ndarray, where: str, layout: str | None = None) -> np.ndarray:
    """NCHW from a 3-D/4-D array; `layout` ("NCHW"/"NHWC", stored by save_npz) overrides the guess."""
    if a.ndim == 3:
        return a[:, None]
    if a.ndim != 4:
        raise DatasetError(f"{where}: expected images [N, C, H, W] / [N, H, W, C] / [N, H, W], got shape {a.shape}")
    if layout not in (None, "NCHW", "NHWC"):
        raise DatasetError(f"{where}: layout must be 'NCHW' or 'NHWC', got {layout!r}")
    if layout is None:
        layout = "NHWC" if a.shape[-1] in _CHANNEL_SIZES and a.shape[1] not in _CHANNEL_SIZES else "NCHW"
    return a.transpose(0, 3, 1, 2) if layout == "NHWC" else a


def _array_to_dataset(a: np.ndarray, labels, name: str, where: str, resolution, layout=None) -> Dataset:
    a = _to_nchw(np.asarray(a), where, layout)
    if a.shape[0] == 0:
        raise DatasetError(f"{where}: the array holds no samples (shape {a.shape})")
    if a.dtype == np.uint8:
        x = _resize(_uint8_to_unit(a), resolution, where)
    elif np.issubdtype(a.dtype, np.floating):
        x = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
        if not torch.isfinite(x).all():
            raise DatasetError(f"{where}: the array contains NaN or inf values")
        if resolution is not None and (x.shape[-2], x.shape[-1]) != (resolution, resolution):
            # float arrays may be latents, which must not be resampled
            raise DatasetError(f"{where}: float array of shape {tuple(x.shape)} cannot be resized to "
                               f"resolution {resolution}; resize it before saving or drop --resolution")
    else:
        raise DatasetError(f"{where}: unsupported dtype {a.dtype} (use uint8 images or float arrays)")
    lab = None if labels is None else _labels(labels, x.shape[0], where)
    return Dataset(x, lab, name)


def npz_members(z, path: Path) -> tuple[str, str | None, str, str | None]:
    """(image key, label key or None, name, layout or None) of an open .npz in this module's format — the one
    rule the loader here and the trainer's memory-mapped reader share."""
    xkey = next((k for k in _X_KEYS if k in z.files), None)
    if xkey is None:
        raise DatasetError(f"{path}: no image array under any of the keys {list(_X_KEYS)} (found {z.files})")
    lkey = next((k for k in _LABEL_KEYS if k in z.files), None)
    name = str(z["name"]) if "name" in z.files and z["name"].ndim == 0 else Path(path).stem
    layout = str(z["layout"]) if "layout" in z.files else None
    return xkey, lkey, name, layout


def _load_array_file(path: Path, resolution) -> Dataset:
    try:
        if path.suffix == ".npy":
            return _array_to_dataset(np.load(path, allow_pickle=False), None, path.stem, str(path), resolution)
        with np.load(path, allow_pickle=False) as z:
            xkey, lkey, name, layout = npz_members(z, path)
            return _array_to_dataset(z[xkey], None if lkey is None else z[lkey], name, f"{path}[{xkey}]",
                                     resolution, layout)
    except DatasetError:
        raise
    except (OSError, ValueError, EOFError) as e:
        raise DatasetError(f"{path}: cannot read the array file ({e})") from e


# ---- CIFAR-10 python batches ----------------------------------------------------------------------------------

def _load_cifar(folder: Path, resolution) -> Dataset:
    files = [folder / f"data_batch_{i}" for i in range(1, 6) if (folder / f"data_batch_{i}").is_file()]
    if not files:
        raise DatasetError(f"{folder}: no CIFAR-10 batch files data_batch_1..5 found")
    xs, ys = [], []
    for f in files:
        try:
            with open(f, "rb") as fh:
                d = pickle.load(fh, encoding="bytes")
        except Exception as e:  # a truncated / non-pickle file surfaces as many exception types
            raise DatasetError(f"{f}: cannot unpickle the CIFAR-10 batch ({type(e).__name__}: {e})") from e
        if not isinstance(d, dict) or b"data" not in d or b"labels" not in d:
            raise DatasetError(f"{f}: not a CIFAR-10 batch (expected a dict with b'data' and b'labels')")
        data = np.asarray(d[b"data"])
        if data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8:
            raise DatasetError(f"{f}: b'data' must be uint8 [n, 3072], got shape {data.shape} dtype {data.dtype}")
        xs.append(data.reshape(-1, 3, 32, 32))  # CIFAR stores each image as R plane, G plane, B plane
        ys.append(_labels(np.asarray(d[b"labels"], dtype=np.int64), data.shape[0], str(f)))
    x = _resize(_uint8_to_unit(np.concatenate(xs)), resolution, str(folder))
    return Dataset(x, torch.cat(ys), "cifar10")


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


def _load_image_folder(folder: Path, resolution) -> Dataset:
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
    arrays = []
    for f, _ in items:
        try:
            with Image.open(f) as im:
                im = _center_crop_resize(im.convert("RGB"), resolution)
                arr = np.asarray(im, dtype=np.uint8)
        except (UnidentifiedImageError, OSError) as e:
            raise DatasetError(f"{f}: cannot read the image ({e})") from e
        if resolution is None:
            resolution = arr.shape[0]  # the first image fixes the size for the rest
        arrays.append(arr)
    x = _uint8_to_unit(np.stack(arrays).transpose(0, 3, 1, 2))
    labels = torch.tensor([k for _, k in items], dtype=torch.int64) if classes else None
    return Dataset(x, labels, folder.name)


# ---- the one entry point -------------------------------------------------------------------------------------

_FORMS = "'digits', PATH.npy, PATH.npz, 'cifar10:DIR', 'imagefolder:DIR' or a DIR"


def load_dataset(spec: str, *, resolution: int | None = None) -> Dataset:
    """Load a dataset from a spec string (see the module docstring for the forms)."""
    spec = str(spec)
    if resolution is not None:
        resolution = int(resolution)
        if resolution < 1:
            raise DatasetError(f"dataset {spec!r}: resolution must be >= 1, got {resolution}")
    if spec == "digits":
        return _load_digits(resolution)
    kind, sep, rest = spec.partition(":")
    if sep and kind in ("cifar10", "imagefolder"):
        folder = Path(rest).expanduser()
        if not folder.is_dir():
            raise DatasetError(f"{kind} folder not found: {folder}")
        return _load_cifar(folder, resolution) if kind == "cifar10" else _load_image_folder(folder, resolution)
    path = Path(spec).expanduser()
    if path.suffix in (".npy", ".npz"):
        if not path.is_file():
            raise DatasetError(f"dataset file not found: {path}")
        from models.integrity import verify

        verify(path)  # against PATH.sha256 where the dataset rule wrote one
        return _load_array_file(path, resolution)
    if path.is_dir():
        if (path / "data_batch_1").is_file():
            return _load_cifar(path, resolution)
        return _load_image_folder(path, resolution)
    if path.exists():
        raise DatasetError(f"unknown dataset file type {path.suffix!r} for {path}; use one of {_FORMS}")
    raise DatasetError(f"unknown dataset spec {spec!r} (no such file or folder); use one of {_FORMS}")


def save_npz(dataset: Dataset, path, *, compact: bool = False) -> Path:
    """Write `x` (float32 NCHW), `labels` (int64, if any), `name` and `layout` to PATH atomically
    (models.atomic), so `np.load(PATH)["x"]` is the dataset as loaded.

    compact=True stores images that are exactly uint8/127.5 − 1 (CIFAR, image folders, uint8 arrays) as uint8 —
    4× smaller, and `load_dataset(PATH)` gives back the identical float32 tensor; other data stays float32."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = dataset.x.detach().cpu().to(torch.float32).contiguous()
    arrays = {"x": x.numpy()}
    if compact:
        u = torch.round((x + 1) * 127.5)
        if u.numel() and u.min() >= 0 and u.max() <= 255 \
                and torch.equal(_uint8_to_unit(u.to(torch.uint8).numpy()), x):
            arrays["x"] = u.to(torch.uint8).numpy()
    if dataset.labels is not None:
        arrays["labels"] = dataset.labels.detach().cpu().to(torch.int64).numpy()
    arrays["name"] = np.array(str(dataset.name))
    arrays["layout"] = np.array("NCHW")  # so the loader never has to guess (e.g. C = 2, W = 3)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)  # a file object, so numpy never appends ".npz" to the name
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m models.data",
                                 description="Materialise a dataset spec as an .npz (x [N,C,H,W], labels).")
    ap.add_argument("spec", help=f"dataset spec: {_FORMS}")
    ap.add_argument("--out", required=True, help="output .npz path (written atomically)")
    ap.add_argument("--resolution", type=int, default=None, help="resize images to R×R (not float arrays)")
    ap.add_argument("--compact", action="store_true",
                    help="store uint8-exact images as uint8 (4x smaller; read back with load_dataset only)")
    args = ap.parse_args(argv)
    try:
        ds = load_dataset(args.spec, resolution=args.resolution)
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = save_npz(ds, args.out, compact=args.compact)
    classes = "no labels" if ds.labels is None else f"{ds.num_classes} classes"
    print(f"{ds.name}: N={ds.x.shape[0]} shape={tuple(ds.x.shape[1:])} "
          f"range=[{float(ds.x.min()):.4g}, {float(ds.x.max()):.4g}] {classes} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
