"""The fitters: one per law family, each fitting many rows at once (replicates, grid starts, simulated studies).

- fixed-offset power law  log(y − c) = p + k·u            least-squares line, closed form      ``power_law_fixed``
- free-offset power law   y = c + exp(p + k·u)            relative least squares, the global     ``power_law_free``
                                                           optimum by enumeration of k
- joint law               L(N, D) = E + A/N^a + B/D^b     in log space, least squares or Huber;   ``joint_solve``,
                          (E fixed — J*, 0 — or free)      damped Newton on every row at once,     ``joint_fit``,
                                                           a bounded trust-region polish           ``joint_refit``

Rows are the leading axis; a weight matrix w [R, n] selects (0) or counts (an integer multiplicity) each point, so a
bootstrap resample, a point left out and a frontier are all just weights. u = log x.

The single-fit functions other code and users call — ``fit_power_law``, ``predict_power_law``, ``holdout_error``,
``fit_chinchilla``, ``fit_compute_optimal`` — are thin users of these (analysis.scaling re-exports the first four).
Chinchilla fits (Hoffmann et al.'s approach 3 as Epoch AI replicated it) use the joint law with a Huber loss
(δ = 1e-3) on log residuals from a grid of starts; see docs/science.md.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
from scipy import special
from scipy.optimize import least_squares

from analysis.intervals import percentile_interval

NAN_CI = (math.nan, math.nan)


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


# ----------------------------------------------------------------------------------------------------------------
# joint law  L(N, D) = E + A/N^a + B/D^b
# ----------------------------------------------------------------------------------------------------------------
# θ = (log A', log B', a, b[, log E]) on n = log(N/N_s), d = log(D/D_s) (N_s, D_s the geometric means of the
# data, so every parameter is O(1)); log L̂ = LSE(log A' − a·n, log B' − b·d, log E). k = 4: E is fixed
# (log_floor per row; −inf = no floor), k = 5: E is fitted.
JOINT_MAX_EXPONENT = 10.0
_MAX_ITER = 200
_REFIT_BLOCK = 1_000_000  # rows × points per vectorised refit in joint_rows (bounds memory)
_POLISH = 3            # best batched solutions of a grid of starts polished by the bounded trust-region solve
BATCHED_POLISH = True  # joint_refit's rows at a bound: the bounded batch (joint_solve_bounded) before any one-by-one solve
FLOOR_AT_ZERO = 1e-6   # a free floor below this fraction of the smallest loss is set to exactly 0


def joint_scale(params, images) -> tuple[float, float]:
    """(N_s, D_s): the geometric means that normalise N and D."""
    return (float(np.exp(np.mean(np.log(np.asarray(params, dtype=np.float64))))),
            float(np.exp(np.mean(np.log(np.asarray(images, dtype=np.float64))))))


def joint_bounds(k: int):
    lo = [-50.0, -50.0, 0.0, 0.0] + ([-50.0] if k == 5 else [])
    hi = [50.0, 50.0, JOINT_MAX_EXPONENT, JOINT_MAX_EXPONENT] + ([50.0] if k == 5 else [])
    return np.array(lo), np.array(hi)


def joint_log_model(theta, n, d, log_floor=None, *, terms=False):
    """log L̂ [P, S] for rows θ [P, k] at points n, d ([S] or [P, S]); with ``terms`` also the softmax weights
    (w_A, w_B, w_E) of the three terms."""
    theta = np.atleast_2d(theta)
    ta = theta[:, 0:1] - theta[:, 2:3] * n
    tb = theta[:, 1:2] - theta[:, 3:4] * d
    te = theta[:, 4:5] if theta.shape[1] == 5 else np.asarray(log_floor, dtype=np.float64).reshape(-1, 1)
    lse = np.logaddexp(np.logaddexp(ta, tb), te)
    if not terms:
        return lse
    return lse, (np.exp(ta - lse), np.exp(tb - lse), np.exp(te - lse))


def joint_residuals(theta, n, d, logl, log_floor=None):
    """Residuals r [P, S] = log L̂ − log L and their Jacobian [P, S, k] (closed-form log-sum-exp of three terms)."""
    theta = np.atleast_2d(theta)
    lse, (wa, wb, we) = joint_log_model(theta, n, d, log_floor, terms=True)
    n, d = np.broadcast_to(n, lse.shape), np.broadcast_to(d, lse.shape)
    cols = [wa, wb, -wa * n, -wb * d] + ([we] if theta.shape[1] == 5 else [])
    return lse - logl, np.stack(cols, axis=2)


def _objective(r, w, huber_delta):
    if huber_delta is None:
        return np.einsum("ps,ps->p", w * r, r)
    return (w * special.huber(huber_delta, r)).sum(1)


def _newton_system(theta, n, d, logl, lf, w, huber_delta):
    """The objective, its (half-)gradient and Hessian for every row. Least squares: F = Σ w·r², the exact Hessian
    JᵀWJ + Σ w·r·∇²r (these fits' residuals are not small enough for Gauss–Newton's JᵀWJ alone, which then
    converges slowly); Huber: the same with the reweighting w·min(1, δ/|r|), whose gradient is the Huber
    loss's. ∇²log L̂ = Σ_j w_j x_j x_jᵀ − ∇∇ᵀ for the three terms t_j = x_j·θ + const."""
    lse, (wa, wb, we) = joint_log_model(theta, n, d, lf, terms=True)
    r = lse - logl
    n, d = np.broadcast_to(n, r.shape), np.broadcast_to(d, r.shape)
    k = theta.shape[1]
    jac = np.stack([wa, wb, -wa * n, -wb * d] + ([we] if k == 5 else []), axis=2)
    om = w if huber_delta is None else w * np.minimum(1.0, huber_delta / np.maximum(np.abs(r), 1e-300))
    jt = jac.transpose(0, 2, 1)
    jtwj = np.matmul(jt * om[:, None, :], jac)
    orr = om * r
    g = np.matmul(jt, orr[:, :, None])[:, :, 0]
    h = jtwj - np.matmul(jt * orr[:, None, :], jac)
    ra, rb = orr * wa, orr * wb
    h[:, 0, 0] += ra.sum(1)
    h[:, 1, 1] += rb.sum(1)
    h[:, 0, 2] -= (ra * n).sum(1)
    h[:, 2, 0] -= (ra * n).sum(1)
    h[:, 2, 2] += (ra * n * n).sum(1)
    h[:, 1, 3] -= (rb * d).sum(1)
    h[:, 3, 1] -= (rb * d).sum(1)
    h[:, 3, 3] += (rb * d * d).sum(1)
    if k == 5:
        h[:, 4, 4] += (orr * we).sum(1)
    return _objective(r, w, huber_delta), g, h, np.einsum("pkk->pk", jtwj)


