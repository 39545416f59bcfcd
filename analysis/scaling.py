"""Scaling-law fitting primitives and the study's CLI: power laws with and without an offset, the Chinchilla
L(N, D) form, the compute frontier; the study tables themselves are analysis.study_stats'.

The paper fits J(F) = β·F^α against J(F) − J* = β·F^α and compares the correlation ρ of the log-log fits; the
Chinchilla fits follow Hoffmann et al.'s approach 3 as replicated by Epoch AI (a Huber loss with δ = 1e-3 on
log-space residuals, L-BFGS-B from a grid of starts, bootstrap for intervals); see docs/science.md.

Public interface:
- ``fit_power_law(x, y, *, offset=0.0 | "free")`` → y = offset + prefactor·x^exponent
- ``fit_chinchilla(params, tokens, loss, *, drop_highest=0)`` → L = E + A/N^α + B/D^β
- ``holdout_error``, ``lower_envelope``; ``fit_table`` (point estimates from losses.csv alone) and
  ``study_outputs`` (the whole analysis folder, with intervals from per_triple.npz) for the study DAG.

CLI::

    python -m analysis.scaling --losses losses.csv --per-triple per_triple.npz --out-dir analysis/ [--n-replicates 1000]
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
from scipy import special
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
    """Elementwise Huber loss: r²/2 inside |r| ≤ δ, δ(|r| − δ/2) outside (scipy.special.huber)."""
    return special.huber(delta, r)


def huber_grad(r: np.ndarray, delta: float) -> np.ndarray:
    """Derivative of ``huber`` with respect to r: r clipped to [−δ, δ]."""
    return np.clip(r, -delta, delta)


def _softmax_lse(z: np.ndarray, axis: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """Log-sum-exp of z along ``axis`` and the softmax weights (the LSE's gradient), computed stably by scipy."""
    return special.logsumexp(z, axis=axis), special.softmax(z, axis=axis)


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


_POLISH = 3  # best L-BFGS-B results polished to convergence


def _chin_fit_core(logn, logd, logl, delta, starts):
    """L-BFGS-B from every start, then the best few polished by a trust-region solve of the same Huber objective.

    L-BFGS-B stops on a relative decrease of the objective, which on near-exact data leaves it short of the optimum
    at a point that depends on rounding (thread count, CPU); the polish converges to the optimum itself, so the
    result is the same on every machine."""
    found = []
    for th0 in starts:
        res = minimize(_chin_objective, th0, args=(logn, logd, logl, delta), jac=True, method="L-BFGS-B")
        found.append((float(res.fun), res.x))
    found.sort(key=lambda t: t[0])
    best_theta, best_f = None, math.inf
    for _, th in found[:_POLISH]:
        th, f = _chin_polish(th, logn, logd, logl, delta)
        if f < best_f:
            best_theta, best_f = th, f
    return best_theta, best_f


def _chin_residuals(theta, logn, logd, logl):
    a, b, e, al, be = theta
    z = np.stack([a - al * logn, b - be * logd, np.full_like(logn, e)], axis=1)
    lse, w = _softmax_lse(z, axis=1)
    jac = np.stack([w[:, 0], w[:, 1], w[:, 2], -w[:, 0] * logn, -w[:, 1] * logd], axis=1)
    return lse - logl, jac


def _chin_polish(theta, logn, logd, logl, delta):
    """scipy's least_squares with loss='huber' and f_scale=δ minimises Σ huber_δ(r) exactly (its robust cost is
    f_scale²·ρ(r²/f_scale²)/2), with a trust-region method that converges to machine precision."""
    from scipy.optimize import least_squares
    res = least_squares(lambda th: _chin_residuals(th, logn, logd, logl)[0], theta,
                        jac=lambda th: _chin_residuals(th, logn, logd, logl)[1], loss="huber", f_scale=delta,
                        method="trf", xtol=1e-15, ftol=1e-15, gtol=1e-15, max_nfev=5000)
    f = float(huber(res.fun, delta).sum())
    f0 = _chin_objective(theta, logn, logd, logl, delta)[0]
    return (res.x, f) if f <= f0 else (np.asarray(theta), f0)


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
# The study's tables (analysis.study_stats) and the CLI
# ----------------------------------------------------------------------------------------------------------------
def fit_table(df: pd.DataFrame, *, quantities=None, axes=None) -> pd.DataFrame:
    """The study's fit table (analysis.study_stats.study_table) from a tidy losses table alone: point estimates,
    no intervals (those need the per-triple errors; see ``study_outputs``)."""
    from analysis.resample import replicates_from_losses
    from analysis import study_stats

    missing = [c for c in LOSSES_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"losses table is missing columns {missing}; has {list(df.columns)}")
    sig = pd.to_numeric(df["sigma"], errors="coerce")
    if "weighting" in df.columns and df.loc[sig.isna(), "weighting"].nunique() > 1:
        # totals under different weightings are different quantities; fitting them together would mix them
        raise ValueError(f"total rows (sigma empty) come in several weightings "
                         f"{sorted(df.loc[sig.isna(), 'weighting'].unique())}; keep one before fitting")
    return study_stats.study_table(replicates_from_losses(df), quantities=quantities or study_stats.QUANTITIES,
                                   axes=axes or study_stats.AXES)


LOSSES_COLUMNS = ("model", "params", "images_seen", "flops", "sigma", "loss", "optimal_loss")
STUDY_OUTPUTS = ("exponents.csv", "exponents.md", "verdict.csv", "offset_profile.csv", "compute_optimal.csv")


POOLED = "all"  # the group of the fits over every model together


def model_families(df: pd.DataFrame) -> pd.Series:
    """Each row's architecture family ("edm2", "dit", …) from its `arch` column (models.sizes' table; an arch
    name the table does not know is its own group). No `arch` column: one group, POOLED."""
    if "arch" not in df.columns:
        return pd.Series(POOLED, index=df.index)
    from models.sizes import FAMILY

    return df["arch"].map(lambda a: FAMILY.get(a, a) if isinstance(a, str) else POOLED)


def pooled_fits(table: pd.DataFrame | None) -> pd.DataFrame | None:
    """The rows of a fit table over every model (drops the per-family rows of a multi-family study)."""
    if table is None or "group" not in table.columns:
        return table
    return table[table["group"] == POOLED].drop(columns="group").reset_index(drop=True)


def study_outputs(losses: pd.DataFrame, per_triple: dict | None, out_dir, *, n_replicates: int = 1000,
                  seed: int = 0) -> dict:
    """Every table of a study's analysis folder: exponents.csv/.md, verdict.csv (with delta_rho and its interval),
    offset_profile.csv and compute_optimal.csv. With ``per_triple`` (analysis.resample) the intervals come from
    ``n_replicates`` resamples of the evaluation triples; without it there are none.

    A study whose models come from several architecture families also gets each family's own fits (exponents.csv
    then starts with a `group` column: POOLED, then one group per family, each with its own frontier) and
    family_differences.csv: the difference of the families' exponents, paired on the same replicates."""
    from analysis import study_stats
    from analysis.resample import replicates, replicates_from_losses

    reps = replicates(per_triple, n_replicates, seed) if per_triple is not None else replicates_from_losses(losses)
    fits = study_stats.StudyFits(reps)
    tables = {"exponents.csv": study_stats.study_table(fits), "verdict.csv": study_stats.verdict_table(fits),
              "offset_profile.csv": study_stats.offset_profile(fits),
              "compute_optimal.csv": study_stats.compute_optimal_table(reps)}
    family_of = dict(zip(losses["model"], model_families(losses)))
    families = reps.snapshots["model"].map(family_of).fillna(POOLED).to_numpy()
    by_family = {}
    if len(set(families)) > 1:
        by_family = {f: study_stats.StudyFits(reps.subset(families == f)) for f in sorted(set(families))}
        tables["exponents.csv"] = pd.concat(
            [tables["exponents.csv"].assign(group=POOLED)]
            + [study_stats.study_table(f).assign(group=g) for g, f in by_family.items()], ignore_index=True)
        tables["exponents.csv"] = tables["exponents.csv"][["group"] + study_stats.TABLE_COLUMNS]
        tables["family_differences.csv"] = study_stats.family_difference_table(by_family)
    md = study_stats.study_markdown(pooled_fits(tables["exponents.csv"]), tables["verdict.csv"],
                                    tables["compute_optimal.csv"], reps.n_replicates)
    if by_family:
        md = study_stats.families_markdown(tables["exponents.csv"], tables["family_differences.csv"]) + "\n" + md
    out_dir = Path(out_dir)
    for name, table in tables.items():
        with atomic_path(out_dir / name) as tmp:
            table.to_csv(tmp, index=False)
    with atomic_path(out_dir / "exponents.md") as tmp:
        tmp.write_text(md)
    return {**tables, "exponents.md": md}


def _main_table(argv) -> int:
    ap = argparse.ArgumentParser(prog="python -m analysis.scaling",
                                 description="A study's fits, verdict and compute-optimal law → the analysis folder "
                                             "(subcommand `chinchilla` fits L(N, D) to a CSV instead).")
    ap.add_argument("--losses", required=True, type=Path, help="tidy losses.csv from the evaluate step")
    ap.add_argument("--per-triple", type=Path, default=None,
                    help="per_triple.npz from the evaluate step (intervals; without it: point estimates only)")
    ap.add_argument("--out-dir", required=True, type=Path, help="writes " + ", ".join(STUDY_OUTPUTS))
    ap.add_argument("--n-replicates", type=int, default=1000, help="bootstrap replicates of the evaluation set")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not args.losses.is_file():
        ap.error(f"--losses file not found: {args.losses}")
    if args.per_triple is not None and not args.per_triple.is_file():
        ap.error(f"--per-triple file not found: {args.per_triple}")
    if args.n_replicates < 0:
        ap.error(f"--n-replicates must be ≥ 0, got {args.n_replicates}")
    from analysis.evaluate import read_losses
    from analysis.resample import load_per_triple
    from models.integrity import IntegrityError
    try:  # both checked against their checksums and validated: no NaN or missing row reaches a fit
        losses = read_losses(args.losses)
        per_triple = load_per_triple(args.per_triple) if args.per_triple is not None else None
    except IntegrityError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = study_outputs(losses, per_triple, args.out_dir, n_replicates=args.n_replicates, seed=args.seed)
    print(f"wrote {len(out['exponents.csv'])} fits, the verdict, the offset profile and the compute-optimal law "
          f"to {args.out_dir}")
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
