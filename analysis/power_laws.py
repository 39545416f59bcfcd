"""The power-law fitters, each on many rows at once (replicates, simulated studies, points left out):

- fixed offset   log(y − c) = p + k·u     the weighted least-squares line, closed form       ``power_law_fixed``
- free offset    y = c + exp(p + k·u)     relative least squares, the global optimum by      ``power_law_free``
                                           enumeration of k

Rows are the leading axis; a weight matrix w [R, n] selects (0) or counts (an integer multiplicity) each point, so a
bootstrap resample, a point left out and a frontier are all just weights. u = log x. The single fit users call is
analysis.single_fits.fit_power_law.
"""

from __future__ import annotations

import numpy as np


# ----------------------------------------------------------------------------------------------------------------
# fixed-offset power law
# ----------------------------------------------------------------------------------------------------------------
def power_law_fixed(u: np.ndarray, y: np.ndarray, c, w: np.ndarray):
    """Least-squares line log(y − c) = p + k·u over the points with weight w > 0 (w counts a point w times), for
    every row at once. Returns (k, p, pearson_r, valid); rows where a used point has y ≤ c, or fewer than 3
    points, are invalid (NaN)."""
    c = np.asarray(c, dtype=np.float64)[..., None] if np.ndim(c) else float(c)
    rest = y - c
    valid = ~((w > 0) & ~(rest > 0)).any(-1) & ((w > 0).sum(-1) >= 3)
    v = np.where(w > 0, np.log(np.where(rest > 0, rest, 1.0)), 0.0)
    uw = np.where(w > 0, u, 0.0)
    sw = w.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ub, vb = (w * uw).sum(-1) / sw, (w * v).sum(-1) / sw
        du, dv = uw - ub[..., None], v - vb[..., None]
        suu, svv, suv = (w * du * du).sum(-1), (w * dv * dv).sum(-1), (w * du * dv).sum(-1)
        k = suv / suu
        r = suv / np.sqrt(suu * svv)
    p = vb - k * ub
    valid &= np.isfinite(k) & (suu > 0)
    nan = np.where(valid, 1.0, np.nan)
    return k * nan, p * nan, r * nan, valid


# ----------------------------------------------------------------------------------------------------------------
# free-offset power law
# ----------------------------------------------------------------------------------------------------------------
# exponents: enumerated on a grid, then refined around the best (step 0.05 → 1.6e-5)
_K_GRID = np.linspace(-3.0, 3.0, 121)
_REFINE, _REFINE_LEVELS = 11, 5
_CHUNK = 1024                          # rows per vectorised block (bounds memory: chunk × grid × points)


def power_law_free(u: np.ndarray, y: np.ndarray, w: np.ndarray):
    """y = c + exp(p + k·u) by relative least squares Σ w·((y − model)/y)² with 0 ≤ c < min used y, every row at
    once: for each k of a grid the best (c, A) is a weighted 2×2 solve, and the grid is refined five times, so the
    global optimum is found by enumeration, the same on every machine. Returns (k, p, c, valid)."""
    u, y, w = (np.atleast_2d(a) for a in np.broadcast_arrays(u, y, w))
    # only the used points enter: gather them to the front and drop the columns no row uses
    order = np.argsort(w <= 0, axis=1, kind="stable")[:, :max(int((w > 0).sum(1).max()), 1)]
    u, y, w = (np.take_along_axis(a, order, axis=1) for a in (u, y, w))
    parts = [_free_block(u[i:i + _CHUNK], y[i:i + _CHUNK], w[i:i + _CHUNK]) for i in range(0, len(y), _CHUNK)]
    return tuple(np.concatenate(a) for a in zip(*parts))


def _free_block(u, y, w):
    ymin = np.where(w > 0, y, np.inf).min(-1)
    cmax = ymin * (1 - 1e-9)
    valid = ((w > 0).sum(-1) >= 3) & (ymin > 0) & np.isfinite(ymin)
    # weights w/y² of relative least squares and the moments of y that do not depend on k
    om = np.where(w > 0, w / np.where(w > 0, y, 1.0) ** 2, 0.0)
    y0 = np.where(w > 0, y, 0.0)
    so, sy, syy = om.sum(-1), (om * y0).sum(-1), (om * y0 * y0).sum(-1)
    omy = (om * y0)[:, :, None]
    # u centred per row: exp(k·u) is then O(1) for every k of the grid (well-conditioned moments)
    ub = (om * np.where(w > 0, u, 0.0)).sum(-1) / np.where(so > 0, so, 1.0)
    uc = np.where(w > 0, u - ub[:, None], 0.0)

    def best_on(grid):                                       # grid [R, G]
        z = np.exp(grid[:, :, None] * uc[:, None, :])
        c, a, sse = offset_moments(z @ om[:, :, None], (z * z) @ om[:, :, None], z @ omy, so, sy, syy,
                                   cmax[:, None])
        j = np.argmin(sse, axis=1)
        rows = np.arange(len(j))
        return grid[rows, j], c[rows, j], a[rows, j]

    grid = np.broadcast_to(_K_GRID, (len(y), _K_GRID.size))
    step = _K_GRID[1] - _K_GRID[0]
    k, c, a = best_on(grid)
    for _ in range(_REFINE_LEVELS):
        grid = k[:, None] + np.linspace(-step, step, _REFINE)[None, :]
        step = 2 * step / (_REFINE - 1)
        k, c, a = best_on(grid)
    valid &= np.isfinite(k) & (a > 0)
    nan = np.where(valid, 1.0, np.nan)
    log_a = np.log(np.where(a > 0, a, 1.0)) - k * ub          # A·exp(k·(u − ū)) = A·exp(−k·ū)·exp(k·u)
    return k * nan, log_a * nan, c * nan, valid


def offset_moments(sz, szz, szy, so, sy, syy, cmax):
    """The best (c, A) of y ≈ c + A·z with 0 ≤ c ≤ cmax under weights ω, and its weighted sum of squares, for every
    grid point, from the moments Σω·z, Σω·z², Σω·z·y ([R, G] or [R, G, 1]) and Σω, Σω·y, Σω·y² ([R])."""
    sz, szz, szy = (np.reshape(v, v.shape[:2]) for v in (sz, szz, szy))
    so, sy, syy = so[:, None], sy[:, None], syy[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        a = (so * szy - sz * sy) / (so * szz - sz * sz)
        c = (sy - a * sz) / so
        clipped = (c < 0) | (c > cmax)
        c = np.clip(c, 0.0, cmax)
        a = np.where(clipped, (szy - c * sz) / szz, a)
        sse = syy - 2 * c * sy - 2 * a * szy + c * c * so + 2 * a * c * sz + a * a * szz
    return c, a, np.where(np.isfinite(sse), sse, np.inf)


def power_law_predict(u, c, k, p) -> np.ndarray:
    """c + exp(p + k·u) for rows (c, k, p [R]) at points u [R, n] (or [n])."""
    c, k, p = (np.asarray(v, dtype=np.float64)[..., None] for v in (c, k, p))
    return c + np.exp(p + k * u)