def _prepare_rows(p, n, d, logl, log_floor, weights):
    logl = np.broadcast_to(np.asarray(logl, dtype=np.float64), (p, np.shape(logl)[-1]))
    w = np.ones(logl.shape) if weights is None else np.broadcast_to(np.asarray(weights, dtype=np.float64),
                                                                     logl.shape)
    w = np.where(np.isfinite(logl), w, 0.0)
    logl = np.where(w > 0, logl, 0.0)
    lf = np.zeros(p) if log_floor is None else np.broadcast_to(np.asarray(log_floor, dtype=np.float64), (p,))
    return logl, w, lf.copy()


def _rows(a, i):
    """Rows ``i`` of per-row points [P, S], or points shared by every row ([S]) as they are."""
    return a if np.ndim(a) < 2 else a[i]


def _accept_better(i, new, system, theta, f, g, h, scale, lam, done):
    """One Levenberg–Marquardt acceptance on rows ``i`` (in place): a trial θ ``new`` whose Newton ``system``
    (objective, gradient, Hessian, scale) lowers the objective is taken and its damping relaxed; otherwise the
    damping grows. A row is done when its step no longer changes θ (to rounding) or no step improves on it."""
    fn, gn, hn, sn = system
    better = fn < f[i]
    moved = np.abs(new - theta[i]).max(axis=1)
    a = i[better]
    theta[a], f[a], g[a], h[a], scale[a] = new[better], fn[better], gn[better], hn[better], sn[better]
    lam[i] = np.where(better, np.maximum(lam[i] * 0.1, 1e-12), lam[i] * 10.0)
    done[i] |= (moved <= 1e-13 * (1.0 + np.abs(theta[i]).max(axis=1))) | (lam[i] > 1e12)


