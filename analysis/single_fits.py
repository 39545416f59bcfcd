"""Single fits, the functions other code and users call: one data set in, one fit (with bootstrap intervals where
asked for) out.

- ``fit_power_law``, ``predict_power_law``, ``holdout_error``: y = offset + prefactor·x^exponent (analysis.power_laws)
- ``fit_chinchilla``: L = E + A/N^α + B/D^β by Huber(δ = 1e-3) on log residuals from Epoch AI's grid of starts
  (Hoffmann et al.'s approach 3 as Epoch AI replicated it; docs/science.md)
- ``fit_compute_optimal``: the same law by least squares from the study's grid of starts, E fixed or free

fit_power_law, holdout_error and fit_chinchilla check their input and say what is wrong in one line.
analysis.scaling re-exports fit_power_law and fit_chinchilla.
"""

from __future__ import annotations

import math

import numpy as np

from analysis.intervals import percentile_interval
from analysis.joint_fits import epoch_starts, joint_fit
from analysis.joint_law import joint_bounds, joint_params, joint_polish, joint_scale, joint_solve
from analysis.power_laws import power_law_fixed, power_law_free

NAN_CI = (math.nan, math.nan)


# ----------------------------------------------------------------------------------------------------------------
# power laws
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
# the joint law  L = E + A/N^a + B/D^b
# ----------------------------------------------------------------------------------------------------------------
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
