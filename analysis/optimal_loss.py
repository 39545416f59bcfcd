"""The optimal diffusion loss J*(σ) of a dataset and its optimal denoiser D*(x) (docs/science.md, "The formulas").

Everything is in VE-x0 coordinates: a noisy point is x = x0 + σ·ε and the loss is the per-dimension mean
‖D(x) − x0‖²/D, so one curve J*(σ) serves every process and target (see models.diffusion.to_process_curve).

Public API
----------
posterior_mean(data, x_noisy, sigma, *, labels=None, noisy_labels=None) -> tensor
    The exact posterior mean D*(x) = Σ_n softmax_n(−‖x − x0_n‖²/2σ²)·x0_n of the empirical distribution.
estimate_optimal_loss(data, sigmas, *, estimator="full", labels=None, n_samples=None, subset_size=None, C=None,
                      seed=0, device=None) -> pandas.DataFrame
    J*(σ) on a σ grid with one of the estimators `full`, `dol`, `cdol`, `snis` (docs/science.md).
eval_noise(shape, seeds) -> tensor
    The ε of the study's fixed evaluation set (docs/internals.md).

CLI
---
python -m analysis.optimal_loss --dataset SPEC --estimator {full,dol,cdol,snis,all} --out jstar.csv [...]
python -m analysis.optimal_loss denoise --dataset dataset.npz --eval-set eval_set.npz --out eval_denoised.npy

Numerics (how the exact posterior stays exact and fast)
------------------------------------------------------
* Data are streamed in chunks with a running max / log-sum-exp (as in flash-attention): memory is
  O(Q·D + Q·chunk), never Q×N.
* Squared distances come from one GEMM: ‖x‖² − 2⟨x, x0⟩ + ‖x0‖² (the data are centred first, which shrinks the
  norms and so the cancellation).  The GEMM's rounding error is at most ~√D·u·‖x‖·‖x0‖ (u = 2⁻²⁴ in float32;
  measured: < 5·u·‖x‖·‖x0‖ for D ≤ 3072), and a logit error δ turns into a relative weight error of δ.  For every
  query row we bound δ = (√D·2‖x‖‖x0‖max + 4(‖x‖² + ‖x0‖²max))·u / (2σ²); rows with δ ≤ 0.01 nats run entirely
  in float32 (a weight error of 1% moves the direct J* only at second order, ≲1e-4 relative), the others
  (small σ: there the logits are ~D/σ² ≈ 1e9 and float32 would be wrong by many nats) run in float64, where the
  same bound is ~1e-8 nats even at σ = 0.002.  TF32 is switched off around the GEMM.
* The second product, Σ p_n·x0_n, only touches the rows and data points whose weight is within e^-50 of the
  row's running maximum: at small and intermediate σ the posterior is nearly one-hot and this GEMM all but
  vanishes, so the cost is one distance GEMM; at large σ (dense posterior) it is two.
* The screen (_screened_posterior) makes concentrated posteriors cheaper still: the same product in a cheap
  precision — bfloat16 on CUDA (tensor cores, ~15× the float32 rate); on the CPU int8 through fbgemm for large
  batches with a source hint (~1.6× the float32 rate), else float32 for the rows that would otherwise need
  float64 — gives every logit within a rigorous bound B (rounding or quantisation of both operands, of the norms,
  of float32 accumulation, of the result; tests check each bound entry by entry).  Points
  whose logit cannot come within 50 nats of the row maximum are dropped (< e^-50 of the top weight each); the
  few left get exact logits −‖x − x0‖²/2σ² from float64 differences, with no cancellation at any σ.  Rows with
  more than max(256, N/32) candidates (dense posteriors, large σ) go to the streaming path; once a batch at some
  σ finished < 10% of its rows, later batches at that σ skip the screen.  _SCREEN = "off" disables it.
* The centred data (rows plus their squared norm, padded to a multiple of 8 columns so cuBLAS takes its
  tensor-core kernels) is refilled chunk by chunk in the first pass and kept from the second pass on when it
  fits in 2 GiB, so an estimate over many batches and σ centres the data once.

Estimators (B = E‖D̂‖², M noisy samples x_m = x0_{n_m} + σ ε_m)
------------------------------------------------------------
* `full`: the exact D* over all N points.  J* = mean_m ‖D*(x_m) − x0_m‖²/D (the "direct" form: never negative
  and lower variance than A − B; both agree in expectation because E⟨x0, D*⟩ = E‖D*‖²; both are reported).
* `snis`: D̂ is the softmax over a random subset of L points (the source is usually missing at small σ).
* `dol`: the source plus L − 1 other random points.  Biased: overestimates B, underestimates J*.
* `cdol`: DOL with log C added to the non-source logits (our reading of the paper's Eq. 11):
  C = 1 is DOL, C → ∞ is SNIS on L − 1 points; default C = 4N/L (the paper's).
  For the subset estimators J* = mean_m (‖x0_m‖² − ‖D̂_m‖²)/D, the paper's A − B form, with A paired per sample
  (the sources are balanced: every point is used ⌊M/N⌋ or ⌈M/N⌉ times, so when N divides M the paired A is the
  exact dataset A) and in centred coordinates — both are variance reductions that leave the exact estimator's
  expectation unchanged.
* `cdol-nn` (ours, not in the paper): the source's K = min(64, (L−1)/4) nearest neighbours (a kNN graph built
  once per dataset, O(N²D)) are enumerated exactly, the other L − 1 − K points are a random subset of the rest
  weighted by C = (N−1−K)/(its size) (stratified sampling: unbiased numerator and denominator of D*), and
  ‖D̂‖² is corrected by the delta-method estimate of tr Var(D̂) from the subset.  In the bias study
  (benchmarks/estimator_bias.py) it removes most of the large-σ bias (≈ −variance/L for every subset
  estimator) and much of the small-σ one; a bias of ~10% remains near the critical σ at L = N/16.
* Random numbers: sources, ε and subsets come from generators seeded by (seed, block of 64 samples), so the
  numbers do not depend on chunk or batch size, and the same ε / sources / subsets are reused for every σ and
  every estimator (common random numbers: smooth, monotone curves and paired estimator comparisons).  Sources
  and subsets are drawn on the CPU; ε on the data's device (on a GPU the CPU generator would cost ~10× the
  distance GEMM), so a CUDA run draws other ε than a CPU run with the same seed: same numbers per device type,
  agreement across types within the standard error.
  Subsets are shared by the 64 samples of a block; stderr is the plain std/√M over samples (it ignores that
  sharing, so it is slightly optimistic for the subset estimators).
* Default M (n_samples): min(max(2N, 1024), max(256, 2^39 / (K·D))) with K = N (full) or L (subsets): the paper's
  "M ≈ 2–3 N", capped at ~5·10^11 multiply-adds per σ.  Default L: clip(N/20, 64, 4096), at most N.
* Class-conditional J* (`labels`): each class is its own dataset (the posterior sum runs over the sample's class
  only); J* = Σ_c (N_c/N)·J*_c, with M_c = ⌈M·N_c/N⌉ samples and the class's own default L and C.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from analysis.evaluate import eval_noise, load_eval_set  # the eval set's ε and reader: evaluate.py's
from models.atomic import atomic_path

__all__ = ["posterior_mean", "estimate_optimal_loss", "eval_noise", "ESTIMATORS", "EXTRA_ESTIMATORS", "main"]

ESTIMATORS = ("full", "dol", "cdol", "snis")    # the paper's four (the CLI's "all")
EXTRA_ESTIMATORS = ("cdol-nn",)                  # ours: cDOL with the source's nearest neighbours stratified out

_U32 = 2.0 ** -24            # float32 unit roundoff
_F32_LOGIT_TOL = 1e-2        # max logit error (nats) accepted from the float32 path
_NEGLIGIBLE_NATS = 50.0      # weights below e^-50 of the row max are skipped in the value GEMM
_EXP_FLOOR = _NEGLIGIBLE_NATS + 30.0  # logits below max − 80 count as e^-80 (≤ N·1e-35 of the sum)
_RNG_BLOCK = 64              # samples per random-number block (fixes the streams independent of batching)
_FULL_BATCH_BLOCKS = 16      # the full estimator processes 16 blocks (1024 queries) per pass over the data
_COST_BUDGET = 2 ** 39       # multiply-adds per σ that the default n_samples aims at
_CACHE_BYTES = 2 ** 31       # the centred copy of the data is kept (per dtype) up to this size
_SCREEN = "auto"             # screening (_screened_posterior): "auto" (by device), "bfloat16" / "int8" / "float32"
                             # (forced), "off"
_INT8_OK: bool | None = None  # fbgemm's int8 GEMM works here (probed on first use)
_INT8_MIN_GEMM = 2 ** 28     # multiply-adds per batch above which the CPU screens in int8
_SCREEN_MAX_FRACTION = 32    # a screened row with more than N/32 candidates goes to the streaming path …
_SCREEN_MIN_CANDIDATES = 256  # … or more than this, whichever is larger


# --------------------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _no_tf32():
    """Full-precision matmuls for the distance GEMM: float32 without TF32 / bf16 shortcuts, and bfloat16 (the
    screen) with float32 reductions (cuBLAS may otherwise reduce split-K partial sums in bfloat16, which the
    screen's error bound does not cover); restores the settings."""
    m = torch.backends.cuda.matmul
    old = (m.allow_tf32, m.allow_bf16_reduced_precision_reduction, torch.get_float32_matmul_precision())
    m.allow_tf32 = False
    m.allow_bf16_reduced_precision_reduction = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        m.allow_tf32, m.allow_bf16_reduced_precision_reduction = old[0], old[1]
        torch.set_float32_matmul_precision(old[2])


@contextlib.contextmanager
def _single_thread_if_small(device: torch.device, gemm_size: int):
    """One CPU thread when each GEMM is small (subset estimators, or a dataset as small as digits): thread
    start-up costs more than the work, and on a busy 2-core machine two threads ran 3-4× slower than one."""
    old = torch.get_num_threads()
    if device.type == "cpu" and gemm_size < 2 ** 28:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} requested but CUDA is not available on this machine")
    return dev