def joint_solve(theta0, n, d, logl, *, log_floor=None, weights=None, huber_delta=None, stop_floor_below=None):
    """Damped Newton (Levenberg–Marquardt on the exact Hessian) from θ0 [P, k] on every row at once: returns
    (θ [P, k], objective [P], ok [P]).

    ``logl`` [P, S] or [S]; ``weights`` [P, S] (0 = point not used; non-finite log L are not used either);
    ``log_floor`` [P] the fixed log E when k = 4. ``ok`` marks rows that converged to an interior point (no bound
    active, the remaining Newton step negligible); the others need the bounded trust-region solve
    (``joint_polish``). A free floor (k = 5) whose log falls below ``stop_floor_below`` [P] stops there (it is set
    to 0 anyway)."""
    theta0 = np.atleast_2d(np.asarray(theta0, dtype=np.float64))
    p, k = theta0.shape
    logl, w, lf = _prepare_rows(p, n, d, logl, log_floor, weights)
    lo, hi = joint_bounds(k)
    theta = np.clip(theta0, lo, hi)
    f, g, h, scale = _newton_system(theta, n, d, logl, lf, w, huber_delta)
    lam = np.full(p, 1e-3)
    done = np.zeros(p, dtype=bool)
    eye = np.eye(k)
    for _ in range(_MAX_ITER):
        i = np.flatnonzero(~done)
        if i.size == 0:
            break
        damp = (lam[i, None] * np.maximum(scale[i], 1e-12))[:, :, None] * eye
        step = -_solve(h[i] + damp, g[i])
        new = np.clip(theta[i] + np.nan_to_num(step), lo, hi)
        _accept_better(i, new, _newton_system(new, _rows(n, i), _rows(d, i), logl[i], lf[i], w[i], huber_delta),
                       theta, f, g, h, scale, lam, done)
        if stop_floor_below is not None:
            stop = np.broadcast_to(stop_floor_below, (p,))
            # a floor whose term has all but vanished only creeps down step by step: try the stop line at once
            fading = i[(scale[i, 4] < 1e-8 * scale[i, 0]) & ~done[i] & (theta[i, 4] >= stop[i])]
            if fading.size:
                jump = theta[fading].copy()
                jump[:, 4] = stop[fading] - 1.0
                fj, gj, hj, sj = _newton_system(jump, _rows(n, fading), _rows(d, fading), logl[fading], lf[fading],
                                                w[fading], huber_delta)
                ok_jump = fj <= f[fading] * (1 + 1e-12)
                a = fading[ok_jump]
                theta[a], f[a], g[a], h[a], scale[a] = jump[ok_jump], fj[ok_jump], gj[ok_jump], hj[ok_jump], sj[ok_jump]
            done[i] |= theta[i, 4] < stop[i]
    # Near the optimum the objective changes by less than its rounding, so the acceptance test above stops a little
    # short; two plain Newton steps (which use the gradient, not the objective) settle on the stationary point.
    for _ in range(2):
        new = theta - _newton_step(h, g)
        with np.errstate(invalid="ignore", over="ignore"):       # a row with no finite step is not taken
            fn, gn, hn, sn = _newton_system(new, n, d, logl, lf, w, huber_delta)
        take = done & np.isfinite(fn) & (fn <= f * (1 + 1e-12))
        theta[take], f[take], g[take], h[take], scale[take] = new[take], fn[take], gn[take], hn[take], sn[take]
    interior = ((theta > lo + 1e-9) & (theta < hi - 1e-9)).all(axis=1)
    left = np.abs(_newton_step(h, g)).max(axis=1)
    ok = done & interior & (left <= 1e-9 * (1.0 + np.abs(theta).max(axis=1)))
    return theta, f, ok


