"""The exact posterior mean D*(x) of an empirical distribution: the kernel, its screens and their error bounds.

For N data points and a VE noisy point x = x0 + σ·ε, D*(x) = Σ_n softmax_n(−‖x − x0_n‖²/2σ²)·x0_n, computed exactly
(to rounding) at every σ.  analysis/optimal_loss.py builds the J* estimators and the CLIs on it.

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
  precision — bfloat16 on CUDA (tensor cores); on the CPU int8 through fbgemm for large batches with a source
  hint, else float32 for the rows that would otherwise need
  float64 — gives every logit within a rigorous bound B (rounding or quantisation of both operands, of the norms,
  of float32 accumulation, of the result; tests check each bound entry by entry).  Points
  whose logit cannot come within 50 nats of the row maximum are dropped (< e^-50 of the top weight each); the
  few left get exact logits −‖x − x0‖²/2σ² from float64 differences, with no cancellation at any σ.  Rows with
  more than max(256, N/32) candidates (dense posteriors, large σ) go to the streaming path; once a batch at some
  σ finished < 10% of its rows, later batches at that σ skip the screen.  _SCREEN = "off" disables it.
* The data side of every product is analysis.centred_data.CentredData: centred rows (and their squared norms),
  centred once per estimate.

"""

from __future__ import annotations

import contextlib
import math
import warnings

import numpy as np
import torch

from analysis.centred_data import CentredData

# posterior_mean is the exact D* for callers; the rest is what analysis/optimal_loss.py builds its estimators on
__all__ = ["posterior_mean", "posterior_centred", "F32_LOGIT_TOL", "logit_error_bound", "no_tf32", "default_chunk",
           "single_thread_if_small", "resolve_device", "as_matrix", "as_labels"]

_U32 = 2.0 ** -24            # float32 unit roundoff
F32_LOGIT_TOL = 1e-2         # max logit error (nats) accepted from the float32 path
_NEGLIGIBLE_NATS = 50.0      # weights below e^-50 of the row max are skipped in the value GEMM
_EXP_FLOOR = _NEGLIGIBLE_NATS + 30.0  # logits below max − 80 count as e^-80 (≤ N·1e-35 of the sum)
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
def no_tf32():
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
def single_thread_if_small(device: torch.device, gemm_size: int):
    """One CPU thread when each GEMM is small (subset estimators, or a dataset as small as digits): starting and
    synchronising threads costs more than the work they share, the more so on a machine whose cores are busy."""
    old = torch.get_num_threads()
    if device.type == "cpu" and gemm_size < 2 ** 28:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} requested but CUDA is not available on this machine")
    return dev


def as_matrix(data, name: str = "data", check_finite: bool = True) -> torch.Tensor:
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


def as_labels(labels, n: int, name: str) -> torch.Tensor:
    lab = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels).reshape(-1)
    if lab.numel() != n:
        raise ValueError(f"{name} has {lab.numel()} entries but there are {n} points")
    if lab.is_floating_point() and not torch.equal(lab, lab.round()):
        raise ValueError(f"{name} must be integer class ids")
    return lab.to(torch.int64).cpu()


# --------------------------------------------------------------------------------------------------------
# the exact posterior: streaming log-sum-exp over data chunks
# --------------------------------------------------------------------------------------------------------

def logit_error_bound(xq: torch.Tensor, sigma: torch.Tensor, data: CentredData) -> torch.Tensor:
    """Worst-case float32 logit error per query row (nats): GEMM rounding ~√D·u·‖x‖‖x0‖ (×2 in the distance)
    plus the rounding of the norm terms and of the max subtraction, all divided by 2σ²."""
    xn = xq.norm(dim=1)
    err_dist = _U32 * (2.0 * math.sqrt(data.dim) * xn * data.norm_max + 4.0 * (xn ** 2 + data.norm_max ** 2))
    return err_dist / (2.0 * sigma ** 2)


