"""Scaling-law fits: power laws with and without an offset, and the Chinchilla L(N, D) form.

SCIENCE.md §4 (the paper fits J(F) = β·F^α against J(F) − J* = β·F^α and compares the correlation ρ of the log-log
fits) and §6 (fitting practice: Hoffmann et al. approach 3 as replicated by Epoch AI — a Huber loss with δ = 1e-3
on log-space residuals, L-BFGS-B from a grid of starts, bootstrap for intervals).

Public interface (ARCHITECTURE.md):
- ``fit_power_law(x, y, *, offset=0.0 | "free")`` → y = offset + prefactor·x^exponent
- ``fit_chinchilla(params, tokens, loss, *, drop_highest=0)`` → L = E + A/N^α + B/D^β
- ``holdout_error``, ``lower_envelope``, ``fit_table``, ``exponents_markdown`` for the study DAG.

CLI::

    python -m analysis.scaling --losses losses.csv --out-csv exponents.csv --out-md exponents.md [--n-bootstrap 200]
    python -m analysis.scaling chinchilla --csv FILE --drop-highest 5 [--n-bootstrap 0]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import minimize

from models.atomic import atomic_path

NAN_CI = (math.nan, math.nan)

try:  # a transitive dependency (scikit-learn); the fits still run without it, only slower on a busy machine
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover
    threadpool_limits = None


def _single_blas_thread(fn):
    """Run ``fn`` with BLAS limited to one thread.

    scipy's L-BFGS-B calls BLAS/LAPACK on tiny (3–5 variable) problems every iteration; with OpenBLAS free to
    spawn threads on a shared machine each iteration costs milliseconds instead of microseconds (measured ~20×
    slower on a loaded 2-core box). One thread is always fastest at these sizes.
    """
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        ctx = threadpool_limits(limits=1, user_api="blas") if threadpool_limits else contextlib.nullcontext()
        with ctx:
            return fn(*args, **kwargs)
    return wrapper


# ----------------------------------------------------------------------------------------------------------------
# Huber loss and log-sum-exp helpers
# ----------------------------------------------------------------------------------------------------------------
def huber(r: np.ndarray, delta: float) -> np.ndarray:
    """Elementwise Huber loss: r²/2 inside |r| ≤ δ, δ(|r| − δ/2) outside (scipy.special.huber's convention)."""
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


def huber_grad(r: np.ndarray, delta: float) -> np.ndarray:
    """Derivative of ``huber`` with respect to r: r clipped to [−δ, δ]."""
    return np.clip(r, -delta, delta)


def _softmax_lse(z: np.ndarray, axis: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """Log-sum-exp of z along ``axis`` and the softmax weights (the LSE's gradient), computed stably."""
    m = np.max(z, axis=axis, keepdims=True)
    ez = np.exp(z - m)
    s = np.sum(ez, axis=axis, keepdims=True)
    lse = np.squeeze(m + np.log(s), axis=axis)
    return lse, ez / s


# ----------------------------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------------------------
def _as_1d(name: str, v) -> np.ndarray:
    a = np.asarray(v, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {a.shape}")
    return a


def _check_xy(x, y, *, names=("x", "y"), min_points=3) -> tuple[np.ndarray, np.ndarray]:
    x = _as_1d(names[0], x)
    y = _as_1d(names[1], y)
    if x.shape != y.shape:
        raise ValueError(f"{names[0]} and {names[1]} must have the same length, got {x.size} and {y.size}")
    bad = ~(np.isfinite(x) & np.isfinite(y))
    if bad.any():
        raise ValueError(f"{int(bad.sum())} of {x.size} points have a non-finite {names[0]} or {names[1]} "
                         f"(first at index {int(np.argmax(bad))})")
    if x.size < min_points:
        raise ValueError(f"need at least {min_points} points to fit, got {x.size}")
    if (x <= 0).any():
        raise ValueError(f"{names[0]} must be positive (power laws are fitted in log space); "
                         f"{int((x <= 0).sum())} points have {names[0]} ≤ 0")
    return x, y


# ----------------------------------------------------------------------------------------------------------------
# Power law  y = offset + prefactor · x^exponent
# ----------------------------------------------------------------------------------------------------------------
# Internally x and y are divided by their geometric means (x_s, y_s) so that log-prefactor and log-offset are O(1)
# and the problem is well conditioned even for x = training FLOPs ~ 1e18. Parameters θ = (k, p[, e]):
#   y/y_s = exp(e) + exp(p)·(x/x_s)^k ,  log-model = LSE(p + k·u, e)  with u = log(x/x_s).
# For a fixed offset c the log-offset is the constant log(c/y_s) (or absent when c = 0).

_EXPONENT_BOUNDS = (-10.0, 10.0)
_LOGPREF_BOUNDS = (-60.0, 60.0)
_EXPONENT_STARTS = (-2.0, -1.0, -0.5, -0.2, -0.05, -0.01, 0.01, 0.1, 0.5)
_OFFSET_FRACTION_STARTS = (1e-3, 0.1, 0.5, 0.8, 0.95, 0.99)  # of min(y)
# A free-offset fit can take hundreds of L-BFGS-B iterations per start when the offset is weakly identified, so
# only the grid starts with the lowest initial objective are optimised (their prefactor is already matched to the
# data, which makes the initial objective a good guide); bootstrap refits also start from the full fit's optimum.
_MAX_STARTS = 12
_MAX_STARTS_BOOTSTRAP = 3


def _pl_log_model(theta, u, log_c):
    """log of the normalised model and its Jacobian (rows: points, cols: θ)."""
    k, p = theta[0], theta[1]
    z = p + k * u
    if log_c is None and len(theta) == 2:  # pure power law
        jac = np.stack([u, np.ones_like(u)], axis=1)
        return z, jac
    e = theta[2] if len(theta) == 3 else log_c
    lse, w = _softmax_lse(np.stack([z, np.full_like(z, e)], axis=1), axis=1)
    wz = w[:, 0]
    cols = [wz * u, wz]
    if len(theta) == 3:
        cols.append(w[:, 1])
    return lse, np.stack(cols, axis=1)


def _pl_objective(theta, u, logy, log_c, delta):
    lm, jac = _pl_log_model(theta, u, log_c)
    r = lm - logy
    return float(np.sum(huber(r, delta))), jac.T @ huber_grad(r, delta)


def _pl_starts(u, logy, y_norm, free: bool, log_c):
    """Data-driven grid of starts: for each exponent (and offset), the log-prefactor that zeros the median residual."""
    offsets = [math.log(f) + math.log(y_norm.min()) for f in _OFFSET_FRACTION_STARTS] if free else [log_c]
    starts = []
    for k, e in itertools.product(_EXPONENT_STARTS, offsets):
        c = 0.0 if e is None else math.exp(e)
        rest = y_norm - c
        rest = rest[rest > 0]
        if rest.size == 0:
            continue
        # median of log(y − c) − k·u over the points where y > c
        p = float(np.median(np.log(rest)) - k * np.median(u))
        p = float(np.clip(p, *_LOGPREF_BOUNDS))
        starts.append([k, p] + ([e] if free else []))
    return starts


def _pl_fit_core(u, logy, y_norm, free, log_c, delta, extra_starts=(), max_grid_starts=None):
    """Best L-BFGS-B fit over the grid of starts (plus ``extra_starts``); returns (θ, objective).

    ``max_grid_starts`` keeps only the grid starts with the lowest initial objective (bootstrap refits, which also
    start from the full fit's optimum, use a few to stay fast).
    """
    bounds = [_EXPONENT_BOUNDS, _LOGPREF_BOUNDS]
    if free:
        # the offset stays strictly below the smallest y so that y − offset > 0 for ρ
        hi = math.log(y_norm.min()) + math.log1p(-1e-6)
        bounds.append((hi - 40.0, hi))
    clip = lambda th: np.array([np.clip(v, lo, hi) for v, (lo, hi) in zip(th, bounds)])  # noqa: E731
    grid = [clip(th) for th in _pl_starts(u, logy, y_norm, free, log_c)]
    if max_grid_starts is not None and len(grid) > max_grid_starts:
        vals = [_pl_objective(th, u, logy, log_c, delta)[0] for th in grid]
        grid = [grid[i] for i in np.argsort(vals)[:max_grid_starts]]
    best_theta, best_f = None, math.inf
    for th0 in [clip(th) for th in extra_starts] + grid:
        res = minimize(_pl_objective, th0, args=(u, logy, log_c, delta), jac=True, method="L-BFGS-B",
                       bounds=bounds, options={"maxiter": 1000, "ftol": 1e-15, "gtol": 1e-12})
        if res.fun < best_f:
            best_theta, best_f = res.x, float(res.fun)
    return best_theta, best_f


def _pl_unnormalise(theta, free, offset_fixed, x_s, y_s):
    k = float(theta[0])
    # y = y_s·exp(p)·(x/x_s)^k = [y_s·exp(p)·x_s^(−k)]·x^k ; computed in logs to avoid overflow
    prefactor = math.exp(math.log(y_s) + float(theta[1]) - k * math.log(x_s))
    off = y_s * math.exp(float(theta[2])) if free else float(offset_fixed)
    return k, prefactor, off


def _fit_stats(x, y, k, prefactor, off):
    """ρ = |Pearson r| of log x vs log(y − offset); R² of the fit in log-y space."""
    lx = np.log(x)
    pred = off + prefactor * np.power(x, k)
    ly = np.log(y)
    ss_res = float(np.sum((ly - np.log(pred)) ** 2))
    ss_tot = float(np.sum((ly - ly.mean()) ** 2))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else math.nan
    rest = y - off
    if (rest <= 0).any() or np.ptp(lx) == 0:
        return math.nan, math.nan, r2
    ly0 = np.log(rest)
    if np.ptp(ly0) == 0:
        return math.nan, math.nan, r2
    pearson = float(np.corrcoef(lx, ly0)[0, 1])
    return abs(pearson), pearson, r2


def _prepare_power_law(x, y, offset, drop_nonpositive):
    """Validate, apply the offset rule, return (x, y, free, offset_fixed, n_dropped)."""
    x, y = _check_xy(x, y)
    free = isinstance(offset, str)
    if free and offset != "free":
        raise ValueError(f"offset must be a number or 'free', got {offset!r}")
    if not free:
        offset = float(offset)
        if not math.isfinite(offset) or offset < 0:
            raise ValueError(f"a fixed offset must be finite and ≥ 0, got {offset}")
    floor = 0.0 if free else offset
    bad = y <= floor
    n_dropped = 0
    if bad.any():
        what = "y ≤ 0" if free else f"y ≤ offset ({offset:g})"
        if not drop_nonpositive:
            raise ValueError(f"{int(bad.sum())} of {y.size} points have {what}; a power law in log space needs "
                             f"y − offset > 0 (pass drop_nonpositive=True to drop them)")
        n_dropped = int(bad.sum())
        x, y = x[~bad], y[~bad]
        if x.size < 3:
            raise ValueError(f"only {x.size} points left after dropping {n_dropped} with {what}; need at least 3")
    if np.ptp(np.log(x)) == 0:
        raise ValueError("all x values are equal; cannot fit an exponent")
    return x, y, free, (None if free else offset), n_dropped


@_single_blas_thread
def fit_power_law(x, y, *, offset=0.0, huber_delta: float = 1e-3, n_bootstrap: int = 0, seed: int = 0,
                  drop_nonpositive: bool = False) -> dict:
    """Fit y = offset + prefactor·x^exponent with a Huber loss on log(y) − log(model).

    ``offset`` is a fixed number ≥ 0 (default 0: a pure power law) or ``"free"`` (fitted, kept below min y).
    Returns a dict with ``exponent``, ``prefactor``, ``offset``, ``rho`` (|Pearson r| of log x vs log(y − offset)),
    ``pearson_r`` (signed), ``r2`` (in log-y space), ``exponent_ci``, ``prefactor_ci``, ``offset_ci`` (bootstrap
    percentile 95% intervals, NaN when n_bootstrap = 0), ``n`` (points used), ``n_dropped``, ``huber_loss``.
    Points with y ≤ offset (y ≤ 0 for a free offset) raise, or are dropped with ``drop_nonpositive=True``.
    """
    x, y, free, off_fixed, n_dropped = _prepare_power_law(x, y, offset, drop_nonpositive)
    x_s, y_s = float(np.exp(np.mean(np.log(x)))), float(np.exp(np.mean(np.log(y))))

    def fit(xv, yv, extra=(), max_grid_starts=_MAX_STARTS):
        u, y_norm = np.log(xv / x_s), yv / y_s
        log_c = None if (free or off_fixed == 0) else math.log(off_fixed / y_s)
        return _pl_fit_core(u, np.log(y_norm), y_norm, free, log_c, huber_delta, extra, max_grid_starts)

    theta, fval = fit(x, y)
    k, pref, off = _pl_unnormalise(theta, free, off_fixed, x_s, y_s)
    rho, pearson, r2 = _fit_stats(x, y, k, pref, off)
    out = {"exponent": k, "prefactor": pref, "offset": off, "rho": rho, "pearson_r": pearson, "r2": r2,
           "exponent_ci": NAN_CI, "prefactor_ci": NAN_CI, "offset_ci": NAN_CI,
           "n": int(x.size), "n_dropped": n_dropped, "huber_loss": fval}
    if n_bootstrap > 0:
        rng = np.random.default_rng(seed)
        draws = []
        for _ in range(n_bootstrap):
            idx = rng.integers(0, x.size, x.size)
            if np.ptp(np.log(x[idx])) == 0:  # a resample with one distinct x has no exponent
                continue
            th, _ = fit(x[idx], y[idx], extra=[theta], max_grid_starts=_MAX_STARTS_BOOTSTRAP)
            draws.append(_pl_unnormalise(th, free, off_fixed, x_s, y_s))
        draws = np.asarray(draws)
        for j, key in enumerate(("exponent_ci", "prefactor_ci", "offset_ci")):
            lo, hi = np.percentile(draws[:, j], [2.5, 97.5])
            out[key] = (float(lo), float(hi))
        out["n_bootstrap"] = int(len(draws))
    return out


def predict_power_law(fit: dict, x) -> np.ndarray:
    """The fitted y at x: offset + prefactor·x^exponent."""
    return fit["offset"] + fit["prefactor"] * np.power(np.asarray(x, dtype=np.float64), fit["exponent"])


def holdout_error(x, y, *, offset=0.0, shift: float = 0.0, huber_delta: float = 1e-3,
                  drop_nonpositive: bool = False) -> float:
    """Extrapolation error: fit without the largest-x point, predict it, return (predicted − actual)/actual.

    ``shift`` is added to both prediction and actual before taking the ratio — e.g. J* when y = L − J*, so that
    every quantity's error is measured on the loss L itself and the errors are comparable.
    Needs ≥ 4 points (3 left to fit).
    """
    x, y = _check_xy(x, y, min_points=4)
    i = int(np.argmax(x))
    keep = np.arange(x.size) != i
    f = fit_power_law(x[keep], y[keep], offset=offset, huber_delta=huber_delta, drop_nonpositive=drop_nonpositive)
    actual = y[i] + shift
    if actual == 0:
        raise ValueError("the held-out point has y + shift = 0; relative error undefined")
    return float((predict_power_law(f, x[i]) + shift - actual) / actual)


def lower_envelope(compute, loss) -> np.ndarray:
    """Indices of the compute-optimal frontier, sorted by compute.

    A point is on the frontier when its loss is strictly below every loss reached at lower compute (ties in
    compute: only the lowest loss can qualify; ties in loss: the cheaper point wins). Non-finite points are ignored.
    Use ``compute[idx], loss[idx]`` for the frontier's coordinates.
    """
    c = _as_1d("compute", compute)
    l = _as_1d("loss", loss)
    if c.shape != l.shape:
        raise ValueError(f"compute and loss must have the same length, got {c.size} and {l.size}")
    ok = np.flatnonzero(np.isfinite(c) & np.isfinite(l))
    order = ok[np.lexsort((l[ok], c[ok]))]  # by compute, then loss
    frontier, best = [], math.inf
    for i in order:
        if l[i] < best:
            frontier.append(int(i))
            best = l[i]
    return np.asarray(frontier, dtype=np.int64)


# ----------------------------------------------------------------------------------------------------------------
# Chinchilla  L = E + A/N^α + B/D^β  (Hoffmann et al. approach 3, Epoch AI's replication)
# ----------------------------------------------------------------------------------------------------------------
# θ = (a, b, e, α, β), log-model = LSE(a − α·log N, b − β·log D, e); A = exp(a), B = exp(b), E = exp(e).
CHINCHILLA_GRID = {
    "alpha": np.arange(0.0, 2.01, 0.5),
    "beta": np.arange(0.0, 2.01, 0.5),
    "e": np.arange(-1.0, 1.51, 0.5),
    "a": np.arange(0.0, 25.1, 5.0),
    "b": np.arange(0.0, 25.1, 5.0),
}


def _chin_objective(theta, logn, logd, logl, delta):
    a, b, e, al, be = theta
    z = np.stack([a - al * logn, b - be * logd, np.full_like(logn, e)], axis=1)
    lse, w = _softmax_lse(z, axis=1)
    r = lse - logl
    g = huber_grad(r, delta)
    gw = w * g[:, None]
    grad = np.array([gw[:, 0].sum(), gw[:, 1].sum(), gw[:, 2].sum(),
                     -(gw[:, 0] * logn).sum(), -(gw[:, 1] * logd).sum()])
    return float(huber(r, delta).sum()), grad


def _chin_grid_values(starts, logn, logd, logl, delta):
    """Objective at every start at once (vectorised over the grid), to rank starts cheaply."""
    a, b, e, al, be = (starts[:, j:j + 1] for j in range(5))
    z = np.stack([a - al * logn, b - be * logd, np.broadcast_to(e, (len(starts), logn.size))], axis=2)
    lse, _ = _softmax_lse(z, axis=2)
    return huber(lse - logl, delta).sum(axis=1)


def _chin_fit_core(logn, logd, logl, delta, starts):
    best_theta, best_f = None, math.inf
    for th0 in starts:
        res = minimize(_chin_objective, th0, args=(logn, logd, logl, delta), jac=True, method="L-BFGS-B")
        if res.fun < best_f:
            best_theta, best_f = res.x, float(res.fun)
    return best_theta, best_f


def chinchilla_grid() -> np.ndarray:
    """All grid starts as rows (a, b, e, α, β); a and b vary slowest."""
    g = CHINCHILLA_GRID
    return np.array(list(itertools.product(g["a"], g["b"], g["e"], g["alpha"], g["beta"])), dtype=np.float64)


def _profile_starts(grid: np.ndarray, values: np.ndarray, k: int) -> np.ndarray:
    """The k most promising starts, kept diverse: for every (e, α, β) only its best (a, b), then the k best of those.

    Ranking all 5400 starts by initial objective alone picks near-duplicates of one basin (on a synthetic exact
    law the 100 best missed the truth); one start per exponent pair spreads the starts over the exponents, which
    is where the local minima differ.
    """
    n_ab = len(CHINCHILLA_GRID["a"]) * len(CHINCHILLA_GRID["b"])
    per_ab = values.reshape(n_ab, -1)  # rows: (a, b); cols: (e, α, β) — matches chinchilla_grid's order
    best_ab = np.argmin(per_ab, axis=0)
    cols = np.arange(per_ab.shape[1])
    chosen = best_ab * per_ab.shape[1] + cols
    order = np.argsort(per_ab[best_ab, cols])[:k]
    return grid[chosen[order]]


@_single_blas_thread
def fit_chinchilla(params, tokens, loss, *, drop_highest: int = 0, huber_delta: float = 1e-3, n_bootstrap: int = 0,
                   seed: int = 0, top_k: int | None = 60) -> dict:
    """Fit L = E + A/N^α + B/D^β (N = params, D = tokens) by Huber(δ) on LSE(a − α log N, b − β log D, e) − log L.

    L-BFGS-B from the grid α, β ∈ {0, 0.5, …, 2}, e ∈ {−1, −0.5, …, 1.5}, a, b ∈ {0, 5, …, 25} (5400 starts).
    ``top_k`` optimises only k starts: for each (e, α, β) of the grid its best (a, b) by initial objective, then
    the k best of those 150 (None = all 5400 starts: minutes instead of seconds; on Epoch's points 30 profile starts
    already give the same optimum as all 5400).
    ``drop_highest`` drops that many highest-loss points first (Epoch AI drop 5). Bootstrap resamples refit from
    the full fit's optimum plus the 10 best grid starts of each resample. Returns E, A, B, alpha, beta, their
    ``*_ci`` (95% percentile intervals or NaN), ``n``, ``huber_loss``.
    """
    n, d, l = (_as_1d(k, v) for k, v in (("params", params), ("tokens", tokens), ("loss", loss)))
    if not (n.shape == d.shape == l.shape):
        raise ValueError(f"params, tokens and loss must have the same length, got {n.size}, {d.size}, {l.size}")
    if not (np.isfinite(n).all() and np.isfinite(d).all() and np.isfinite(l).all()):
        raise ValueError("params, tokens and loss must all be finite")
    if (n <= 0).any() or (d <= 0).any() or (l <= 0).any():
        raise ValueError("params, tokens and loss must all be positive (the fit is in log space)")
    if not 0 <= drop_highest < n.size:
        raise ValueError(f"drop_highest must be in [0, {n.size}), got {drop_highest}")
    if drop_highest:
        keep = np.sort(np.argsort(l)[: n.size - drop_highest])
        n, d, l = n[keep], d[keep], l[keep]
    if n.size < 5:
        raise ValueError(f"need at least 5 points for the 5-parameter Chinchilla fit, got {n.size}")
    logn, logd, logl = np.log(n), np.log(d), np.log(l)

    grid = chinchilla_grid()

    def ranked_starts(ln, ld, ll, k):
        if k is None or k >= len(grid):
            return grid
        return _profile_starts(grid, _chin_grid_values(grid, ln, ld, ll, huber_delta), k)

    theta, fval = _chin_fit_core(logn, logd, logl, huber_delta, ranked_starts(logn, logd, logl, top_k))
    out = _chin_params(theta)
    out.update({f"{k}_ci": NAN_CI for k in ("E", "A", "B", "alpha", "beta")})
    out.update({"n": int(n.size), "huber_loss": fval})
    if n_bootstrap > 0:
        rng = np.random.default_rng(seed)
        draws = []
        for _ in range(n_bootstrap):
            idx = rng.integers(0, n.size, n.size)
            ln, ld, ll = logn[idx], logd[idx], logl[idx]
            starts = np.vstack([theta[None, :], ranked_starts(ln, ld, ll, 10)])
            th, _ = _chin_fit_core(ln, ld, ll, huber_delta, starts)
            p = _chin_params(th)
            draws.append([p["E"], p["A"], p["B"], p["alpha"], p["beta"]])
        draws = np.asarray(draws)
        for j, key in enumerate(("E", "A", "B", "alpha", "beta")):
            lo, hi = np.percentile(draws[:, j], [2.5, 97.5])
            out[f"{key}_ci"] = (float(lo), float(hi))
    return out


def _chin_params(theta) -> dict:
    a, b, e, al, be = (float(v) for v in theta)
    return {"E": math.exp(e), "A": math.exp(a), "B": math.exp(b), "alpha": al, "beta": be}


# ----------------------------------------------------------------------------------------------------------------
# The study table: every quantity × axis × σ (and the total)
# ----------------------------------------------------------------------------------------------------------------
# quantity → (how y is built from the tidy losses table, offset, whether noisy y ≤ 0 points are dropped,
#             whether J* is added back when measuring the extrapolation error on the loss L itself)
QUANTITIES = {
    "raw": (lambda df: df["loss"], 0.0, False, False),
    "minus_jstar": (lambda df: df["loss"] - df["optimal_loss"], 0.0, True, True),
    "excess": (lambda df: df["excess"], 0.0, True, True),
    "free_offset": (lambda df: df["loss"], "free", False, False),
}
AXES = {"compute": "flops", "params": "params"}
LOSSES_COLUMNS = ("model", "params", "images_seen", "flops", "sigma", "loss", "optimal_loss")
TABLE_COLUMNS = ["quantity", "axis", "sigma", "exponent", "exponent_ci_lo", "exponent_ci_hi", "prefactor",
                 "prefactor_ci_lo", "prefactor_ci_hi", "offset", "offset_ci_lo", "offset_ci_hi", "rho", "pearson_r",
                 "r2", "holdout_error", "n", "n_dropped", "optimal_loss", "note"]


def _points_for_axis(group: pd.DataFrame, axis: str, y: pd.Series) -> pd.DataFrame:
    """(x, y, optimal_loss) points of one σ group: the compute frontier, or each model's final snapshot."""
    pts = pd.DataFrame({"x": group[AXES[axis]].astype(float), "y": y.astype(float),
                        "jstar": group["optimal_loss"].astype(float), "model": group["model"],
                        "images_seen": group["images_seen"]})
    pts = pts[np.isfinite(pts["x"]) & np.isfinite(pts["y"])]
    if axis == "compute":
        idx = lower_envelope(pts["x"].to_numpy(), pts["y"].to_numpy())
        return pts.iloc[idx]
    last = pts.sort_values("images_seen").groupby("model", sort=False).tail(1)
    return last.sort_values("x")


def _fit_row(pts: pd.DataFrame, quantity: str, n_bootstrap: int, seed: int, huber_delta: float) -> dict:
    _, offset, drop, add_jstar = QUANTITIES[quantity]
    floor = 0.0  # both fixed offsets are 0; a free offset needs y > 0
    bad = pts["y"] <= floor
    row = {"n_dropped": int(bad.sum()) if drop else 0, "n": int((~bad).sum() if drop else len(pts)),
           "optimal_loss": float(pts["jstar"].median()) if len(pts) else math.nan}
    if drop:
        pts = pts[~bad]
    x, y = pts["x"].to_numpy(), pts["y"].to_numpy()
    f = fit_power_law(x, y, offset=offset, huber_delta=huber_delta, n_bootstrap=n_bootstrap, seed=seed)
    row.update({k: f[k] for k in ("exponent", "prefactor", "offset", "rho", "pearson_r", "r2")})
    for k in ("exponent", "prefactor", "offset"):
        row[f"{k}_ci_lo"], row[f"{k}_ci_hi"] = f[f"{k}_ci"]
    if len(x) >= 4:
        shift = float(pts["jstar"].iloc[int(np.argmax(x))]) if add_jstar else 0.0
        try:
            row["holdout_error"] = holdout_error(x, y, offset=offset, shift=shift, huber_delta=huber_delta)
        except ValueError as err:
            row["note"] = f"holdout: {err}"
    else:
        row["note"] = "holdout needs ≥ 4 points"
    return row


@_single_blas_thread
def fit_table(df: pd.DataFrame, *, quantities=tuple(QUANTITIES), axes=tuple(AXES), n_bootstrap: int = 0,
              seed: int = 0, huber_delta: float = 1e-3) -> pd.DataFrame:
    """One row per (quantity, axis, σ or total) of power-law fits to the tidy losses table.

    ``df`` has columns model, params, images_seen, flops, sigma (NaN for total rows), loss, optimal_loss, and
    optionally excess (and the *_stderr columns, unused by the fits). Quantities: ``raw`` (L, offset 0),
    ``minus_jstar`` (L − J*, offset 0, points ≤ 0 dropped), ``excess`` (E‖Dθ − D*‖², offset 0), ``free_offset``
    (L with a fitted offset). Axes: ``compute`` (x = training FLOPs; the lower envelope across sizes of that
    quantity) and ``params`` (x = parameters; each model's last snapshot). A fit that cannot be made leaves NaNs
    and says why in ``note``. ``holdout_error`` is measured on the loss L (J* added back for minus_jstar/excess).
    """
    missing = [c for c in LOSSES_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"losses table is missing columns {missing}; has {list(df.columns)}")
    for q in quantities:
        if q not in QUANTITIES:
            raise ValueError(f"unknown quantity {q!r}; choose from {list(QUANTITIES)}")
    for a in axes:
        if a not in AXES:
            raise ValueError(f"unknown axis {a!r}; choose from {list(AXES)}")
    sig = pd.to_numeric(df["sigma"], errors="coerce")
    if "weighting" in df.columns and df.loc[sig.isna(), "weighting"].nunique() > 1:
        # totals under different weightings are different quantities; fitting them together would mix them
        raise ValueError(f"total rows (sigma empty) come in several weightings "
                         f"{sorted(df.loc[sig.isna(), 'weighting'].unique())}; keep one before fitting")
    groups = [(math.nan, df[sig.isna()])] + [(float(s), df[sig == s]) for s in sorted(sig.dropna().unique())]
    rows = []
    for q, a in itertools.product(quantities, axes):
        for s, group in groups:
            if group.empty:
                continue
            row = {"quantity": q, "axis": a, "sigma": s}
            if q == "excess" and ("excess" not in group or group["excess"].isna().all()):
                rows.append({**row, "note": "no excess column", "n": 0, "n_dropped": 0})
                continue
            pts = _points_for_axis(group, a, QUANTITIES[q][0](group))
            try:
                row.update(_fit_row(pts, q, n_bootstrap, seed, huber_delta))
            except ValueError as err:
                row.update({"note": str(err), "n": len(pts)})
            rows.append(row)
    out = pd.DataFrame(rows)
    for c in TABLE_COLUMNS:
        if c not in out:
            out[c] = math.nan if c != "note" else ""
    out["note"] = out["note"].fillna("")
    return out[TABLE_COLUMNS]


# ----------------------------------------------------------------------------------------------------------------
# per-family fits: a thin layer over fit_table (one table per group of models, stacked with a `group` column)
# ----------------------------------------------------------------------------------------------------------------
POOLED = "all"  # the group of the fits over every model together (what fit_table alone gives)


def model_families(df: pd.DataFrame) -> pd.Series:
    """Each row's architecture family ("edm2", "dit", …) from its `arch` column (models.sizes' table; an arch
    name the table does not know is its own group). No `arch` column: one group, POOLED."""
    if "arch" not in df.columns:
        return pd.Series(POOLED, index=df.index)
    from models.sizes import FAMILY

    return df["arch"].map(lambda a: FAMILY.get(a, a) if isinstance(a, str) else POOLED)


def fit_table_by_family(df: pd.DataFrame, **kwargs) -> pd.DataFrame:
    """fit_table of a losses table whose models come from one family (returned unchanged), or — several families —
    the pooled fits (group POOLED) followed by each family's own fits (group = family; its frontier and its
    exponents of L and L − J* use only its models), with `group` as the first column."""
    groups = model_families(df)
    names = sorted(groups.unique())
    if len(names) <= 1:
        return fit_table(df, **kwargs)
    tables = [fit_table(df, **kwargs).assign(group=POOLED)]
    tables += [fit_table(df[groups == g], **kwargs).assign(group=g) for g in names]
    out = pd.concat(tables, ignore_index=True)
    return out[["group"] + TABLE_COLUMNS]


def pooled_fits(table: pd.DataFrame | None) -> pd.DataFrame | None:
    """The rows of a fit table over every model (drops the per-family rows of fit_table_by_family's output)."""
    if table is None or "group" not in table.columns:
        return table
    return table[table["group"] == POOLED].drop(columns="group").reset_index(drop=True)


def exponents_markdown_by_family(table: pd.DataFrame) -> str:
    """exponents_markdown, with a leading comparison of the families' total-loss exponents when the table is
    grouped by family, then each group's own summary."""
    if "group" not in table.columns:
        return exponents_markdown(table)
    fams = [g for g in table["group"].unique() if g != POOLED]
    total = table[table["sigma"].isna() & table["quantity"].isin(["raw", "minus_jstar"])]
    rows = [[g, r["quantity"], r["axis"], _ci(r, "exponent"), _ci(r, "prefactor"), _fmt(r["rho"]),
             f"{int(r['n']) if np.isfinite(r['n']) else '—'}", str(r["note"])]
            for g in fams for _, r in total[total["group"] == g].iterrows()]
    parts = ["# Scaling exponents by architecture family", "",
             f"Families: {', '.join(fams)}. Each family's fits use only its own models (its own compute frontier); "
             f"the '{POOLED}' sections pool every model. Brackets are bootstrap 95% intervals when computed.", "",
             "## Total loss: L and L − J* per family", "",
             _md_table(["family", "quantity", "axis", "exponent", "prefactor", "ρ", "n", "note"], rows), ""]
    for g in [POOLED] + fams:
        md = exponents_markdown(table[table["group"] == g].drop(columns="group"))
        parts += [md.replace("# Scaling exponents", f"# Group: {g}", 1), ""]
    return "\n".join(parts)


# ----------------------------------------------------------------------------------------------------------------
# exponents.md
# ----------------------------------------------------------------------------------------------------------------
def _fmt(v, spec=".4g") -> str:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return str(v)
    return "—" if not math.isfinite(v) else format(v, spec)


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _ci(row, key) -> str:
    lo, hi = row.get(f"{key}_ci_lo", math.nan), row.get(f"{key}_ci_hi", math.nan)
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return _fmt(row[key])
    return f"{_fmt(row[key])} [{_fmt(lo)}, {_fmt(hi)}]"


_RHO_TIE = 1e-6


def exponents_markdown(table: pd.DataFrame) -> str:
    """A readable summary of ``fit_table``'s output: the total-loss fits, then raw vs L − J* per σ."""
    parts = [
        "# Scaling exponents",
        "",
        "Fits of y = offset + prefactor·x^exponent (Huber loss, δ = 1e-3, on log-space residuals; L-BFGS-B from a "
        "grid of starts). Quantities: **raw** = the loss L (offset 0, the paper's J(F) = β·F^α); **minus_jstar** = "
        "L − J*, the loss above the dataset's optimal loss (offset 0); **excess** = E‖Dθ − D*‖², the same excess "
        "measured directly; **free_offset** = L with a fitted offset (compare it with J*). Axes: **compute** = "
        "training FLOPs, using the lower envelope across model sizes; **params** = parameter count, each model's "
        "final snapshot.",
        "",
        "Columns: ρ = |Pearson correlation| of log x vs log(y − offset), the paper's measure of how well a log-log "
        "line fits (higher is better); R² of the fit in log-y space; holdout = relative error of predicting the "
        "largest-x point from a fit without it, measured on L (J* added back); n = points fitted (n_dropped = "
        "points with y ≤ 0 from noise, dropped). Brackets are bootstrap 95% intervals when computed.",
        "",
    ]
    total = table[table["sigma"].isna()]
    if not total.empty:
        parts += ["## Total loss", ""]
        rows = [[r["quantity"], r["axis"], _ci(r, "exponent"), _ci(r, "prefactor"), _ci(r, "offset"),
                 _fmt(r["optimal_loss"]), _fmt(r["rho"]), _fmt(r["r2"]), _fmt(r["holdout_error"], ".3g"),
                 f"{int(r['n']) if np.isfinite(r['n']) else '—'}", str(r["note"])] for _, r in total.iterrows()]
        parts += [_md_table(["quantity", "axis", "exponent", "prefactor", "offset", "J*", "ρ", "R²", "holdout",
                             "n", "note"], rows), ""]
    parts += ["## Raw L vs L − J*: which fits a power law better (higher ρ)", ""]
    for axis in table["axis"].unique():
        sub = table[table["axis"] == axis]
        raw = sub[sub["quantity"] == "raw"].set_index("sigma", drop=False)
        mj = sub[sub["quantity"] == "minus_jstar"].set_index("sigma", drop=False)
        if raw.empty or mj.empty:
            continue
        rows, wins, ties, compared = [], 0, 0, 0
        for s in raw.index:
            if s not in mj.index:
                continue
            r, m = raw.loc[s], mj.loc[s]
            better = "—"
            if np.isfinite(r["rho"]) and np.isfinite(m["rho"]):
                compared += 1
                # where J*(σ) ≈ 0 the two fits are the same fit up to rounding: a tie, not a win
                if abs(m["rho"] - r["rho"]) < _RHO_TIE:
                    better, ties = "tie", ties + 1
                else:
                    better = "L − J*" if m["rho"] > r["rho"] else "raw"
                    wins += m["rho"] > r["rho"]
            label = "total" if not np.isfinite(s) else _fmt(s)
            rows.append([label, _fmt(r["rho"]), _fmt(m["rho"]), _fmt(r["exponent"]), _fmt(m["exponent"]),
                         better])
        parts += [f"### x = {axis}", "",
                  f"L − J* has the higher ρ in {wins} of {compared} fits (σ levels and total); "
                  f"{ties} are ties (|Δρ| < {_RHO_TIE:g}: σ where J* ≈ 0, so both are the same fit).", "",
                  _md_table(["σ", "ρ raw", "ρ L − J*", "exponent raw", "exponent L − J*", "higher ρ"], rows), ""]
    return "\n".join(parts)


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------
def _main_table(argv) -> int:
    ap = argparse.ArgumentParser(prog="python -m analysis.scaling",
                                 description="Power-law fits of a study's losses table → exponents.csv/.md "
                                             "(subcommand `chinchilla` fits L(N, D) instead).")
    ap.add_argument("--losses", required=True, type=Path, help="tidy losses.csv from the evaluate step")
    ap.add_argument("--out-csv", required=True, type=Path)
    ap.add_argument("--out-md", type=Path, default=None)
    ap.add_argument("--n-bootstrap", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not args.losses.is_file():
        ap.error(f"--losses file not found: {args.losses}")
    # one model family: fit_table's output; several: pooled + per-family fits with a `group` column
    table = fit_table_by_family(pd.read_csv(args.losses), n_bootstrap=args.n_bootstrap, seed=args.seed)
    with atomic_path(args.out_csv) as tmp:
        table.to_csv(tmp, index=False)
    if args.out_md is not None:
        with atomic_path(args.out_md) as tmp:
            tmp.write_text(exponents_markdown_by_family(table))
    print(f"wrote {len(table)} fits to {args.out_csv}" + (f" and {args.out_md}" if args.out_md else ""))
    return 0


def _main_chinchilla(argv) -> int:
    ap = argparse.ArgumentParser(prog="python -m analysis.scaling chinchilla",
                                 description="Fit L = E + A/N^α + B/D^β (Hoffmann et al. approach 3).")
    ap.add_argument("--csv", required=True, type=Path, help="CSV with columns params, tokens, loss")
    ap.add_argument("--drop-highest", type=int, default=0)
    ap.add_argument("--n-bootstrap", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--top-k", type=int, default=60, help="grid starts optimised (0 = all 5400)")
    args = ap.parse_args(argv)
    if not args.csv.is_file():
        ap.error(f"--csv file not found: {args.csv}")
    df = pd.read_csv(args.csv)
    missing = [c for c in ("params", "tokens", "loss") if c not in df.columns]
    if missing:
        ap.error(f"{args.csv} is missing columns {missing}")
    f = fit_chinchilla(df["params"], df["tokens"], df["loss"], drop_highest=args.drop_highest,
                       n_bootstrap=args.n_bootstrap, seed=args.seed, top_k=args.top_k or None)
    print(f"L = E + A/N^alpha + B/D^beta   ({f['n']} points, Huber loss {f['huber_loss']:.6g})")
    for k in ("E", "A", "B", "alpha", "beta"):
        lo, hi = f[f"{k}_ci"]
        ci = f"   95% CI [{lo:.4g}, {hi:.4g}]" if math.isfinite(lo) else ""
        print(f"  {k:5s} = {f[k]:.4g}{ci}")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "chinchilla":
        return _main_chinchilla(argv[1:])
    return _main_table(argv)


if __name__ == "__main__":
    sys.exit(main())