def _solve(a, b):
    """Batched a⁻¹b [P, k]; a row whose matrix is singular gets NaN instead of failing the batch."""
    with np.errstate(all="ignore"):
        try:
            return np.linalg.solve(a, b[:, :, None])[:, :, 0]
        except np.linalg.LinAlgError:
            out = np.full(b.shape, np.nan)
            for i in range(len(a)):
                try:
                    out[i] = np.linalg.solve(a[i], b[i])
                except np.linalg.LinAlgError:
                    pass
            return out


def _newton_step(h, g):
    step = _solve(h, g)
    return np.where(np.isfinite(step), step, np.inf)


def joint_polish(theta0, n, d, logl, *, log_floor=None, weights=None, huber_delta=None):
    """One row by scipy's bounded trust-region least squares (`least_squares`, method trf, converged to machine
    precision); Huber with f_scale = δ minimises Σ huber_δ(r) exactly. Integer weights repeat points. Returns
    (θ, objective)."""
    theta0 = np.asarray(theta0, dtype=np.float64)
    logl = np.asarray(logl, dtype=np.float64)
    w = np.ones(logl.shape) if weights is None else np.asarray(weights, dtype=np.float64)
    w = np.where(np.isfinite(logl), w, 0.0)
    rep = np.round(w).astype(np.int64)
    n, d, logl = (np.repeat(np.broadcast_to(v, logl.shape), rep) for v in (n, d, logl))
    lf = None if len(theta0) == 5 else np.array([log_floor])
    lo, hi = joint_bounds(len(theta0))

    def fun(th):
        return joint_residuals(th[None], n, d, logl[None], lf)[0][0]

    def jac(th):
        return joint_residuals(th[None], n, d, logl[None], lf)[1][0]

    res = least_squares(fun, np.clip(theta0, lo, hi), jac=jac, bounds=(lo, hi), method="trf",
                        loss="linear" if huber_delta is None else "huber", f_scale=huber_delta or 1.0,
                        xtol=1e-15, ftol=1e-15, gtol=1e-15, max_nfev=5000)
    f = _objective(res.fun[None], np.ones((1, res.fun.size)), huber_delta)[0]
    f0 = _objective(fun(np.clip(theta0, lo, hi))[None], np.ones((1, logl.size)), huber_delta)[0]
    return (res.x, float(f)) if f <= f0 else (np.clip(theta0, lo, hi), float(f0))


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
        order = np.argsort(_objective(r, np.broadcast_to(w, r.shape), huber_delta)[1:], kind="stable") + 1
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


def joint_solve_bounded(theta0, n, d, logl, *, log_floor=None, weights=None, max_iter=_MAX_ITER,
                        stop_floor_below=None):
    """Least squares on every row at once within the bounds, by damped Newton on the free parameters (an active
    set: a parameter at a bound whose gradient pushes outward is held there). Returns (θ [P, k], objective [P],
    ok [P]): ok where the first-order (KKT) conditions hold to 1e-9 — the free parameters' Newton step negligible,
    every held parameter's gradient pointing out of the box; the others need ``joint_polish``. A free floor whose
    log falls below ``stop_floor_below`` [P] stops there, ok (it is set to 0 anyway, as in ``joint_solve``)."""
    theta0 = np.atleast_2d(np.asarray(theta0, dtype=np.float64))
    p, k = theta0.shape
    logl, w, lf = _prepare_rows(p, n, d, logl, log_floor, weights)
    lo, hi = joint_bounds(k)
    theta = np.clip(theta0, lo, hi)
    f, g, h, scale = _newton_system(theta, n, d, logl, lf, w, None)
    lam, done, eye = np.full(p, 1e-3), np.zeros(p, dtype=bool), np.eye(k)
    stop = None if stop_floor_below is None or k != 5 else np.broadcast_to(stop_floor_below, (p,))

    def reduced(theta, g, h):
        held = ((theta <= lo + 1e-12) & (g > 0)) | ((theta >= hi - 1e-12) & (g < 0))
        mask = held[:, :, None] | held[:, None, :]
        return held, np.where(mask, 0.0, h) + held[:, :, None] * eye, np.where(held, 0.0, g)

    for _ in range(max_iter):
        i = np.flatnonzero(~done)
        if i.size == 0:
            break
        held, hr, gr = reduced(theta[i], g[i], h[i])
        damp = (lam[i, None] * np.maximum(scale[i], 1e-12) * ~held)[:, :, None] * eye
        new = np.clip(theta[i] - np.nan_to_num(_solve(hr + damp, gr)), lo, hi)
        _accept_better(i, new, _newton_system(new, _rows(n, i), _rows(d, i), logl[i], lf[i], w[i], None),
                       theta, f, g, h, scale, lam, done)
        if stop is not None:
            done[i] |= theta[i, 4] < stop[i]
    held, hr, gr = reduced(theta, g, h)
    left = np.abs(np.where(held, 0.0, _newton_step(hr, gr))).max(axis=1)
    ok = done & (left <= 1e-9 * (1.0 + np.abs(theta).max(axis=1))) & np.isfinite(f)
    if stop is not None:
        ok |= done & (theta[:, 4] < stop)
    return theta, f, ok


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
                                     stop_floor_below=stop, max_iter=10 * _MAX_ITER)
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