def default_chunk(device: torch.device, q: int, dim: int, n: int) -> int:
    """Data points per chunk: the [Q, chunk] logits ≤ 64 MB (CPU) / 1 GB (GPU) and the [chunk, D] centred copy
    ≤ 128 MB / 1 GB, at least 256 points (GEMM-sized); then evened out so the last chunk is not a sliver."""
    cap = 2 ** 24 if device.type == "cpu" else 2 ** 28
    chunk = int(max(256, min(65536, cap // max(q, 1), (cap * 2) // (dim + 1))))
    pieces = -(-n // chunk)
    return -(-n // pieces)


def _stream_posterior(data: CentredData, xq: torch.Tensor, sigma: torch.Tensor, dtype: torch.dtype,
                      chunk: int, init_max: torch.Tensor | None = None) -> torch.Tensor:
    """D*(x) (centred coords, float64 [Q, D]) for queries xq [Q, D] (float64, centred), σ [Q] (float64),
    doing the distance GEMM, logits and weights in `dtype` and the running (max, sum, numerator) in float64.

    The logit −‖x − x0‖²/2σ² is, up to a per-row constant that the softmax ignores, (2⟨x, x0⟩ − ‖x0‖²)/2σ²:
    one GEMM of the augmented rows [x0, ‖x0‖²] · [x/σ², −1/2σ²] gives it with no elementwise pre-pass.  The
    product is laid out [chunk, Q] (data-major), the orientation MKL runs faster (benchmarks/bench_optimal_loss.py
    times both).
    `init_max` (optional, float64 [Q]): the logit, in that convention, of one known data point per row (e.g. the
    source of x): seeding the running max with it lets chunks that hold nothing near x skip the value GEMM."""
    q, dim = xq.shape
    x_aug = data.augmented_queries(xq, sigma, dtype)
    run_max = torch.full((q,), -math.inf, dtype=torch.float64, device=xq.device) if init_max is None else \
        init_max.clone()
    run_sum = torch.zeros(q, dtype=torch.float64, device=xq.device)
    acc = torch.zeros(q, dim, dtype=torch.float64, device=xq.device)
    for _, xc_aug in data.augmented_chunks(dtype, chunk):
        with no_tf32():
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
        with no_tf32():
            contrib = (pr.T @ xv).double()
        if rows.numel() < q:
            acc.index_add_(0, rows, contrib)
        else:
            acc.add_(contrib)
    return acc / run_sum[:, None]


def _screen_bound(xq: torch.Tensor, sigma: torch.Tensor, data: CentredData, dtype: torch.dtype) -> torch.Tensor:
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


def _int8_screen_bound(xq: torch.Tensor, sigma: torch.Tensor, data: CentredData, scale: torch.Tensor) -> torch.Tensor:
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


def _screen_logits(data: CentredData, xq: torch.Tensor, sigma: torch.Tensor, dtype: torch.dtype, chunk: int):
    """Yield (start, [chunk, Q] screened logits) and return nothing; see _screened_posterior.  For bfloat16 /
    float32 the augmented GEMM of centred rows; for int8 (torch.int8) fbgemm's product of the raw rows with the
    int8 queries, less the centred norms — those logits are the centred ones plus ⟨x, mean⟩/σ² per row."""
    if dtype != torch.int8:
        x_aug = data.augmented_queries(xq, sigma, dtype)
        for start, xc_aug in data.augmented_chunks(dtype, chunk):
            with no_tf32():
                yield start, xc_aug @ x_aug.T
        return
    packed, _ = _int8_pack_queries(xq)
    inv2s2 = (0.5 / sigma ** 2).float()
    for start in range(0, data.n, chunk):
        stop = min(start + chunk, data.n)
        approx = torch.ops.quantized.linear_dynamic(data.raw[start:stop].float(), packed, True)  # ⟨a_raw, x⟩
        yield start, approx.mul_(2.0 * inv2s2[None, :]).addr_(data.centred_sq[start:stop], inv2s2, alpha=-1.0)


def _screened_posterior(data: CentredData, xq: torch.Tensor, sigma: torch.Tensor, dtype: torch.dtype, chunk: int,
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
        # costs far more than the total one, so it runs only when the total says some row may be over
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


def _screen_dtype(data: CentredData, fast: torch.Tensor, hinted: bool) -> tuple[torch.dtype | None, torch.Tensor]:
    """Which rows are screened, and in which precision: on CUDA every row in bfloat16 (tensor cores); on the CPU
    every row in int8 when fbgemm is there, the batch's GEMM is large and each query comes with a hint (faster than
    float32 then, quantisation included; without a hint the first chunks of a multi-chunk pass cannot rule out
    enough points at intermediate σ and the screen would only add its GEMM), else the rows that would otherwise
    need a float64 GEMM in float32 (a float32 screen plus float64 candidates costs less than a float64 GEMM)."""
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


def posterior_centred(data: CentredData, xq: torch.Tensor, sigma: torch.Tensor, chunk: int | None,
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
    fast = logit_error_bound(xq, sigma, data) <= F32_LOGIT_TOL
    todo = torch.ones_like(fast)
    screen_dtype, screened = _screen_dtype(data, fast, hinted=init is not None)
    if screen_log and min(screen_log) < 0.1:
        screened = torch.zeros_like(screened)
    idx = torch.nonzero(screened).squeeze(1)
    if idx.numel() > 0:
        ch = chunk or default_chunk(data.device, idx.numel(), data.dim, data.n)
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
        ch = chunk or default_chunk(data.device, idx.numel(), data.dim, data.n)
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
    dev = resolve_device(device)
    x0 = as_matrix(data, "data", check_finite=False)   # CentredData's mean / norms catch NaN and inf
    x_shape = tuple(np.shape(x_noisy))
    xq = as_matrix(x_noisy, "x_noisy").double()
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
        lab = as_labels(labels, x0.shape[0], "labels")
        qlab = as_labels(noisy_labels, q, "noisy_labels")
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
        d = CentredData(x0 if c is None else x0[members], dev)
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
            out[r.to(dev)] = posterior_centred(d, xc, sig[r].to(dev), chunk_size, hint) + d.mean
    return out.reshape(x_shape)


# --------------------------------------------------------------------------------------------------------
# Monte-Carlo estimators of J*(σ)
