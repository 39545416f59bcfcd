"""The data side of the exact posterior (analysis.posterior): the dataset on its device, centred.

The distance GEMMs work on centred rows (distances are shift-invariant and smaller norms mean smaller rounding), and
the error bounds need the largest centred and raw norms. The centred data (rows plus their squared norm, padded to
a multiple of 8 columns so cuBLAS takes its tensor-core kernels) is refilled chunk by chunk in the first pass and
kept from the second pass on when it fits in 2 GiB, so an estimate over many batches and σ centres the data once.
"""

from __future__ import annotations

import math

import torch

_CACHE_BYTES = 2 ** 31       # the centred copy of the data is kept (per dtype) up to this size


class CentredData:
    """The dataset on its device plus its float64 mean.  The exact path works on centred rows (distances are
    shift-invariant and smaller norms mean smaller GEMM rounding): in float64 exactly, in float32 with one
    rounding that the precision bound covers.  Keeps the largest centred norm (for that bound) and, when it fits
    in _CACHE_BYTES, one centred copy per dtype with the squared norm as an extra column, so the many passes of
    an estimate (every query batch, every σ) re-centre nothing."""

    def __init__(self, x: torch.Tensor, device: torch.device):
        self.raw = x.to(device)
        self.n, self.dim = x.shape
        self.device = device
        # any shift works (distances are shift-invariant and D* adds it back), so a float32 mean will do
        self.mean = self.raw.mean(0, dtype=torch.float32).double()
        # the largest centred norm, for the precision bound: ‖r − m‖² = ‖r‖² − 2⟨r, m⟩ + ‖m‖² in two read-only
        # passes; the slack term covers the float32 cancellation (a bound needs no more)
        m32 = self.mean.float()
        sq_max, raw_sq_max, sq_err = 0.0, 0.0, 0.0
        centred_sq = []
        for c in self.raw.split(65536):
            c = c.float()
            rr = torch.linalg.vector_norm(c, dim=1).square_()
            val = rr - 2.0 * (c @ m32) + float(m32 @ m32)
            err = 1e-5 * (float(rr.max()) + float(m32 @ m32))
            sq_max, sq_err = max(sq_max, float(val.max()) + err), max(sq_err, err)
            raw_sq_max = max(raw_sq_max, float(rr.max()))
            centred_sq.append(val)
        self.norm_max = math.sqrt(max(sq_max, 0.0))
        if not (math.isfinite(self.norm_max) and bool(torch.isfinite(self.mean).all())):
            raise ValueError("data contains NaN or inf")
        # for the int8 screen, which multiplies raw rows: their squared centred norms (float32, within
        # centred_sq_err), the largest raw norm and (on first use) the largest |entry|
        self.centred_sq = torch.cat(centred_sq)
        self.centred_sq_err = sq_err
        self.raw_norm_max = math.sqrt(raw_sq_max)
        self._abs_max: float | None = None
        self._augmented: dict[torch.dtype, torch.Tensor] = {}
        self._passes: dict[torch.dtype, int] = {}

    @property
    def abs_max(self) -> float:
        """The largest |entry| of the raw data (one pass, on first use)."""
        if self._abs_max is None:
            self._abs_max = max(max(abs(float(v)) for v in torch.aminmax(c)) for c in self.raw.split(65536))
        return self._abs_max

    def chunk(self, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        return self.raw[start:stop].to(dtype) - self.mean.to(dtype)

    def rows(self, idx: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.raw.index_select(0, idx).to(dtype) - self.mean.to(dtype)

    def _fill_augmented(self, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        """Rows [start, stop) centred in out[:, :D], their squared norms in out[:, D], zeros after.  Centring
        runs in float64 for a float64 copy and in float32 otherwise, rounded once into `out` (so each entry is
        within one rounding of the centred value, as the error bounds assume); a bfloat16 copy's norms are
        those of its rounded rows (the screen's bound allows for that)."""
        work = torch.float64 if out.dtype == torch.float64 else torch.float32
        out[:, self.dim + 1:] = 0
        for b0 in range(start, stop, 8192):
            b1 = min(b0 + 8192, stop)
            dst = out[b0 - start:b1 - start]
            xc = torch.sub(self.raw[b0:b1].to(work), self.mean.to(work), out=dst[:, :self.dim])
            dst[:, self.dim] = torch.linalg.vector_norm(xc, dim=1, dtype=work).square_()
        return out

    @property
    def augmented_width(self) -> int:
        """D + 1 (rows plus their squared norm) rounded up to a multiple of 8 with zero columns: cuBLAS takes its
        tensor-core kernels only for 16-byte-aligned row strides (3,073 bfloat16 values are not)."""
        return -(-(self.dim + 1) // 8) * 8

    def augmented_chunks(self, dtype: torch.dtype, chunk: int):
        """Yield (start, [c, W] centred rows, ‖row‖², zero padding — W = augmented_width) over the dataset.  The
        first pass refills one buffer per chunk (memory O(chunk·D)); from the second pass in the same dtype on
        (more query batches, more σ) a centred copy is kept when it fits in _CACHE_BYTES and passes are views."""
        width = self.augmented_width
        cached = self._augmented.get(dtype)
        if cached is None and self._passes.get(dtype, 0) >= 1 and \
                self.n * width * torch.finfo(dtype).bits // 8 <= _CACHE_BYTES:
            cached = self._fill_augmented(0, self.n, torch.empty(self.n, width, dtype=dtype, device=self.device))
            self._augmented[dtype] = cached
        self._passes[dtype] = self._passes.get(dtype, 0) + 1
        if cached is not None:
            for start in range(0, self.n, chunk):
                yield start, cached[start:start + chunk]
            return
        buf = torch.empty(min(chunk, self.n), width, dtype=dtype, device=self.device)
        for start in range(0, self.n, chunk):
            stop = min(start + chunk, self.n)
            yield start, self._fill_augmented(start, stop, buf[:stop - start])

    def augmented_queries(self, xq: torch.Tensor, sigma: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[Q, W] rows [x/σ², −1/2σ², 0 …]: their product with the augmented data rows is the logit
        (2⟨x, x0⟩ − ‖x0‖²)/2σ², i.e. −‖x − x0‖²/2σ² up to a per-row constant that the softmax ignores."""
        inv2s2 = 0.5 / sigma ** 2
        out = torch.zeros(xq.shape[0], self.augmented_width, dtype=dtype, device=xq.device)
        out[:, :self.dim] = xq * (2.0 * inv2s2)[:, None]
        out[:, self.dim] = -inv2s2
        return out