def _as_matrix(data, name: str = "data", check_finite: bool = True) -> torch.Tensor:
    """[N, …] numpy/torch → [N, D] float tensor (float64 stays float64, everything else becomes float32)."""
    t = torch.as_tensor(data) if not isinstance(data, torch.Tensor) else data
    if t.ndim < 1 or t.shape[0] == 0:
        raise ValueError(f"{name} must be an array [N, ...] with N >= 1, got shape {tuple(t.shape)}")
    t = t.reshape(t.shape[0], -1)
    if t.shape[1] == 0:
        raise ValueError(f"{name} has no features (shape {tuple(t.shape)})")
    t = t.to(torch.float64 if t.dtype == torch.float64 else torch.float32)
    if check_finite and not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or inf")
    return t


def _as_labels(labels, n: int, name: str) -> torch.Tensor:
    lab = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels).reshape(-1)
    if lab.numel() != n:
        raise ValueError(f"{name} has {lab.numel()} entries but there are {n} points")
    if lab.is_floating_point() and not torch.equal(lab, lab.round()):
        raise ValueError(f"{name} must be integer class ids")
    return lab.to(torch.int64).cpu()


def _seed_of(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (numpy SeedSequence), so nearby seeds give unrelated streams."""
    return int(np.random.SeedSequence([int(p) % (2 ** 63) for p in parts]).generate_state(1, np.uint64)[0] >> 1)


class _Data:
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


# --------------------------------------------------------------------------------------------------------
# the exact posterior: streaming log-sum-exp over data chunks
# --------------------------------------------------------------------------------------------------------

def _logit_error_bound(xq: torch.Tensor, sigma: torch.Tensor, data: _Data) -> torch.Tensor:
    """Worst-case float32 logit error per query row (nats): GEMM rounding ~√D·u·‖x‖‖x0‖ (×2 in the distance)
    plus the rounding of the norm terms and of the max subtraction, all divided by 2σ²."""
    xn = xq.norm(dim=1)
    err_dist = _U32 * (2.0 * math.sqrt(data.dim) * xn * data.norm_max + 4.0 * (xn ** 2 + data.norm_max ** 2))
    return err_dist / (2.0 * sigma ** 2)


def _default_chunk(device: torch.device, q: int, dim: int, n: int) -> int:
    """Data points per chunk: the [Q, chunk] logits ≤ 64 MB (CPU) / 1 GB (GPU) and the [chunk, D] centred copy
    ≤ 128 MB / 1 GB, at least 256 points (GEMM-sized); then evened out so the last chunk is not a sliver."""
    cap = 2 ** 24 if device.type == "cpu" else 2 ** 28
    chunk = int(max(256, min(65536, cap // max(q, 1), (cap * 2) // (dim + 1))))
    pieces = -(-n // chunk)
    return -(-n // pieces)


def _stream_posterior(data: _Data, xq: torch.Tensor, sigma: torch.Tensor, dtype: torch.dtype,
                      chunk: int, init_max: torch.Tensor | None = None) -> torch.Tensor:
    """D*(x) (centred coords, float64 [Q, D]) for queries xq [Q, D] (float64, centred), σ [Q] (float64),
    doing the distance GEMM, logits and weights in `dtype` and the running (max, sum, numerator) in float64.

    The logit −‖x − x0‖²/2σ² is, up to a per-row constant that the softmax ignores, (2⟨x, x0⟩ − ‖x0‖²)/2σ²:
    one GEMM of the augmented rows [x0, ‖x0‖²] · [x/σ², −1/2σ²] gives it with no elementwise pre-pass.  The
    product is laid out [chunk, Q] (data-major): MKL runs that orientation ~15% faster than [Q, chunk].
    `init_max` (optional, float64 [Q]): the logit, in that convention, of one known data point per row (e.g. the
    source of x): seeding the running max with it lets chunks that hold nothing near x skip the value GEMM."""
    q, dim = xq.shape
    x_aug = data.augmented_queries(xq, sigma, dtype)
    run_max = torch.full((q,), -math.inf, dtype=torch.float64, device=xq.device) if init_max is None else \
        init_max.clone()
    run_sum = torch.zeros(q, dtype=torch.float64, device=xq.device)
    acc = torch.zeros(q, dim, dtype=torch.float64, device=xq.device)
    for _, xc_aug in data.augmented_chunks(dtype, chunk):
        with _no_tf32():
            logits = xc_aug @ x_aug.T                                     # the GEMM: [chunk, Q]
        chunk_max = logits.amax(dim=0).double()
        new_max = torch.maximum(run_max, chunk_max)
        rescale = torch.exp(run_max - new_max)                            # exp(-inf) = 0 on the first chunk
        # weights relative to the running max; the clamp keeps exp off its (very slow) underflow path
        p = logits.sub_(new_max.to(dtype)[None, :]).clamp_(min=-_EXP_FLOOR).exp_()
        run_sum = run_sum * rescale + p.sum(dim=0).double()          # ≤ 1e-6 relative in float32: fine
        acc.mul_(rescale[:, None])
        run_max = new_max
        # value GEMM only over rows / points that carry weight (near one-hot posteriors skip almost all)
        rows = torch.nonzero(chunk_max >= new_max - _NEGLIGIBLE_NATS).squeeze(1)
        if rows.numel() == 0:
            continue
        pr = p.index_select(1, rows) if rows.numel() < q else p          # [chunk, rows]
        cols = torch.nonzero(pr.amax(dim=1) > math.exp(-_NEGLIGIBLE_NATS)).squeeze(1)
        xv = xc_aug[:, :dim]
        if cols.numel() < pr.shape[0]:
            pr, xv = pr.index_select(0, cols), xv.index_select(0, cols)
        with _no_tf32():
            contrib = (pr.T @ xv).double()
        if rows.numel() < q:
            acc.index_add_(0, rows, contrib)
        else:
            acc.add_(contrib)
    return acc / run_sum[:, None]


def _screen_bound(xq: torch.Tensor, sigma: torch.Tensor, data: _Data, dtype: torch.dtype) -> torch.Tensor:
    """A rigorous bound (nats) on |screened logit − exact logit| per query row when the augmented GEMM runs on
    operands rounded to `dtype` (bfloat16 or float32) with float32 accumulation and a `dtype` result.

    The logit is Σ_i a_i·x_i/σ² − ‖a‖²/2σ², whose terms sum in absolute value to at most
    M = (‖a‖max·‖x‖ + ‖a‖²max/2)/σ² (Cauchy–Schwarz).  Rounding both operands costs ≤ (2u + u²)·M, the norm column
    (itself computed from rounded data) ≤ 4u·M, accumulating D + 1 products in float32 ≤ (D + 1)·2⁻²³·M (twice the
    worst case), rounding the result ≤ u·M.  Loose by design: it only has to certify far-away points."""
    u = 2.0 ** -8 if dtype == torch.bfloat16 else _U32
    m = (data.norm_max * xq.norm(dim=1) + 0.5 * data.norm_max ** 2) / sigma ** 2
    return (7.0 * u + (data.dim + 1) * 2.0 ** -23) * m


def _int8_available() -> bool:
    """Whether this torch build runs fbgemm's int8 GEMM (torch.ops.quantized.linear_dynamic) on the CPU; probed
    once on a tiny product.  Where it does not (other builds, a future torch without these ops), the CPU screen
    falls back to float32."""
    global _INT8_OK
    if _INT8_OK is None:
        try:
            a = torch.linspace(-1, 1, 64).reshape(4, 16)
            packed, _ = _int8_pack_queries(a.double()[:2])
            y = torch.ops.quantized.linear_dynamic(a, packed, True)
            _INT8_OK = bool(torch.allclose(y, a @ a[:2].T, atol=0.2))
        except Exception:  # noqa: BLE001 — any failure means: no int8 screen
            _INT8_OK = False
    return _INT8_OK


def _int8_query_scale(xq: torch.Tensor) -> torch.Tensor:
    """The per-row symmetric int8 step of the queries, max|x|/127 (float64 [Q])."""
    return (xq.float().abs().amax(dim=1).double() / 127).clamp_(min=1e-30)


def _int8_pack_queries(xq: torch.Tensor):
    """Queries [Q, D] as fbgemm int8 weights: step _int8_query_scale, round to nearest (error ≤ half a step per
    entry).  Returns (packed weights, steps [Q] float64)."""
    x32 = xq.float().contiguous()
    scale = _int8_query_scale(xq)
    with warnings.catch_warnings():   # torch marks quantized-tensor constructors deprecated; the ops still run
        warnings.simplefilter("ignore")
        wq = torch.quantize_per_channel(x32, scale, torch.zeros(x32.shape[0], dtype=torch.int64), 0, torch.qint8)
    return torch.ops.quantized.linear_prepack(wq, None), scale


def _int8_screen_bound(xq: torch.Tensor, sigma: torch.Tensor, data: _Data, scale: torch.Tensor) -> torch.Tensor:
    """A rigorous bound (nats) on |screened − exact logit| per query row for the int8 screen, which multiplies raw
    data rows a (fbgemm quantises them per chunk: 7-bit, so each entry is off by at most one step ≤ 2·max|a|/127,
    whatever zero point it picks) by the int8 queries x (off by ≤ half their own step) and subtracts the float32
    centred norms:  |Δ⟨x, a⟩| ≤ e_a‖x‖₁ + (s_x/2)(‖a‖₁ + D·e_a) with ‖a‖₁ ≤ √D‖a‖₂, plus float32 rounding of the
    dequantised product and of the logit, plus the error of the norms."""
    inv2s2 = 0.5 / sigma ** 2
    e_a = 2.0 * data.abs_max / 127
    half_step = 0.5 * scale * (1 + 1e-5) + _U32 * xq.abs().amax(dim=1)          # + the float32 cast of x
    l1_a = math.sqrt(data.dim) * data.raw_norm_max
    d_dot = e_a * xq.abs().sum(dim=1) + half_step * (l1_a + data.dim * e_a)
    dot_max = (xq.norm(dim=1) + math.sqrt(data.dim) * half_step) * (data.raw_norm_max + math.sqrt(data.dim) * e_a)
    rounding = 8 * _U32 * (2 * dot_max + data.norm_max ** 2)
    return inv2s2 * (2 * d_dot + rounding + data.centred_sq_err)


def _screen_logits(data: _Data, xq: torch.Tensor, sigma: torch.Tensor, dtype: torch.dtype, chunk: int):
    """Yield (start, [chunk, Q] screened logits) and return nothing; see _screened_posterior.  For bfloat16 /
    float32 the augmented GEMM of centred rows; for int8 (torch.int8) fbgemm's product of the raw rows with the
    int8 queries, less the centred norms — those logits are the centred ones plus ⟨x, mean⟩/σ² per row."""
    if dtype != torch.int8:
        x_aug = data.augmented_queries(xq, sigma, dtype)
        for start, xc_aug in data.augmented_chunks(dtype, chunk):
            with _no_tf32():
                yield start, xc_aug @ x_aug.T
        return
    packed, _ = _int8_pack_queries(xq)
    inv2s2 = (0.5 / sigma ** 2).float()
    for start in range(0, data.n, chunk):
        stop = min(start + chunk, data.n)
        approx = torch.ops.quantized.linear_dynamic(data.raw[start:stop].float(), packed, True)  # ⟨a_raw, x⟩
        yield start, approx.mul_(2.0 * inv2s2[None, :]).addr_(data.centred_sq[start:stop], inv2s2, alpha=-1.0)


def _screened_posterior(data: _Data, xq: torch.Tensor, sigma: torch.Tensor, dtype: torch.dtype, chunk: int,
                        init_max: torch.Tensor | None, max_candidates: int):
    """Exact D*(x) by screening, for the rows whose posterior is concentrated (most rows at small and
    intermediate σ): (1) the augmented GEMM in a cheap `dtype` (bfloat16 on a GPU's tensor cores) gives every
    logit within a rigorous bound B (_screen_bound); (2) every point whose logit cannot be within
    _NEGLIGIBLE_NATS of the row's maximum is dropped — it carries < e^-50 of the top weight; (3) the few
    candidates left get their exact logits −‖x − x0‖²/2σ² from float64 differences (no cancellation at any σ)
    and an exact softmax.  Returns (D* [Q, D] float64 centred, done [Q] bool); rows with more than
    `max_candidates` candidates (dense posteriors) are left undone for the streaming path."""
    q, dim = xq.shape
    dev = xq.device
    inv2s2 = 0.5 / sigma ** 2
    if dtype == torch.int8:
        bound = _int8_screen_bound(xq, sigma, data, _int8_query_scale(xq))
        shift = (xq @ data.mean) / sigma ** 2                                # int8 logits − centred logits
    else:
        bound, shift = _screen_bound(xq, sigma, data, dtype), 0.0            # [Q] float64
    lower = torch.full((q,), -math.inf, dtype=torch.float64, device=dev) if init_max is None else init_max + shift
    dense = torch.zeros(q, dtype=torch.bool, device=dev)
    empty = torch.empty(0, dtype=torch.int64, device=dev)
    n_idx, q_idx, approx_kept = empty, empty, torch.empty(0, dtype=torch.float64, device=dev)
    counts = torch.zeros(q, dtype=torch.int64, device=dev)

    def survivors(n_idx, q_idx, approx_kept):
        """The candidates that can still matter under the current lower bound (and whose row is not dense)."""
        sel = (approx_kept >= lower[q_idx] - _NEGLIGIBLE_NATS - 2.0 * bound[q_idx]) & ~dense[q_idx]
        return n_idx[sel], q_idx[sel], approx_kept[sel]

    for start, approx in _screen_logits(data, xq, sigma, dtype, chunk):     # [chunk, Q] screened logits
        # the true row maximum is at least max(approx − B); a point can matter only if approx + B ≥ that − 50
        lower = torch.maximum(lower, approx.amax(dim=0).double() - bound)
        threshold = (lower - _NEGLIGIBLE_NATS - 2.0 * bound).masked_fill_(dense, math.inf).float()
        keep = approx >= threshold[None, :]
        # rows with too many candidates go to the streaming path before their pairs are materialised (the
        # limit is loose: without a hint, early chunks keep points that later ones rule out); the per-row count
        # costs ~15× the total one, so it runs only when the total says some row may be over
        if int(torch.count_nonzero(keep)) > 4 * max_candidates:
            over = counts + torch.count_nonzero(keep, dim=0) > 4 * max_candidates
            dense |= over
            keep &= ~over[None, :]
        n_new, q_new = keep.nonzero(as_tuple=True)
        del keep
        # candidates kept against an earlier, weaker lower bound are filtered again with the current one
        n_idx, q_idx, approx_kept = survivors(torch.cat([n_idx, n_new + start]), torch.cat([q_idx, q_new]),
                                              torch.cat([approx_kept, approx[n_new, q_new].double()]))
        counts = torch.bincount(q_idx, minlength=q)
        dense |= counts > 4 * max_candidates
        del approx
    dense |= counts > max_candidates
    n_idx, q_idx, _ = survivors(n_idx, q_idx, approx_kept)
    # exact logits of the candidates from float64 differences, in pieces of ≤ 2^22 numbers
    logit = torch.empty(n_idx.numel(), dtype=torch.float64, device=dev)
    step = max(1, 2 ** 22 // dim)
    for b in range(0, n_idx.numel(), step):
        diff = data.rows(n_idx[b:b + step], torch.float64) - xq.index_select(0, q_idx[b:b + step])
        logit[b:b + step] = diff.square_().sum(1).mul_(-inv2s2.index_select(0, q_idx[b:b + step]))
    row_max = torch.full((q,), -math.inf, dtype=torch.float64, device=dev)
    row_max.scatter_reduce_(0, q_idx, logit, reduce="amax")
    w = torch.exp(logit - row_max[q_idx])
    total = torch.zeros(q, dtype=torch.float64, device=dev).index_add_(0, q_idx, w)
    num = torch.zeros(q, dim, dtype=torch.float64, device=dev)
    for b in range(0, n_idx.numel(), step):
        num.index_add_(0, q_idx[b:b + step], data.rows(n_idx[b:b + step], torch.float64) * w[b:b + step, None])
    done = ~dense & (total > 0)
    return num / total.clamp(min=1e-300)[:, None], done


def _screen_dtype(data: _Data, fast: torch.Tensor, hinted: bool) -> tuple[torch.dtype | None, torch.Tensor]:
    """Which rows are screened, and in which precision: on CUDA every row in bfloat16 (tensor cores: ~15× the
    float32 rate); on the CPU every row in int8 when fbgemm is there, the batch's GEMM is large and each query
    comes with a hint (~1.6× the float32 rate, quantisation included; without a hint the first chunks of a
    multi-chunk pass cannot rule out enough points at intermediate σ and the screen would only add its GEMM),
    else the rows that would otherwise need a float64 GEMM in float32 (a float32 screen plus float64 candidates
    beats a float64 GEMM ~2×)."""
    every = torch.ones_like(fast)
    forced = {"bfloat16": torch.bfloat16, "int8": torch.int8, "float32": torch.float32}
    if _SCREEN == "off":
        return None, torch.zeros_like(fast)
    if _SCREEN in forced:
        return forced[_SCREEN], every
    if data.device.type == "cuda":
        return torch.bfloat16, every
    if hinted and fast.numel() * data.n * data.dim >= _INT8_MIN_GEMM and _int8_available():
        return torch.int8, every
    return torch.float32, ~fast


def _posterior_centred(data: _Data, xq: torch.Tensor, sigma: torch.Tensor, chunk: int | None,
                       hint: torch.Tensor | None = None, screen_log: list | None = None) -> torch.Tensor:
    """Exact D* for a batch of queries: screened rows first (_screened_posterior), then the rest streamed in
    float32 where the precision bound allows and float64 elsewhere (module docstring).
    `hint` [Q] (optional): the index of a data point near each query (its source), a speed hint only.
    `screen_log` (optional): a list shared by the batches of one σ; each screened batch appends the fraction of
    rows the screen finished, and once one finished fewer than 10% (dense posteriors, large σ) the later
    batches skip the screen (it would only add its GEMM)."""
    out = torch.empty_like(xq, dtype=torch.float64)
    init = None
    if hint is not None:   # exact logit of the hinted point, in _stream_posterior's convention
        x_h = data.rows(hint, torch.float64)
        init = ((xq ** 2).sum(1) - ((xq - x_h) ** 2).sum(1)) * (0.5 / sigma ** 2)
    fast = _logit_error_bound(xq, sigma, data) <= _F32_LOGIT_TOL
    todo = torch.ones_like(fast)
    screen_dtype, screened = _screen_dtype(data, fast, hinted=init is not None)
    if screen_log and min(screen_log) < 0.1:
        screened = torch.zeros_like(screened)
    idx = torch.nonzero(screened).squeeze(1)
    if idx.numel() > 0:
        ch = chunk or _default_chunk(data.device, idx.numel(), data.dim, data.n)
        cap = max(_SCREEN_MIN_CANDIDATES, data.n // _SCREEN_MAX_FRACTION)
        den, done = _screened_posterior(data, xq[idx], sigma[idx], screen_dtype, ch,
                                        None if init is None else init[idx], cap)
        out[idx[done]] = den[done]
        todo[idx[done]] = False
        if screen_log is not None:
            screen_log.append(float(done.double().mean()))
    for mask, dtype in ((fast & todo, torch.float32), (~fast & todo, torch.float64)):
        idx = torch.nonzero(mask).squeeze(1)
        if idx.numel() == 0:
            continue
        ch = chunk or _default_chunk(data.device, idx.numel(), data.dim, data.n)
        if idx.numel() == xq.shape[0]:
            return _stream_posterior(data, xq, sigma, dtype, ch, init)
        out[idx] = _stream_posterior(data, xq[idx], sigma[idx], dtype, ch, None if init is None else init[idx])
    return out


def _as_sigma_rows(sigma, q: int, device) -> torch.Tensor:
    s = torch.as_tensor(sigma, dtype=torch.float64)
    if s.ndim == 0:
        s = s.expand(q)
    s = s.reshape(-1)
    if s.numel() != q:
        raise ValueError(f"sigma must be a float or have one entry per noisy point ({q}), got {s.numel()}")
    if not bool((s > 0).all()) or not bool(torch.isfinite(s).all()):
        raise ValueError(f"sigma must be finite and > 0, got range [{s.min().item()}, {s.max().item()}]")
    return s.to(device)


def posterior_mean(data, x_noisy, sigma, *, labels=None, noisy_labels=None, chunk_size: int | None = None,
                   device=None, batch_size: int = 4096, source_index=None) -> torch.Tensor:
    """Exact D*(x) = E[x0 | x] under the empirical distribution of `data`, for VE noisy points x = x0 + σ·ε.

    data [N, …]; x_noisy [Q, …] with the same trailing size; sigma a float or a tensor [Q]; with `labels` [N] and
    `noisy_labels` [Q] the posterior of each noisy point runs over its own class only.  Returns a float64 tensor
    shaped like x_noisy (on `device`, default the CPU).  Streams the data in chunks of `chunk_size` points.
    `source_index` [Q] (optional): the index of the point each x was made from — a speed hint (the result is the
    same up to rounding); with labels, the index into the whole data set."""
    dev = _resolve_device(device)
    x0 = _as_matrix(data, "data", check_finite=False)   # _Data's mean / norms catch NaN and inf
    x_shape = tuple(np.shape(x_noisy))
    xq = _as_matrix(x_noisy, "x_noisy").double()
    if xq.shape[1] != x0.shape[1]:
        raise ValueError(f"x_noisy has {xq.shape[1]} features per point but data has {x0.shape[1]}")
    if (labels is None) != (noisy_labels is None):
        raise ValueError("posterior_mean: give both labels and noisy_labels (class-conditional) or neither")
    if chunk_size is not None and int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    q = xq.shape[0]
    sig = _as_sigma_rows(sigma, q, "cpu")
    out = torch.empty(q, x0.shape[1], dtype=torch.float64, device=dev)
    if labels is None:
        groups = [(None, torch.arange(q))]
    else:
        lab = _as_labels(labels, x0.shape[0], "labels")
        qlab = _as_labels(noisy_labels, q, "noisy_labels")
        missing = set(qlab.unique().tolist()) - set(lab.unique().tolist())
        if missing:
            raise ValueError(f"noisy_labels contain classes with no data points: {sorted(missing)[:10]}")
        groups = [(c, torch.nonzero(qlab == c).squeeze(1)) for c in qlab.unique().tolist()]
    hint_all = None
    if source_index is not None:
        hint_all = torch.as_tensor(np.asarray(source_index), dtype=torch.int64).reshape(-1)
        if hint_all.numel() != q or (q and (hint_all.min() < 0 or hint_all.max() >= x0.shape[0])):
            raise ValueError(f"source_index must hold {q} indices in [0, {x0.shape[0]})")
    for c, rows in groups:
        members = None if c is None else torch.nonzero(lab == c).squeeze(1)
        d = _Data(x0 if c is None else x0[members], dev)
        position = None
        if hint_all is not None and members is not None:   # whole-data index → index within the class
            position = torch.full((x0.shape[0],), -1, dtype=torch.int64)
            position[members] = torch.arange(members.numel())
        for b in range(0, rows.numel(), batch_size):
            r = rows[b:b + batch_size]
            xc = xq[r].to(dev) - d.mean
            hint = None
            if hint_all is not None:
                hint = hint_all[r] if position is None else position[hint_all[r]]
                hint = None if bool((hint < 0).any()) else hint.to(dev)   # a hint from another class: ignore
            out[r.to(dev)] = _posterior_centred(d, xc, sig[r].to(dev), chunk_size, hint) + d.mean
    return out.reshape(x_shape)


# --------------------------------------------------------------------------------------------------------
# Monte-Carlo estimators of J*(σ)
# --------------------------------------------------------------------------------------------------------

def _default_subset_size(n: int) -> int:
    return int(min(n, max(64, min(4096, n // 20))))


def _default_n_samples(n: int, k: int, dim: int) -> int:
    return int(min(max(2 * n, 1024), max(256, _COST_BUDGET // max(k * dim, 1))))


def _balanced_sources(n: int, m: int, seed: int) -> torch.Tensor:
    """m source indices in which every point appears ⌊m/n⌋ or ⌈m/n⌉ times (stratified over the dataset)."""
    g = torch.Generator().manual_seed(_seed_of(seed, 0x5EED))
    reps = -(-m // n)
    return torch.cat([torch.randperm(n, generator=g) for _ in range(reps)])[:m]


def _block_noise(seed: int, block: int, rows: int, dim: int, device: torch.device) -> torch.Tensor:
    """ε of one block of samples, drawn on the data's device: on a GPU the CPU generator would cost ~10× the
    distance GEMM itself.  CUDA's generator (Philox) draws other numbers than the CPU's from the same seed."""
    g = torch.Generator(device=device).manual_seed(_seed_of(seed, block, 1))
    return torch.randn(rows, dim, generator=g, dtype=torch.float64, device=device)


def _block_subset(seed: int, block: int, n: int, size: int) -> torch.Tensor:
    """A uniform random subset of `size` of range(n), in random order (the order matters: DOL drops the last)."""
    g = torch.Generator().manual_seed(_seed_of(seed, block, 2))
    if 4 * size > n:
        return torch.randperm(n, generator=g)[:size]
    # small subsets of a large set: draw with replacement until `size` distinct ones, O(size) not O(n)
    picked = torch.unique(torch.randint(0, n, (size + size // 4 + 16,), generator=g))
    while picked.numel() < size:
        picked = torch.unique(torch.cat([picked, torch.randint(0, n, (size,), generator=g)]))
    return picked[torch.randperm(picked.numel(), generator=g)[:size]]   # a uniform subset, shuffled


def _subset_logits(data: _Data, xq: torch.Tensor, sigma: float, subset: torch.Tensor) -> torch.Tensor:
    """Logits −‖x − x0_s‖²/2σ² of the queries against one subset, float64 [B, L] (float32 GEMM when safe)."""
    sig = torch.full((xq.shape[0],), sigma, dtype=torch.float64, device=xq.device)
    safe = bool((_logit_error_bound(xq, sig, data) <= _F32_LOGIT_TOL).all())
    dtype = torch.float32 if safe else torch.float64
    x, xs = xq.to(dtype), data.rows(subset, dtype)
    with _no_tf32():
        g = (x @ xs.T).double()
    xs_sq = (xs.double() ** 2).sum(1) if dtype == torch.float64 else (xs ** 2).sum(1).double()
    dist = ((x.double() ** 2).sum(1)[:, None] + xs_sq[None, :] - 2.0 * g).clamp_(min=0)
    return dist.mul_(-0.5 / sigma ** 2)


def _subset_denoise(data: _Data, estimator: str, xq, eps, src, sigma: float, subset, log_c: float):
    """D̂ (centred, float64 [B, D]) of one block under a subset estimator."""
    xs = data.rows(subset, torch.float64)
    logits = _subset_logits(data, xq, sigma, subset)
    if estimator == "snis":
        return torch.softmax(logits, dim=1) @ xs
    # DOL / cDOL: the source plus exactly L − 1 others — drop the source from the subset where it was drawn,
    # else drop the subset's last point.
    drop = subset[None, :] == src[:, None]
    drop[:, -1] |= ~drop.any(dim=1)
    others = logits.add_(log_c).masked_fill_(drop, -math.inf)
    src_logit = -0.5 * (eps ** 2).sum(1, keepdim=True)        # ‖x − x0_src‖² = σ²‖ε‖² exactly: no cancellation
    w = torch.softmax(torch.cat([src_logit, others], dim=1), dim=1)
    return w[:, :1] * data.rows(src, torch.float64) + w[:, 1:] @ xs


def _nn_count(subset_size: int, n: int) -> int:
    """K, the neighbours cdol-nn enumerates exactly: a quarter of the budget L, at most 64 (and ≤ N − 2)."""
    return int(max(1, min(64, (subset_size - 1) // 4, n - 2)))


def _knn_graph(data: _Data, k: int, chunk: int | None) -> torch.Tensor:
    """[N, k] indices of each point's k nearest other points (float32 GEMM distances: the stratum only has to
    be near, not exactly the nearest — any fixed set per source keeps cdol-nn's sums unbiased).  O(N²·D), once
    per dataset, with a running top-k over data chunks."""
    out = torch.empty(data.n, k, dtype=torch.int64, device=data.device)
    ch = chunk or _default_chunk(data.device, 1024, data.dim, data.n)
    for r0 in range(0, data.n, 1024):
        rows = data.chunk(r0, r0 + 1024, torch.float32)
        b = rows.shape[0]
        best_v = torch.full((b, k + 1), math.inf, device=data.device)
        best_i = torch.full((b, k + 1), -1, dtype=torch.int64, device=data.device)
        for c0 in range(0, data.n, ch):
            cols = data.chunk(c0, c0 + ch, torch.float32)
            with _no_tf32():
                dist = (cols ** 2).sum(1)[None, :] - 2.0 * (rows @ cols.T)        # + ‖row‖², same per row
            idx = torch.arange(c0, c0 + cols.shape[0], device=data.device).expand(b, -1)
            v, pos = torch.cat([best_v, dist], 1).topk(k + 1, dim=1, largest=False)
            best_v, best_i = v, torch.cat([best_i, idx], 1).gather(1, pos)
        drop = best_i == torch.arange(r0, r0 + b, device=data.device)[:, None]   # the point itself …
        drop[:, -1] |= ~drop.any(dim=1)                                          # … or the farthest of k + 1
        out[r0:r0 + b] = best_i[~drop].view(b, k)
    return out


def _nn_denoise(data: _Data, xq, eps, src, sigma: float, subset, knn, c_value):
    """cdol-nn's D̂ (centred, float64 [B, D]): the source and its K nearest neighbours exactly (C = 1), plus the
    random subset without them, weighted up by C = (N − 1 − K)/(its size) (stratified sampling: numerator and
    denominator of D* unbiased) or by the given C."""
    b, dim = xq.shape
    k = knn.shape[1]
    nb = knn.index_select(0, src)                                              # [B, K]
    x_nb = data.rows(nb.reshape(-1), torch.float64).view(b, k, dim)
    nb_logit = -((xq[:, None, :] - x_nb) ** 2).sum(-1) * (0.5 / sigma ** 2)   # exact differences
    xs = data.rows(subset, torch.float64)
    logits = _subset_logits(data, xq, sigma, subset)
    excl = (subset[None, :] == src[:, None]) | (subset[None, :, None] == nb[:, None, :]).any(-1)
    count = (subset.numel() - excl.sum(1)).clamp(min=1).double()
    c_row = (data.n - 1 - k) / count if c_value is None else torch.full_like(count, float(c_value))
    others = logits.add_(torch.log(c_row)[:, None]).masked_fill_(excl, -math.inf)
    src_logit = -0.5 * (eps ** 2).sum(1, keepdim=True)
    w = torch.softmax(torch.cat([src_logit, nb_logit, others], dim=1), dim=1)
    den = (w[:, :1] * data.rows(src, torch.float64) + torch.bmm(w[:, None, 1:k + 1], x_nb)[:, 0]
           + w[:, k + 1:] @ xs)
    # the sampled stratum makes D̂ = D* + noise, so ‖D̂‖² overestimates ‖D*‖² by tr Var(D̂) (the large-σ bias
    # ≈ variance/L of every subset estimator).  Delta method: D̂ − D* ≈ Σ_S π_n (x_n − D*), a sum of |S| iid
    # terms, whose variance the sample itself estimates: |S|/(|S|−1)·(Σ‖v_n‖² − ‖Σ v_n‖²/|S|), v_n = π_n(x_n − D̂)
    pi = w[:, k + 1:]
    cross = den @ xs.T                                                         # ⟨D̂, x_n⟩
    sq_dev = ((xs ** 2).sum(1)[None, :] - 2 * cross + (den ** 2).sum(1, keepdim=True)).clamp_(min=0)
    sum_v = pi @ xs - pi.sum(1, keepdim=True) * den
    s_count = count.clamp(min=2)
    var_tr = s_count / (s_count - 1) * ((pi ** 2 * sq_dev).sum(1) - (sum_v ** 2).sum(1) / s_count)
    return den, var_tr.clamp_(min=0)


def _per_sample_losses(data: _Data, sigmas, estimator, m, subset_size, c_value, seed, chunk, bar):
    """[len(σ), M] per-sample (direct, A − B) losses (per-dim) for one (class-)dataset.  The loop runs over
    groups of samples outside and σ inside, so each group's sources and ε are drawn once for all σ."""
    n, dim = data.n, data.dim
    src_all = _balanced_sources(n, m, seed)
    blocks = [(b, src_all[b * _RNG_BLOCK:(b + 1) * _RNG_BLOCK]) for b in range(-(-m // _RNG_BLOCK))]
    direct = torch.empty(len(sigmas), m, dtype=torch.float64)
    a_minus_b = torch.empty(len(sigmas), m, dtype=torch.float64)
    log_c = math.log(c_value) if c_value is not None else 0.0
    group = _FULL_BATCH_BLOCKS if estimator == "full" else 1
    knn = _knn_graph(data, _nn_count(subset_size, n), chunk) if estimator == "cdol-nn" else None
    screen_logs: dict[int, list] = {}
    for g0 in range(0, len(blocks), group):
        chunk_blocks = blocks[g0:g0 + group]
        eps = torch.cat([_block_noise(seed, b, len(s), dim, data.device) for b, s in chunk_blocks])
        src = torch.cat([s for _, s in chunk_blocks]).to(data.device)
        x_src = data.rows(src, torch.float64)
        a_src = (x_src ** 2).sum(1)
        subset = None
        if estimator == "cdol-nn":
            subset = _block_subset(seed, chunk_blocks[0][0], n, max(1, subset_size - 1 - knn.shape[1]))
        elif estimator != "full":
            subset = _block_subset(seed, chunk_blocks[0][0], n, subset_size)
        subset = None if subset is None else subset.to(data.device)
        lo = g0 * _RNG_BLOCK
        for i, sigma in enumerate(sigmas):
            screen_log = screen_logs.setdefault(i, [])
            xq = x_src + sigma * eps
            var_tr = None
            if estimator == "full":
                sig = torch.full((xq.shape[0],), float(sigma), dtype=torch.float64, device=data.device)
                den = _posterior_centred(data, xq, sig, chunk, hint=src, screen_log=screen_log)
            elif estimator == "cdol-nn":
                den, var_tr = _nn_denoise(data, xq, eps, src, float(sigma), subset, knn, c_value)
            else:
                den = _subset_denoise(data, estimator, xq, eps, src, float(sigma), subset, log_c)
            direct[i, lo:lo + len(src)] = ((den - x_src) ** 2).sum(1).cpu() / dim
            ab = a_src - (den ** 2).sum(1)
            if var_tr is not None:
                ab += var_tr
            a_minus_b[i, lo:lo + len(src)] = ab.cpu() / dim
            if bar is not None:
                bar.update(len(src))
    return direct, a_minus_b


def estimate_optimal_loss(data, sigmas, *, estimator: str = "full", labels=None, n_samples: int | None = None,
                          subset_size: int | None = None, C: float | None = None, seed: int = 0, device=None,
                          chunk_size: int | None = None, progress: bool = False) -> pd.DataFrame:
    """J*(σ) per dimension (x0 target, VE coordinates) of the empirical distribution of `data` [N, …].

    One row per σ with columns sigma, optimal_loss, stderr, estimator, n_samples, subset_size, C, conditional,
    direct, direct_stderr, a_minus_b, a_minus_b_stderr.  `optimal_loss` is the direct mean ‖D* − x0‖²/D for
    `full` and the A − B form for the subset estimators (module docstring).  `labels` [N] gives the
    class-conditional J*.  Deterministic under `seed` for a device type (independent of chunk and batch sizes;
    CPU and CUDA draw different ε, so they agree within the standard error)."""
    if estimator not in ESTIMATORS + EXTRA_ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; choose one of "
                         f"{', '.join(ESTIMATORS + EXTRA_ESTIMATORS)}")
    x0 = _as_matrix(data, "data", check_finite=False)   # _Data's mean / norms catch NaN and inf
    n_total, dim = x0.shape
    sig = np.asarray(sigmas, dtype=np.float64).reshape(-1)
    if sig.size == 0 or not np.all(np.isfinite(sig)) or not np.all(sig > 0):
        raise ValueError(f"sigmas must be a non-empty list of finite values > 0, got {sig.tolist()[:8]}")
    if n_samples is not None and int(n_samples) < 2:
        raise ValueError(f"n_samples must be >= 2 (a standard error needs two samples), got {n_samples}")
    if subset_size is not None and estimator == "full":
        subset_size = None  # the full estimator uses every point
    if subset_size is not None and not 2 <= int(subset_size) <= n_total:
        raise ValueError(f"subset_size must be in [2, N={n_total}], got {subset_size}")
    if C is not None and not (float(C) > 0 and math.isfinite(float(C))):
        raise ValueError(f"C must be a finite number > 0, got {C}")
    dev = _resolve_device(device)

    if labels is None:
        parts = [(None, None)]
    else:   # members only: a class's rows are copied when its turn comes (never a second copy of the whole set)
        lab = _as_labels(labels, n_total, "labels")
        parts = [(c, torch.nonzero(lab == c).squeeze(1)) for c in lab.unique().tolist()]
    m_total = int(n_samples) if n_samples is not None else None

    plans = []
    for c, members in parts:
        n = n_total if members is None else members.numel()
        size = n if estimator == "full" else min(n, int(subset_size) if subset_size else _default_subset_size(n))
        size = max(size, min(n, 2))
        if m_total is None:
            m = _default_n_samples(n, size, dim)
        else:
            m = max(2, -(-m_total * n // n_total))
        c_val = None
        if estimator == "dol":
            c_val = 1.0
        elif estimator == "cdol":
            c_val = float(C) if C is not None else 4.0 * n / size
        elif estimator == "cdol-nn":
            if size < 3 or n < 3:
                raise ValueError(f"cdol-nn needs subset_size >= 3 and N >= 3, got {size} and {n}")
            c_val = float(C) if C is not None else None       # None: stratified, per sample
        plans.append((c, members, n, size, m, c_val))

    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=sum(p[4] for p in plans) * sig.size, desc=f"J* {estimator}", unit="x_t", leave=False)
    try:
        parts_out = []
        for c, members, n, size, m, c_val in plans:
            d = _Data(x0 if members is None else x0[members], dev)
            part_seed = seed if c is None else _seed_of(seed, int(c), 7)
            gemm = (_FULL_BATCH_BLOCKS * _RNG_BLOCK * n if estimator == "full" else _RNG_BLOCK * size) * d.dim
            with _single_thread_if_small(dev, gemm):
                direct, ab = _per_sample_losses(d, sig, estimator, m, size, c_val, part_seed, chunk_size, bar)
            parts_out.append((n / n_total, direct, ab))
            del d   # this class's copy (and cached centred data) goes before the next class's is made
    finally:
        if bar is not None:
            bar.close()

    def combine(which: int):
        """Class-weighted mean and its standard error (classes are independent samples)."""
        mean = sum(w * v[which].mean(1) for w, *v in parts_out)
        var = sum(w ** 2 * v[which].var(1) / v[which].shape[1] for w, *v in parts_out)
        return mean.numpy(), var.sqrt().numpy()

    d_mean, d_se = combine(0)
    ab_mean, ab_se = combine(1)
    opt, se = (d_mean, d_se) if estimator == "full" else (ab_mean, ab_se)
    single = len(plans) == 1  # per-class L and C differ; report them only when they are one number
    c_col = plans[0][5] if single else (float(C) if C is not None else None)
    return pd.DataFrame({
        "sigma": sig,
        "optimal_loss": opt,
        "stderr": se,
        "estimator": estimator,
        "n_samples": sum(p[4] for p in plans),
        "subset_size": plans[0][3] if single else (int(subset_size) if subset_size else np.nan),
        "C": np.nan if c_col is None else c_col,
        "conditional": labels is not None,
        "direct": d_mean,
        "direct_stderr": d_se,
        "a_minus_b": ab_mean,
        "a_minus_b_stderr": ab_se,
    })


# --------------------------------------------------------------------------------------------------------
# the study's fixed evaluation set
# --------------------------------------------------------------------------------------------------------



def denoise_eval_set(x0, eval_set, *, labels=None, device=None, batch_size: int = 1024) -> np.ndarray:
    """D* for every (index, σ, noise_seed) triple of an evaluation set: float32 [M, D]."""
    x0 = torch.as_tensor(x0)
    for key in ("index", "sigma", "noise_seed"):
        if key not in eval_set:
            raise ValueError(f"eval set lacks the key {key!r} (needs index, sigma, noise_seed)")
    index = np.asarray(eval_set["index"], dtype=np.int64)
    sigma = np.asarray(eval_set["sigma"], dtype=np.float64)
    seeds = np.asarray(eval_set["noise_seed"])
    if not (index.shape == sigma.shape == seeds.shape):
        raise ValueError(f"eval set arrays differ in length: index {index.shape}, sigma {sigma.shape}, "
                         f"noise_seed {seeds.shape}")
    if index.size and (index.min() < 0 or index.max() >= x0.shape[0]):
        raise ValueError(f"eval set index out of range [0, {x0.shape[0]}): min {index.min()}, max {index.max()}")
    out = np.empty((index.size, int(np.prod(x0.shape[1:]))), dtype=np.float32)
    for b in range(0, index.size, batch_size):
        sl = slice(b, b + batch_size)
        clean = x0[torch.from_numpy(index[sl])].double()
        eps = eval_noise(x0.shape[1:], seeds[sl]).double()
        s = torch.from_numpy(sigma[sl])
        noisy = clean + s.view(-1, *([1] * (clean.ndim - 1))) * eps
        kw = {}
        if labels is not None:
            kw = {"labels": labels, "noisy_labels": torch.as_tensor(labels)[torch.from_numpy(index[sl])]}
        den = posterior_mean(x0, noisy, s, device=device, source_index=index[sl], **kw)
        out[sl] = den.reshape(den.shape[0], -1).cpu().numpy().astype(np.float32)
    return out


# --------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------

def _load(spec: str):
    """(x [N, …] float32 tensor, labels or None) via models.data.open_dataset: the exact posterior needs every
    point, so the whole set is converted — once, chunk by chunk, into one float32 tensor."""
    from models.data import open_dataset
    data = open_dataset(spec)
    return data.float32(), data.labels


def _sigma_grid(lo: float, hi: float, k: int) -> np.ndarray:
    if not (0 < lo <= hi) or k < 1:
        raise ValueError(f"σ grid needs 0 < --sigma-min <= --sigma-max and --num-sigmas >= 1, got "
                         f"{lo}, {hi}, {k}")
    return np.geomspace(lo, hi, k) if k > 1 else np.array([lo])


def _to_process(df: pd.DataFrame, process: str, target: str) -> pd.DataFrame:
    """Add t, process_loss, process_stderr for a named process/target (models.diffusion.to_process_curve)."""
    from models.diffusion import get_process, to_process_curve
    t_all = get_process(process).t_from_sigma_ve(torch.tensor(df["sigma"].to_numpy(dtype=np.float64))).numpy()
    out = df.copy()
    out["process"], out["target"] = process, target
    out["t"], out["process_loss"], out["process_stderr"] = np.nan, np.nan, np.nan
    for est, rows in out.groupby("estimator").groups.items():
        sub = out.loc[rows]
        sig = sub["sigma"].to_numpy(dtype=np.float64, copy=True)
        t, loss = to_process_curve(sig, sub["optimal_loss"].to_numpy(dtype=np.float64, copy=True), process, target)
        _, se = to_process_curve(sig, sub["stderr"].to_numpy(dtype=np.float64, copy=True), process, target)
        t_rows = t_all[np.asarray([out.index.get_loc(r) for r in rows])]
        for tv, lv, sv in zip(t, loss, se):
            hit = rows[np.isclose(t_rows, tv, rtol=1e-12, atol=0)]
            out.loc[hit, ["t", "process_loss", "process_stderr"]] = [tv, lv, sv]
    return out


def _estimate_cli(argv) -> int:
    p = argparse.ArgumentParser(prog="python -m analysis.optimal_loss",
                                description="J*(σ) of a dataset (per-dim x0-loss, VE coordinates) → CSV. "
                                            "Subcommand `denoise` computes D* on an evaluation set.")
    p.add_argument("--dataset", required=True, help="dataset spec or .npz (models.data.open_dataset)")
    p.add_argument("--estimator", default="full", choices=ESTIMATORS + EXTRA_ESTIMATORS + ("all",),
                   help="all = the paper's four (full, dol, cdol, snis)")
    p.add_argument("--out", required=True, help="output CSV")
    p.add_argument("--sigma-min", type=float, default=0.002)
    p.add_argument("--sigma-max", type=float, default=80.0)
    p.add_argument("--num-sigmas", type=int, default=32)
    p.add_argument("--n-samples", type=int, default=None, help="M noisy samples per σ (default: see docs)")
    p.add_argument("--subset-size", type=int, default=None, help="L for dol/cdol/snis (default clip(N/20,64,4096))")
    p.add_argument("--C", type=float, default=None, help="cDOL's C (default 4N/L)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--conditional", action="store_true", help="class-conditional J* (needs labels)")
    p.add_argument("--device", default=None, help="cpu (default) or cuda")
    p.add_argument("--process", default=None, help="also convert to this process (models.diffusion)")
    p.add_argument("--target", default=None, help="… and this target (x0, eps, v, score, velocity, edm-F)")
    a = p.parse_args(argv)
    if (a.process is None) != (a.target is None):
        p.error("--process and --target go together")
    sigmas = _sigma_grid(a.sigma_min, a.sigma_max, a.num_sigmas)
    x, labels = _load(a.dataset)
    if a.conditional and labels is None:
        p.error(f"--conditional: dataset {a.dataset!r} has no labels")
    names = ESTIMATORS if a.estimator == "all" else (a.estimator,)
    frames = [estimate_optimal_loss(x, sigmas, estimator=e, labels=labels if a.conditional else None,
                                    n_samples=a.n_samples, subset_size=a.subset_size, C=a.C, seed=a.seed,
                                    device=a.device, progress=True) for e in names]
    df = pd.concat(frames, ignore_index=True)
    if a.process is not None:
        df = _to_process(df, a.process, a.target)
    out = Path(a.out)
    with atomic_path(out) as tmp:
        df.to_csv(tmp, index=False)
    print(f"wrote {out} ({len(df)} rows: {', '.join(names)} × {sigmas.size} σ)")
    return 0


def _denoise_cli(argv) -> int:
    p = argparse.ArgumentParser(prog="python -m analysis.optimal_loss denoise",
                                description="D*(x_t) for every (index, σ, noise_seed) triple of an eval set")
    p.add_argument("--dataset", required=True)
    p.add_argument("--eval-set", required=True, help=".npz with index, sigma, noise_seed")
    p.add_argument("--out", required=True, help="output .npy, float32 [M, D]")
    p.add_argument("--conditional", action="store_true")
    p.add_argument("--device", default=None)
    a = p.parse_args(argv)
    x, labels = _load(a.dataset)
    if a.conditional and labels is None:
        p.error(f"--conditional: dataset {a.dataset!r} has no labels")
    try:
        eval_set = load_eval_set(a.eval_set)
    except (FileNotFoundError, ValueError) as err:
        p.error(f"--eval-set: {err}")
    den = denoise_eval_set(x, eval_set, labels=labels if a.conditional else None, device=a.device)
    out = Path(a.out)
    with atomic_path(out) as tmp, open(tmp, "wb") as fh:
        np.save(fh, den)
    print(f"wrote {out} {den.shape}")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "denoise":
        return _denoise_cli(argv[1:])
    if argv and argv[0] == "estimate":
        argv = argv[1:]
    return _estimate_cli(argv)


if __name__ == "__main__":
    sys.exit(main())
