"""The joint law L(N, D) = E + A/N^a + B/D^b and its solvers, each on many rows at once (replicates, grid starts,
simulated studies): its parametrisation θ on normalised N and D, the log model and its residuals, the objective
(least squares or Huber on log residuals) with its exact Newton system, and three solvers:

- ``joint_solve``          damped Newton (Levenberg–Marquardt on the exact Hessian) on every row at once
- ``joint_solve_bounded``  the same within the bounds, by an active set (a parameter held at its bound)
- ``joint_polish``         one row by scipy's bounded trust-region least squares

Rows are the leading axis; a weight matrix w [R, S] selects (0) or counts (an integer multiplicity) each point, so a
bootstrap resample, a point left out and a frontier are all just weights. Where the solves start and which rows
are refitted from which optimum: analysis.joint_fits.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import special
from scipy.optimize import least_squares

# θ = (log A', log B', a, b[, log E]) on n = log(N/N_s), d = log(D/D_s) (N_s, D_s the geometric means of the
# data, so every parameter is O(1)); log L̂ = LSE(log A' − a·n, log B' − b·d, log E). k = 4: E is fixed
# (log_floor per row; −inf = no floor), k = 5: E is fitted.
JOINT_MAX_EXPONENT = 10.0
JOINT_MAX_ITER = 200


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


def joint_objective(r, w, huber_delta):
    """Per row: Σ w·r² of residuals r [P, S] (least squares), or Σ w·huber_δ(r) with ``huber_delta``."""
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
    return joint_objective(r, w, huber_delta), g, h, np.einsum("pkk->pk", jtwj)


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


def _newton_start(theta0, n, d, logl, log_floor, weights, huber_delta):
    """What both Newton solvers start from: θ0 as float rows clipped into the bounds, the rows' log L (non-finite
    ones unused: weight 0), weights and fixed log floors broadcast to every row, and the Newton system at θ0.
    Returns (θ [P, k], logl, w, lf, f, g, h, scale)."""
    theta0 = np.atleast_2d(np.asarray(theta0, dtype=np.float64))
    p, k = theta0.shape
    logl = np.broadcast_to(np.asarray(logl, dtype=np.float64), (p, np.shape(logl)[-1]))
    w = np.ones(logl.shape) if weights is None else np.broadcast_to(np.asarray(weights, dtype=np.float64),
                                                                     logl.shape)
    w = np.where(np.isfinite(logl), w, 0.0)
    logl = np.where(w > 0, logl, 0.0)
    lf = np.zeros(p) if log_floor is None else np.broadcast_to(np.asarray(log_floor, dtype=np.float64), (p,))
    lf = lf.copy()
    lo, hi = joint_bounds(k)
    theta = np.clip(theta0, lo, hi)
    f, g, h, scale = _newton_system(theta, n, d, logl, lf, w, huber_delta)
    return theta, logl, w, lf, f, g, h, scale


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
    theta, logl, w, lf, f, g, h, scale = _newton_start(theta0, n, d, logl, log_floor, weights, huber_delta)
    p, k = theta.shape
    lo, hi = joint_bounds(k)
    lam = np.full(p, 1e-3)
    done = np.zeros(p, dtype=bool)
    eye = np.eye(k)
    for _ in range(JOINT_MAX_ITER):
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


def joint_solve_bounded(theta0, n, d, logl, *, log_floor=None, weights=None, max_iter=JOINT_MAX_ITER,
                        stop_floor_below=None):
    """Least squares on every row at once within the bounds, by damped Newton on the free parameters (an active
    set: a parameter at a bound whose gradient pushes outward is held there). Returns (θ [P, k], objective [P],
    ok [P]): ok where the first-order (KKT) conditions hold to 1e-9 — the free parameters' Newton step negligible,
    every held parameter's gradient pointing out of the box; the others need ``joint_polish``. A free floor whose
    log falls below ``stop_floor_below`` [P] stops there, ok (it is set to 0 anyway, as in ``joint_solve``)."""
    theta, logl, w, lf, f, g, h, scale = _newton_start(theta0, n, d, logl, log_floor, weights, None)
    p, k = theta.shape
    lo, hi = joint_bounds(k)
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
    f = joint_objective(res.fun[None], np.ones((1, res.fun.size)), huber_delta)[0]
    f0 = joint_objective(fun(np.clip(theta0, lo, hi))[None], np.ones((1, logl.size)), huber_delta)[0]
    return (res.x, float(f)) if f <= f0 else (np.clip(theta0, lo, hi), float(f0))
