"""A dataset in memory: `DatasetArrays` (the images as stored — uint8, or float such as latents — with rows converted
only when asked for), `Dataset` (the whole set as one float32 tensor), `DatasetError`, and the one uint8 → float
conversion (UINT8_TABLE). Opening a dataset spec is training.dataset's; reading each kind of file,
training.dataset_formats'.

Stored form and conversion. uint8 images are kept as uint8 until a row is asked for; a row then becomes
`u/127.5 − 1` through a 256-entry float32 table computed with exactly that formula on the CPU (UINT8_TABLE), so every
reader, on every device, gives the same bits (CUDA would turn `/ 127.5` into `* (1/127.5)`). Float arrays (latents)
are kept as given and converted to float32 per row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


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


def chunk_rows(row_elements: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(1, row_elements))


def _convert(a: np.ndarray, out: torch.Tensor) -> torch.Tensor:
    """Rows `a` in their stored dtype (uint8 or float) → `out` (float32, same shape, on the CPU), chunk by chunk so
    that no temporary is larger than a chunk."""
    step = chunk_rows(int(np.prod(a.shape[1:], dtype=np.int64)))
    for lo in range(0, a.shape[0], step):
        part, dst = np.asarray(a[lo:lo + step]), out[lo:lo + step]
        if part.dtype == np.uint8:
            torch.index_select(UINT8_TABLE, 0, torch.from_numpy(part.astype(np.int64).reshape(-1)),
                               out=dst.view(-1))
        else:   # float data kept as given: one cast to float32 (numpy's, as load_dataset always did)
            dst.numpy()[...] = part
    return out


def resize_images(x: torch.Tensor, resolution: int | None, what: str) -> torch.Tensor:
    if resolution is None or (x.shape[-2] == resolution and x.shape[-1] == resolution):
        return x
    if resolution < 1:
        raise DatasetError(f"{what}: resolution must be >= 1, got {resolution}")
    out = torch.nn.functional.interpolate(x, size=(resolution, resolution), mode="bilinear",
                                          antialias=True, align_corners=False)
    return out.clamp(-1, 1).contiguous()


def checked_labels(arr, n: int, where: str) -> torch.Tensor:
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
        step = chunk_rows(int(np.prod(self.shape[1:])))
        for lo in range(0, len(self), step):
            hi = min(lo + step, len(self))
            _convert(self.stored_rows(np.arange(lo, hi)), out[lo:hi])
        return out

    def to_dataset(self, check_finite: bool = True) -> Dataset:
        x = self.float32()
        if check_finite and self.dtype != np.uint8 and not bool(torch.isfinite(x).all()):
            raise DatasetError(f"{self.where}: the array contains NaN or inf values")
        return Dataset(x, self.labels, self.name)