def joint_params(theta, scale, log_floor=None) -> dict:
    """E, A, B, a, b and the compute-optimal exponents N_opt ∝ C^(b/(a+b)), D_opt ∝ C^(a/(a+b)) (C ∝ N·D) of rows
    θ [R, k] (arrays [R])."""
    theta = np.atleast_2d(np.asarray(theta, dtype=np.float64))
    ns, ds = scale
    a, b = theta[:, 2], theta[:, 3]
    le = theta[:, 4] if theta.shape[1] == 5 else np.broadcast_to(np.asarray(log_floor, dtype=np.float64),
                                                                  (len(theta),))
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"E": np.exp(le), "A": np.exp(theta[:, 0] + a * math.log(ns)),
                "B": np.exp(theta[:, 1] + b * math.log(ds)), "a": a, "b": b, "n_opt_exponent": np.where(a + b > 0, b / (a + b), np.nan),
                "d_opt_exponent": np.where(a + b > 0, a / (a + b), np.nan)}


def fit_compute_optimal(params, images, loss, floor=None) -> dict:
    """Least squares in log space of L = E + A/N^a + B/D^b (N = parameters, D = images seen) from a grid of
    starts; ``floor`` fixes E (e.g. J*; 0 = no floor), None fits it. Returns E, A, B, a, b, n_opt_exponent,
    d_opt_exponent, rmse_log, n, and θ and the scale for refits."""
    N, D, L = (np.asarray(v, dtype=np.float64) for v in (params, images, loss))
    scale = joint_scale(N, D)
    n, d = np.log(N / scale[0]), np.log(D / scale[1])
    log_floor = None if floor is None else (math.log(floor) if floor > 0 else -math.inf)
    theta, f = joint_fit(n, d, np.log(L), log_floor=log_floor)
    out = {k: float(v[0]) for k, v in joint_params(theta, scale, log_floor).items()}
    out.update({"rmse_log": math.sqrt(f / len(L)), "n": len(L), "theta": theta, "scale": scale})
    return out


