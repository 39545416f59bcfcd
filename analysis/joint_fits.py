"""Fitting the joint law L(N, D) = E + A/N^a + B/D^b (analysis.joint_law): where the solves start and which rows
are refitted from which optimum.

- starts         the study's grid (``joint_starts``); Epoch AI's grid of Chinchilla starts, its most promising
                 kept diverse (``epoch_starts``, ``profile_starts``)
- one data set   every start solved at once, the best few polished (``joint_fit``)
- many rows      every weight row refitted from one optimum at once, rows left at a bound polished
                 (``joint_refit``); row 0 from starts and the others from its optimum (``joint_rows``)

A free floor the data drive towards 0 (below FLOOR_AT_ZERO of the smallest loss) is set to exactly 0 and the rest
refitted, so where a solver stops does not depend on rounding.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from analysis.joint_law import (
    JOINT_MAX_ITER,
    joint_log_model,
    joint_objective,
    joint_polish,
    joint_solve,
    joint_solve_bounded,
)

_REFIT_BLOCK = 1_000_000  # rows × points per vectorised refit in joint_rows (bounds memory)
_POLISH = 3            # best batched solutions of a grid of starts polished by the bounded trust-region solve
BATCHED_POLISH = True  # joint_refit's rows at a bound: the bounded batch (joint_solve_bounded) before any one-by-one solve
FLOOR_AT_ZERO = 1e-6   # a free floor below this fraction of the smallest loss is set to exactly 0


def joint_starts(logl, free: bool) -> np.ndarray:
    """A grid of starts: exponents a, b, and the two terms (and the floor) as fractions of the median loss."""
    lm = float(np.nanmedian(logl))
    grid = []
    for a, b, fa, fb in itertools.product((0.1, 0.3, 0.7, 1.5), (0.1, 0.3, 0.7, 1.5), (0.05, 0.3), (0.05, 0.3)):
        for fe in ((0.2, 0.6, 0.9) if free else (None,)):
            th = [lm + math.log(fa), lm + math.log(fb), a, b]
            grid.append(th + ([lm + math.log(fe)] if free else []))
    return np.array(grid)


def joint_fit(n, d, logl, *, log_floor=None, free=None, weights=None, huber_delta=None, starts=None,
              polish=_POLISH, max_starts=None):
    """The best fit of one data set from a grid of starts: every start solved at once, the best ``polish`` by the
    bounded solve (``max_starts``: only the first start and the best others by their initial objective are
    solved). A free floor (``free`` True, or ``log_floor`` None) below FLOOR_AT_ZERO of the smallest loss is set to
    exactly 0 and the rest refitted: the data then drive it towards 0, where its gradient vanishes and where a
    solver stops would depend on rounding. Returns (θ [k], objective); a floor set to 0 has θ[4] = −inf."""
    free = log_floor is None if free is None else free
    logl = np.asarray(logl, dtype=np.float64)
    starts = joint_starts(logl, free) if starts is None else np.atleast_2d(starts)
    used = np.isfinite(logl) & (True if weights is None else np.asarray(weights) > 0)
    if max_starts is not None and len(starts) > max_starts:
        w = used.astype(np.float64)
        r = joint_log_model(starts, n, d, None if free else np.full(len(starts), log_floor)) - np.where(used, logl, 0)
        order = np.argsort(joint_objective(r, np.broadcast_to(w, r.shape), huber_delta)[1:], kind="stable") + 1
        starts = starts[np.r_[0, order[: max_starts - 1]]]
    lf = None if free else np.full(len(starts), log_floor)
    at_zero = logl[used].min() + math.log(FLOOR_AT_ZERO)
    th, f, _ = joint_solve(starts, n, d, logl, log_floor=lf, weights=weights, huber_delta=huber_delta,
                           stop_floor_below=np.full(len(starts), at_zero) if free else None)
    best, best_f = None, math.inf
    for i in np.argsort(f, kind="stable")[:polish]:
        t, fi = joint_polish(th[i], n, d, logl, log_floor=log_floor, weights=weights, huber_delta=huber_delta)
        if fi < best_f - 1e-15:
            best, best_f = t, fi
    if free and best[4] <= at_zero:
        th4, f4 = joint_polish(best[:4], n, d, logl, log_floor=-math.inf, weights=weights, huber_delta=huber_delta)
        best, best_f = np.r_[th4, -math.inf], f4
    return best, best_f


def _polish_rows(th, rows, n, d, logl, w, log_floor=None, fallback=None, stop_floor_below=None):
    """θ of ``rows`` that the unbounded batch left at a bound or unconverged: the bounded batch first, the bounded
    trust-region solve one by one only where it does not reach the first-order conditions (or does worse)."""
    if rows.size == 0:
        return th
    lf = None if log_floor is None else log_floor[rows]
    stop = None if stop_floor_below is None else stop_floor_below[rows]
    # more iterations than the first batch: rows left unconverged there creep along a flat valley, and a batched
    # iteration costs a small fraction of one trust-region solve
    tb, fb, ok = joint_solve_bounded(th[rows], n, d, logl[rows], log_floor=lf, weights=w[rows],
                                     stop_floor_below=stop, max_iter=10 * JOINT_MAX_ITER)
    for j, i in enumerate(rows):
        if ok[j]:
            th[i] = tb[j]
        else:
            start = th[i] if fallback is None else fallback[i]
            th[i], _ = joint_polish(start, n, d, logl[i], log_floor=None if lf is None else lf[j], weights=w[i])
    return th


def joint_refit(theta, n, d, logl, *, log_floor=None, weights=None, floor_start=None,
                huber_delta=None) -> np.ndarray:
    """Every row's least-squares (or Huber(δ), ``huber_delta``) fit from one start θ (warm start: a point
    estimate), all at once; rows the batched solve leaves at a bound or unconverged are polished one by one.
    ``log_floor`` [R] fixes E (k = 4); without it E is free (k = 5), starting at ``floor_start`` [R] where θ's own
    floor is 0, and set to 0 where the data drive it there (as ``joint_fit``). ``logl`` [R, S], ``weights``
    [R, S]. Returns θ [R, k]."""
    h = huber_delta
    logl = np.atleast_2d(np.asarray(logl, dtype=np.float64))
    r = len(logl)
    w = np.ones(logl.shape) if weights is None else np.broadcast_to(np.asarray(weights, dtype=np.float64),
                                                                     logl.shape)
    w = np.where(np.isfinite(logl), w, 0.0)
    theta = np.asarray(theta, dtype=np.float64)
    if log_floor is not None:
        lf = np.broadcast_to(np.asarray(log_floor, dtype=np.float64), (r,))
        th, _, ok = joint_solve(np.broadcast_to(theta[:4], (r, 4)), n, d, logl, log_floor=lf, weights=w,
                                huber_delta=h)
        if BATCHED_POLISH and h is None:
            return _polish_rows(th, np.flatnonzero(~ok), n, d, logl, w, lf, np.broadcast_to(theta[:4], (r, 4)))
        for i in np.flatnonzero(~ok):
            th[i], _ = joint_polish(theta[:4], n, d, logl[i], log_floor=lf[i], weights=w[i], huber_delta=h)
        return th
    start = np.broadcast_to(theta, (r, 5)).copy()
    if not np.isfinite(theta[4]):
        start[:, 4] = floor_start if floor_start is not None else np.log(0.5) + np.nanmin(
            np.where(w > 0, logl, np.nan), axis=1)
    at_zero = np.where(w > 0, logl, np.inf).min(axis=1) + math.log(FLOOR_AT_ZERO)
    th, _, ok = joint_solve(start, n, d, logl, weights=w, stop_floor_below=at_zero, huber_delta=h)
    # rows the batched solve drives below the zero line need no bounded solve of the five-parameter law
    if BATCHED_POLISH and h is None:
        th = _polish_rows(th, np.flatnonzero(~ok & (th[:, 4] > at_zero)), n, d, logl, w, fallback=start,
                          stop_floor_below=at_zero)
    else:
        for i in np.flatnonzero(~ok & (th[:, 4] > at_zero)):
            th[i], _ = joint_polish(start[i], n, d, logl[i], weights=w[i], huber_delta=h)
    snap = th[:, 4] <= at_zero
    if snap.any():
        i = np.flatnonzero(snap)
        th4, _, ok4 = joint_solve(th[i, :4], n, d, logl[i], log_floor=np.full(i.size, -math.inf), weights=w[i],
                                 huber_delta=h)
        if BATCHED_POLISH and h is None:
            th4 = _polish_rows(th4, np.flatnonzero(~ok4), n, d, logl[i], w[i], np.full(i.size, -math.inf),
                               th[i, :4])
        else:
            for j in np.flatnonzero(~ok4):
                th4[j], _ = joint_polish(th[i[j], :4], n, d, logl[i[j]], log_floor=-math.inf, weights=w[i[j]],
                                         huber_delta=h)
        th[i, :4], th[i, 4] = th4, -math.inf
    return th


def joint_rows(n, d, logl, weights, log_floor=None, *, huber_delta=None, starts=None, floor_start=None,
               **fit_kw):
    """The joint law L = E + A/N^a + B/D^b on every row of ``weights`` [R, S] (and of ``logl``, [R, S] or [S]):
    row 0 from a grid of starts (joint_fit; ``starts`` θ rows, None = its own grid; ``fit_kw`` its other
    options), the other rows refitted from row 0's optimum at once (joint_refit), in blocks. ``log_floor`` [R] fixes log E per row, None
    fits it (``floor_start`` [R]: where a row starts E when row 0's floor is 0). Returns (θ [R, k], row 0's
    objective)."""
    weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    r = len(weights)
    logl = np.broadcast_to(np.asarray(logl, dtype=np.float64), weights.shape)
    lf = None if log_floor is None else np.broadcast_to(np.asarray(log_floor, dtype=np.float64), (r,))
    theta0, f0 = joint_fit(n, d, logl[0], log_floor=None if lf is None else lf[0], weights=weights[0],
                           huber_delta=huber_delta, starts=starts, **fit_kw)
    theta = np.empty((r, len(theta0)))
    theta[0] = theta0
    block = max(1, _REFIT_BLOCK // max(1, weights.shape[1]))
    for a in range(1, r, block):
        b = min(r, a + block)
        theta[a:b] = joint_refit(theta0, n, d, logl[a:b], log_floor=None if lf is None else lf[a:b],
                                 weights=weights[a:b], huber_delta=huber_delta,
                                 floor_start=None if floor_start is None else floor_start[a:b])
    return theta, f0


# ----------------------------------------------------------------------------------------------------------------
# Epoch AI's grid of starts (Hoffmann et al.'s approach 3, as Epoch AI replicated it)
# ----------------------------------------------------------------------------------------------------------------
# Epoch's grid in their parametrisation (a, b, e, α, β), log L̂ = LSE(a − α·log N, b − β·log D, e)
CHINCHILLA_GRID = {
    "alpha": np.arange(0.0, 2.01, 0.5),
    "beta": np.arange(0.0, 2.01, 0.5),
    "e": np.arange(-1.0, 1.51, 0.5),
    "a": np.arange(0.0, 25.1, 5.0),
    "b": np.arange(0.0, 25.1, 5.0),
}


def chinchilla_grid() -> np.ndarray:
    """All grid starts as rows (a, b, e, α, β); a and b vary slowest."""
    g = CHINCHILLA_GRID
    return np.array(list(itertools.product(g["a"], g["b"], g["e"], g["alpha"], g["beta"])), dtype=np.float64)


def profile_starts(grid: np.ndarray, values: np.ndarray, k: int) -> np.ndarray:
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


def _from_epoch(grid, scale):
    """Epoch's (a, b, e, α, β) → θ = (log A', log B', α, β, log E) on normalised N, D."""
    a, b, e, al, be = grid.T
    return np.column_stack([a - al * math.log(scale[0]), b - be * math.log(scale[1]), al, be, e])


def epoch_starts(n, d, logl, scale, *, top_k: int | None = 60, huber_delta: float | None = 1e-3,
                 log_floor=None, grid=None) -> np.ndarray:
    """Epoch AI's grid of starts as θ rows on normalised n = log(N/N_s), d = log(D/D_s) (``scale`` = (N_s, D_s)):
    all 5400, or with ``top_k`` the k most promising by their objective, kept diverse (``profile_starts``). With a
    fixed ``log_floor`` the grid's e is moot: its starts are θ[:4], each once. ``grid``: other rows (a, b, e, α, β)
    in Epoch's parametrisation instead (then ``top_k`` must be None)."""
    if grid is not None:
        theta = _from_epoch(np.atleast_2d(grid), scale)
        return theta if log_floor is None else theta[:, :4]
    grid = chinchilla_grid()
    starts = _from_epoch(grid, scale)
    fixed = log_floor is not None
    if top_k is not None and top_k < len(grid):
        lf = np.full(len(starts), log_floor) if fixed else None
        values = joint_objective(joint_log_model(starts[:, :4] if fixed else starts, n, d, lf) - logl,
                            np.ones((len(starts), logl.size)), huber_delta)
        starts = _from_epoch(profile_starts(grid, values, len(grid) if fixed else top_k), scale)
    if fixed:
        _, first = np.unique(starts[:, :4], axis=0, return_index=True)
        starts = starts[np.sort(first)][:top_k, :4]
    return starts