# ----------------------------------------------------------------------------------------------------------------
# single fits: the public interface (analysis.scaling re-exports these)
# ----------------------------------------------------------------------------------------------------------------
def _as_1d(name: str, v) -> np.ndarray:
    a = np.asarray(v, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {a.shape}")
    return a


def _check_xy(x, y, *, min_points=3) -> tuple[np.ndarray, np.ndarray]:
    x, y = _as_1d("x", x), _as_1d("y", y)
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same length, got {x.size} and {y.size}")
    bad = ~(np.isfinite(x) & np.isfinite(y))
    if bad.any():
        raise ValueError(f"{int(bad.sum())} of {x.size} points have a non-finite x or y "
                         f"(first at index {int(np.argmax(bad))})")
    if x.size < min_points:
        raise ValueError(f"need at least {min_points} points to fit, got {x.size}")
    if (x <= 0).any():
        raise ValueError(f"x must be positive (power laws are fitted in log space); {int((x <= 0).sum())} points "
                         "have x ≤ 0")
    return x, y


def _prepare_power_law(x, y, offset, drop_nonpositive):
    """Validate, apply the offset rule, return (x, y, free, fixed offset, n_dropped)."""
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


def _power_law_rows(u, y, w, free, offset):
    """(exponent, log prefactor, offset, pearson r) of every row of weights w."""
    if free:
        k, p, c, _ = power_law_free(u, y, w)
        _, _, r, _ = power_law_fixed(np.broadcast_to(u, w.shape), np.broadcast_to(y, w.shape),
                                     np.where(np.isfinite(c), c, 0.0), w)
        return k, p, c, r
    k, p, r, _ = power_law_fixed(np.broadcast_to(u, w.shape), np.broadcast_to(y, w.shape), offset, w)
    return k, p, np.full(len(w), offset), r


def fit_power_law(x, y, *, offset=0.0, n_bootstrap: int = 0, seed: int = 0, drop_nonpositive: bool = False) -> dict:
    """Fit y = offset + prefactor·x^exponent.

    ``offset`` is a fixed number ≥ 0 (default 0: a pure power law), fitted as the least-squares line of
    log(y − offset) against log x, or ``"free"``: fitted too, by relative least squares with 0 ≤ offset < min y
    (``power_law_free``). Returns a dict with ``exponent``, ``prefactor``, ``offset``, ``rho`` (|Pearson r| of
    log x vs log(y − offset)), ``pearson_r`` (signed), ``r2`` (in log-y space), ``rmse_log``, ``exponent_ci``,
    ``prefactor_ci``, ``offset_ci`` (percentile 95% intervals from ``n_bootstrap`` resamples of the points, NaN
    without), ``n`` (points used), ``n_dropped``. Points with y ≤ offset (y ≤ 0 for a free offset) raise, or
    are dropped with ``drop_nonpositive=True``.
    """
    x, y, free, off_fixed, n_dropped = _prepare_power_law(x, y, offset, drop_nonpositive)
    u = np.log(x)
    w = np.ones((1, x.size))
    if n_bootstrap > 0:
        rng = np.random.default_rng(seed)
        idx = rng.integers(0, x.size, size=(n_bootstrap, x.size))
        counts = np.zeros((n_bootstrap, x.size))
        np.add.at(counts, (np.repeat(np.arange(n_bootstrap), x.size), idx.ravel()), 1.0)
        counts = counts[(counts > 0).sum(1) >= 3]   # a resample needs three distinct x for an exponent
        w = np.vstack([w, counts])
    k, p, c, r = _power_law_rows(u, y, w, free, off_fixed)
    fitted = c[0] + np.exp(p[0] + k[0] * u)
    ly = np.log(y)
    ss_res = float(np.sum((ly - np.log(fitted)) ** 2))
    ss_tot = float(np.sum((ly - ly.mean()) ** 2))
    out = {"exponent": float(k[0]), "prefactor": float(np.exp(p[0])), "offset": float(c[0]),
           "rho": abs(float(r[0])), "pearson_r": float(r[0]), "r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else math.nan,
           "rmse_log": math.sqrt(ss_res / x.size), "exponent_ci": NAN_CI, "prefactor_ci": NAN_CI,
           "offset_ci": NAN_CI, "n": int(x.size), "n_dropped": n_dropped}
    if n_bootstrap > 0:
        for key, v in (("exponent_ci", k), ("prefactor_ci", np.exp(p)), ("offset_ci", c)):
            out[key] = percentile_interval(v[1:], bounds=(0.0, math.inf) if key != "exponent_ci" else None)
        out["n_bootstrap"] = int(len(w) - 1)
    return out


def predict_power_law(fit: dict, x) -> np.ndarray:
    """The fitted y at x: offset + prefactor·x^exponent."""
    return fit["offset"] + fit["prefactor"] * np.power(np.asarray(x, dtype=np.float64), fit["exponent"])


def holdout_error(x, y, *, offset=0.0, shift: float = 0.0, drop_nonpositive: bool = False) -> float:
    """Extrapolation error: fit without the largest-x point, predict it, return (predicted − actual)/actual.

    ``shift`` is added to both prediction and actual before taking the ratio — e.g. J* when y = L − J*, so that
    every quantity's error is measured on the loss L itself and the errors are comparable. Needs ≥ 4 points.
    """
    x, y = _check_xy(x, y, min_points=4)
    i = int(np.argmax(x))
    keep = np.arange(x.size) != i
    f = fit_power_law(x[keep], y[keep], offset=offset, drop_nonpositive=drop_nonpositive)
    actual = y[i] + shift
    if actual == 0:
        raise ValueError("the held-out point has y + shift = 0; relative error undefined")
    return float((predict_power_law(f, x[i]) + shift - actual) / actual)


# ----------------------------------------------------------------------------------------------------------------
# Chinchilla  L = E + A/N^α + B/D^β  (Hoffmann et al. approach 3, Epoch AI's replication): the joint law, Huber
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
        values = _objective(joint_log_model(starts[:, :4] if fixed else starts, n, d, lf) - logl,
                            np.ones((len(starts), logl.size)), huber_delta)
        starts = _from_epoch(profile_starts(grid, values, len(grid) if fixed else top_k), scale)
    if fixed:
        _, first = np.unique(starts[:, :4], axis=0, return_index=True)
        starts = starts[np.sort(first)][:top_k, :4]
    return starts


def fit_chinchilla(params, tokens, loss, *, drop_highest: int = 0, huber_delta: float = 1e-3, n_bootstrap: int = 0,
                   seed: int = 0, top_k: int | None = 60) -> dict:
    """Fit L = E + A/N^α + B/D^β (N = params, D = tokens) by Huber(δ) on log residuals, the joint law's fitter.

    Starts: Epoch AI's grid α, β ∈ {0, 0.5, …, 2}, e ∈ {−1, −0.5, …, 1.5}, a, b ∈ {0, 5, …, 25} (5400), ranked by
    their Huber objective; ``top_k`` keeps, for each (e, α, β), its best (a, b), then the k best of those 150 (None
    = all 5400). ``drop_highest`` drops that many highest-loss points first (Epoch AI drop 5). Bootstrap resamples
    (``n_bootstrap``) refit from the fit's optimum. Returns E, A, B, alpha, beta, their ``*_ci`` (percentile 95%
    intervals or NaN), ``n``, ``huber_loss``.
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
    scale = joint_scale(n, d)
    un, ud, logl = np.log(n / scale[0]), np.log(d / scale[1]), np.log(l)
    starts = epoch_starts(un, ud, logl, scale, top_k=top_k, huber_delta=huber_delta)
    theta, fval = joint_fit(un, ud, logl, free=True, huber_delta=huber_delta, starts=starts)
    names = ("E", "A", "B", "alpha", "beta")
    est = joint_params(theta, scale)
    out = {"E": float(est["E"][0]), "A": float(est["A"][0]), "B": float(est["B"][0]), "alpha": float(est["a"][0]),
           "beta": float(est["b"][0])}
    out.update({f"{k}_ci": NAN_CI for k in names})
    out.update({"n": int(n.size), "huber_loss": fval})
    if n_bootstrap > 0:
        rng = np.random.default_rng(seed)
        counts = np.zeros((n_bootstrap, n.size))
        np.add.at(counts, (np.repeat(np.arange(n_bootstrap), n.size), rng.integers(0, n.size, n_bootstrap * n.size)),
                  1.0)
        start = theta if np.isfinite(theta).all() else np.r_[theta[:4], logl.min() + math.log(0.5)]
        th, _, _ = joint_solve(np.broadcast_to(start, (n_bootstrap, 5)), un, ud, logl, weights=counts,
                               huber_delta=huber_delta)
        th = np.array([joint_polish(t, un, ud, logl, weights=c, huber_delta=huber_delta)[0]
                       for t, c in zip(th, counts)])
        draws = joint_params(th, scale)
        # a floor at the bound of log E is a floor of 0 (not e^−50 ≈ 2e−22), as the estimate's own
        draws["E"] = np.where(th[:, 4] <= joint_bounds(5)[0][4] + 1e-9, 0.0, draws["E"])
        for key, src in zip(names, ("E", "A", "B", "a", "b")):
            out[f"{key}_ci"] = percentile_interval(draws[src], bounds=(0.0, math.inf))
    return out
