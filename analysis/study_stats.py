"""The study's statistics: power-law fits of L, L − J*, the direct excess and a free offset, on one compute frontier,
with intervals from the evaluation set's noise; the paired verdict on L vs L − J*; the offset profile; and the
compute-optimal law L(N, D) with J* as its floor.

Every number is computed for replicate 0 (the evaluation set) and for R bootstrap replicates of its triples
(analysis.resample), with everything that depends on the data — the frontier included — recomputed inside each
replicate. Intervals (95%) are the replicates' percentiles, centred on the estimate (``percentile_ci``). They hold the evaluation set's sampling
noise, the noise every snapshot shares; a study with one training seed per size carries no seed noise in them.

Fits. A power law with a fixed offset c (0 for L, J* for L − J*) is a least-squares line in log space:
log(y − c) = log A + k·log x, solved in closed form for all replicates at once; ρ = |Pearson r| of that line
(the paper's measure). With a free offset, y = c + A·x^k is fitted by relative least squares Σ((y − model)/y)²
(≈ residuals in log y): for each exponent on a grid the best (c, A) is a weighted 2×2 solve with 0 ≤ c < min y,
the grid is refined five times, so the global optimum is found by enumeration, the same on every machine.

Axes. compute: x = training FLOPs on the study's ONE frontier — the snapshots whose total L is below every total L
reached with less compute — reused for every σ and every quantity; params: x = parameters, each model's last
snapshot. Extrapolation error: fit on every point but the largest model's, predict the largest model's points,
mean |predicted − actual| / actual of the loss L (J* added back for L − J*).

Why ρ alone is no verdict: d ln(L − c)/d ln F = L/(L − c) · d ln L/d ln F, so any c > 0 steepens the exponent, and
ρ of log(L − c) often rises for every c below a data-dependent point. The verdict therefore reports Δρ and
Δ(extrapolation error) between L − J* and L with paired intervals, and beside them the profile over c with J* and
the free-offset estimate (with its interval) marked: J* inside the free-offset interval means the data put the
floor where J* is; below it means J* is just some constant under the floor the data prefer.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import special

from analysis.resample import StudyReplicates

MIN_POINTS_FOR_INTERVAL = 5
LEVEL_CI = 95.0
MAX_INVALID_FRACTION = 0.025  # a percentile interval needs (100 − LEVEL_CI)/2 % of replicates at most to be missing
QUANTITIES = ("raw", "minus_jstar", "excess", "free_offset")
AXES = ("compute", "params")
TABLE_COLUMNS = ["quantity", "axis", "sigma", "exponent", "exponent_ci_lo", "exponent_ci_hi", "prefactor",
                 "prefactor_ci_lo", "prefactor_ci_hi", "offset", "offset_ci_lo", "offset_ci_hi", "rho",
                 "rho_ci_lo", "rho_ci_hi", "r2", "extrapolation_error", "extrapolation_error_ci_lo",
                 "extrapolation_error_ci_hi", "n", "n_nonpositive", "optimal_loss", "n_replicates", "note"]
VERDICT_COLUMNS = ["axis", "sigma", "optimal_loss", "rho_raw", "rho_minus_jstar", "delta_rho", "delta_rho_ci_lo",
                   "delta_rho_ci_hi", "extrap_raw", "extrap_minus_jstar", "delta_extrap", "delta_extrap_ci_lo",
                   "delta_extrap_ci_hi", "free_offset", "free_offset_ci_lo", "free_offset_ci_hi", "verdict_rho",
                   "verdict_extrap", "jstar_vs_free_offset", "n", "note"]

# free-offset exponents: enumerated on a grid, then refined around the best (step 0.05 → 1.6e-5)
_K_GRID = np.linspace(-3.0, 3.0, 121)
_REFINE, _REFINE_LEVELS = 11, 5
_CHUNK = 256                           # replicates per vectorised block (bounds memory: chunk × grid × points)


# ----------------------------------------------------------------------------------------------------------------
# points: the frontier and the final snapshots
# ----------------------------------------------------------------------------------------------------------------
def frontier_mask(flops: np.ndarray, total_loss: np.ndarray) -> np.ndarray:
    """[R, S] bool: snapshot s is on replicate r's compute frontier — its total loss is strictly below every total
    loss reached with less compute (analysis.scaling.lower_envelope, for every replicate at once)."""
    flops = np.asarray(flops, dtype=np.float64)
    total_loss = np.atleast_2d(total_loss)
    order = np.argsort(flops, kind="stable")
    if (np.diff(flops[order]) == 0).any():  # equal compute: the per-row envelope orders those by loss
        from analysis.scaling import lower_envelope
        mask = np.zeros(total_loss.shape, dtype=bool)
        for r, row in enumerate(total_loss):
            mask[r, lower_envelope(flops, row)] = True
        return mask
    mask = np.zeros(total_loss.shape, dtype=bool)
    best = np.full(total_loss.shape[0], np.inf)
    for s in order:
        v = total_loss[:, s]
        on = np.isfinite(v) & (v < best)
        mask[:, s] = on
        best = np.where(on, v, best)
    return mask


def final_mask(snapshots: pd.DataFrame) -> np.ndarray:
    """[S] bool: each model's last snapshot."""
    last = snapshots.groupby("model", sort=False)["images_seen"].transform("max")
    return (snapshots["images_seen"] == last).to_numpy()


def largest_model_mask(snapshots: pd.DataFrame) -> np.ndarray:
    """[S] bool: the snapshots of the model with the most parameters (held out by the extrapolation test)."""
    return (snapshots["params"] == snapshots["params"].max()).to_numpy()


# ----------------------------------------------------------------------------------------------------------------
# vectorised fits over replicates: arrays [R, n] with a 0/1 mask of the points used
# ----------------------------------------------------------------------------------------------------------------
def _wmean(a, w):
    return (w * a).sum(-1) / w.sum(-1)


def loglinear_fit(u: np.ndarray, y: np.ndarray, c, w: np.ndarray):
    """Least-squares line log(y − c) = p + k·u over the points with w = 1, for every row at once.
    Returns (k, p, pearson_r, valid); rows where a used point has y ≤ c, or fewer than 3 points, are invalid."""
    c = np.asarray(c, dtype=np.float64)[..., None] if np.ndim(c) else float(c)
    rest = y - c
    valid = ~((w > 0) & ~(rest > 0)).any(-1) & (w.sum(-1) >= 3)
    v = np.where(w > 0, np.log(np.where(rest > 0, rest, 1.0)), 0.0)
    ub, vb = _wmean(u, w), _wmean(v, w)
    du, dv = (u - ub[..., None]) * w, (v - vb[..., None]) * w
    suu, svv, suv = (du * du).sum(-1), (dv * dv).sum(-1), (du * dv).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        k = suv / suu
        r = suv / np.sqrt(suu * svv)
    p = vb - k * ub
    valid &= np.isfinite(k) & (suu > 0)
    nan = np.where(valid, 1.0, np.nan)
    return k * nan, p * nan, r * nan, valid


def _offset_fits(z, y, w, cmax):
    """Best (c, A) of y ≈ c + A·z under weights w/y² with 0 ≤ c ≤ cmax; z [.., G, n], y/w [.., 1, n]."""
    om = w / (y * y)
    so = om.sum(-1)
    zb, yb = (om * z).sum(-1) / so, (om * y).sum(-1) / so
    dz = z - zb[..., None]
    szz = (om * dz * dz).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        a = (om * dz * (y - yb[..., None])).sum(-1) / szz
        c = yb - a * zb
        clipped = (c < 0) | (c > cmax)
        c = np.clip(c, 0.0, cmax)
        a_clip = (om * z * (y - c[..., None])).sum(-1) / (om * z * z).sum(-1)
    a = np.where(clipped, a_clip, a)
    sse = (om * (y - c[..., None] - a[..., None] * z) ** 2).sum(-1)
    return c, a, np.where(np.isfinite(sse), sse, np.inf)


def free_offset_fit(u: np.ndarray, y: np.ndarray, w: np.ndarray):
    """y = c + A·exp(k·u), relative least squares, 0 ≤ c < min used y; every row at once.
    Returns (k, log A, c, valid)."""
    u, y, w = (np.atleast_2d(a) for a in np.broadcast_arrays(u, y, w))
    # only the used points enter: gather them to the front and drop the columns no row uses
    order = np.argsort(w <= 0, axis=1, kind="stable")[:, :max(int((w > 0).sum(1).max()), 1)]
    u, y, w = (np.take_along_axis(a, order, axis=1) for a in (u, y, w))
    parts = [_free_offset_block(u[i:i + _CHUNK], y[i:i + _CHUNK], w[i:i + _CHUNK]) for i in range(0, len(y), _CHUNK)]
    return tuple(np.concatenate(a) for a in zip(*parts))


def _free_offset_block(u, y, w):
    ymin = np.where(w > 0, y, np.inf).min(-1)
    cmax = ymin * (1 - 1e-9)
    valid = (w.sum(-1) >= 3) & (ymin > 0) & np.isfinite(ymin)
    # weights w/y² of relative least squares and the moments of y that do not depend on k
    om = np.where(w > 0, w / np.where(w > 0, y, 1.0) ** 2, 0.0)
    y0 = np.where(w > 0, y, 0.0)
    so, sy, syy = om.sum(-1), (om * y0).sum(-1), (om * y0 * y0).sum(-1)
    omy = (om * y0)[:, :, None]
    # u centred per row: exp(k·u) is then O(1) for every k of the grid (better conditioned moments); A is
    # rescaled back below
    ub = (om * u).sum(-1) / np.where(so > 0, so, 1.0)
    uc = np.where(w > 0, u - ub[:, None], 0.0)

    def best_on(grid):                                       # grid [R, G]
        z = np.exp(grid[:, :, None] * uc[:, None, :])
        c, a, sse = _offset_moments(z @ om[:, :, None], (z * z) @ om[:, :, None], z @ omy, so, sy, syy,
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


def _offset_moments(sz, szz, szy, so, sy, syy, cmax):
    """``_offset_fits`` from the weighted moments Σω·z, Σω·z², Σω·z·y ([R, G, 1] or [R, G]) and Σω, Σω·y, Σω·y²
    ([R]): the best (c, A) with 0 ≤ c ≤ cmax and its weighted sum of squares, for every grid point."""
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


def extrapolation_error(u, y, loss, c, k, p, w_test) -> np.ndarray:
    """Mean over the test points of |c + exp(p + k·u) − y| / L: the fitted quantity y's prediction error, measured
    relative to the loss L itself so that every quantity's error is on the same scale."""
    pred = np.asarray(c, dtype=np.float64)[..., None] + np.exp(p[:, None] + k[:, None] * u)
    n = w_test.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        err = np.where(w_test > 0, np.abs(pred - y) / loss, 0.0).sum(-1) / n
    return np.where(n > 0, err, np.nan)


# ----------------------------------------------------------------------------------------------------------------
# intervals
# ----------------------------------------------------------------------------------------------------------------
def percentile_ci(draws: np.ndarray, estimate: float) -> tuple[float, float, str]:
    """95% interval from the replicate values: their 2.5 and 97.5 percentiles, shifted by estimate − median.

    A replicate carries the evaluation set's noise twice (the set's own, then the resample's), so a statistic the
    noise biases — ρ, bounded by 1, drops with every bit of noise — sits lower in the replicates than in the
    estimate, and a plain percentile interval can miss the estimate altogether. Shifting by the replicates' median
    bias keeps their spread and centres it on the estimate. NaN where more than 2.5% of the replicates have no fit,
    or where the estimate has none."""
    draws = np.asarray(draws, dtype=np.float64)
    if draws.size == 0 or not np.isfinite(estimate):
        return math.nan, math.nan, ""
    bad = ~np.isfinite(draws)
    if bad.mean() > MAX_INVALID_FRACTION:
        return math.nan, math.nan, f"no interval: {bad.mean():.0%} of replicates had no fit"
    lo, med, hi = np.percentile(draws[~bad], [(100 - LEVEL_CI) / 2, 50.0, (100 + LEVEL_CI) / 2])
    shift = float(estimate) - med
    return float(lo + shift), float(hi + shift), ""


# ----------------------------------------------------------------------------------------------------------------
# the study's fits
# ----------------------------------------------------------------------------------------------------------------
class _Axis:
    """The points of one axis for every replicate: x (log), the use mask, and the extrapolation split."""

    def __init__(self, reps: StudyReplicates, axis: str):
        snaps = reps.snapshots
        col = "flops" if axis == "compute" else "params"
        x = snaps[col].to_numpy(dtype=np.float64)
        if (x <= 0).any():
            raise ValueError(f"{col} must be positive for a power law in log space")
        self.u = np.log(x)
        n_rep = reps.loss.shape[0]
        if axis == "compute":
            self.mask = frontier_mask(x, reps.loss[:, :, 0])
        else:
            self.mask = np.broadcast_to(final_mask(snaps), (n_rep, len(snaps))).copy()
        largest = largest_model_mask(snaps)
        self.test = self.mask & largest
        self.fit = self.mask & ~largest
        self.u_rows = np.broadcast_to(self.u, self.mask.shape)


class StudyFits:
    """A study's replicates with every fit computed once and shared by the fit table, the verdict and the profile."""

    def __init__(self, reps: StudyReplicates):
        self.reps = reps
        self._axes, self._fits = {}, {}

    def axis(self, name: str) -> _Axis:
        if name not in AXES:
            raise ValueError(f"unknown axis {name!r}; choose from {list(AXES)}")
        if name not in self._axes:
            self._axes[name] = _Axis(self.reps, name)
        return self._axes[name]

    def fit(self, axis: str, quantity: str, level: int) -> dict:
        key = (axis, quantity, level)
        if key not in self._fits:
            self._fits[key] = fit_quantity(self.reps, self.axis(axis), quantity, level)
        return self._fits[key]


def _as_fits(obj) -> StudyFits:
    return obj if isinstance(obj, StudyFits) else StudyFits(obj)


def _quantity_values(reps: StudyReplicates, quantity: str, level: int):
    """(y [R, S] the fitted variable, c [R] its fixed offset, L [R, S], J* [R]) of one quantity at one level.
    The line is log(y − c) = p + k·log x: L with c = 0 (raw), L with c = J* (minus_jstar), the direct excess with
    c = 0 (excess); free_offset fits c."""
    loss = reps.loss[:, :, level]
    js = np.nanmean(reps.jstar[:, :, level], axis=1)
    zero = np.zeros(len(js))
    if quantity in ("raw", "free_offset"):
        return loss, zero, loss, js
    if quantity == "minus_jstar":
        return loss, js, loss, js
    if quantity == "excess":
        return reps.excess[:, :, level], zero, loss, js
    raise ValueError(f"unknown quantity {quantity!r}; choose from {list(QUANTITIES)}")


def fit_quantity(reps: StudyReplicates, ax: _Axis, quantity: str, level: int) -> dict:
    """Every replicate's fit of one (quantity, axis, level): arrays [R+1] (index 0 = the evaluation set)."""
    y, c, loss, js = _quantity_values(reps, quantity, level)
    w = ax.mask.astype(np.float64)
    u = ax.u_rows
    at_bound = np.zeros(len(y), dtype=bool)
    if quantity == "free_offset":
        k, p, c, valid = free_offset_fit(u, y, w)
        kf, pf, cf, _ = free_offset_fit(u, y, ax.fit.astype(np.float64))
        # an offset at 0 or just below the smallest used loss is a boundary, not an estimate of a floor
        ymin = np.where(w > 0, y, np.inf).min(-1)
        at_bound = valid & ((c <= 0) | (c >= ymin * (1 - 1e-6)))
        _, _, r, _ = loglinear_fit(u, y, np.where(np.isfinite(c), c, 0.0), w)  # ρ of the line log(y − ĉ)
    else:
        k, p, r, valid = loglinear_fit(u, y, c, w)
        kf, pf, _, _ = loglinear_fit(u, y, c, ax.fit.astype(np.float64))
        cf = c
    pred_log = p[:, None] + k[:, None] * u
    fitted = np.where(np.isfinite(c), c, 0.0)[:, None] + np.exp(pred_log)
    with np.errstate(invalid="ignore", divide="ignore"):
        rl = np.where(w > 0, np.log(np.where(y > 0, y, np.nan)) - np.log(fitted), 0.0)
        ly = np.where(w > 0, np.log(np.where(y > 0, y, np.nan)), 0.0)
        ss_tot = (w * (ly - _wmean(ly, w)[:, None]) ** 2).sum(-1)
        r2 = 1 - (rl * rl).sum(-1) / ss_tot
    nonpos = ((w > 0) & ~(y - c[:, None] > 0)).sum(-1)
    # the reported offset is the one of y = offset + A·x^k for the quantity itself (L − J* and the excess have 0)
    offset = np.where(valid, c, np.nan) if quantity == "free_offset" else np.where(valid, 0.0, np.nan)
    return {"exponent": k, "log_prefactor": p, "offset": offset, "rho": np.abs(r), "r2": r2,
            "extrapolation_error": extrapolation_error(u, y, loss, cf, kf, pf, ax.test.astype(np.float64)),
            "n": w.sum(-1), "n_nonpositive": nonpos, "optimal_loss": js, "at_bound": at_bound}


def _ci_fields(out: dict, name: str, draws: np.ndarray, notes: list, allow: bool) -> None:
    out[name] = float(draws[0])
    lo, hi, note = percentile_ci(draws[1:], draws[0]) if allow else (math.nan, math.nan, "")
    out[f"{name}_ci_lo"], out[f"{name}_ci_hi"] = lo, hi
    if note and note not in notes:
        notes.append(note)


def study_table(reps: StudyReplicates, *, quantities=QUANTITIES, axes=AXES, levels=None) -> pd.DataFrame:
    """exponents.csv: one row per (quantity, axis, σ or total) with point estimates (the evaluation set) and 95%
    percentile intervals from the replicates (none with fewer than 5 points, or without replicates)."""
    for q in quantities:
        if q not in QUANTITIES:
            raise ValueError(f"unknown quantity {q!r}; choose from {list(QUANTITIES)}")
    for a in axes:
        if a not in AXES:
            raise ValueError(f"unknown axis {a!r}; choose from {list(AXES)}")
    fits = _as_fits(reps)
    reps = fits.reps
    levels = range(reps.loss.shape[2]) if levels is None else levels
    rows = [_table_row(fits, a, q, lv) for a in axes for q in quantities for lv in levels]
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def _table_row(fits: StudyFits, axis, quantity, level) -> dict:
    reps = fits.reps
    row = {"quantity": quantity, "axis": axis, "sigma": reps.level_label(level),
           "n_replicates": reps.n_replicates}
    if quantity == "excess" and not np.isfinite(reps.excess[0, :, level]).any():
        return {**row, "n": 0, "n_nonpositive": 0, "note": "no excess column"}
    f = fits.fit(axis, quantity, level)
    n = int(f["n"][0])
    notes = []
    row.update({"n": n, "n_nonpositive": int(f["n_nonpositive"][0]), "optimal_loss": float(f["optimal_loss"][0]),
                "r2": float(f["r2"][0])})
    if not np.isfinite(f["exponent"][0]):
        notes.append("no fit: " + (f"{row['n_nonpositive']} of {n} points have y ≤ offset"
                                   if row["n_nonpositive"] else f"{n} points (need ≥ 3)"))
    allow = reps.n_replicates > 0 and n >= MIN_POINTS_FOR_INTERVAL
    if reps.n_replicates > 0 and n < MIN_POINTS_FOR_INTERVAL:
        notes.append(f"no interval: {n} points (< {MIN_POINTS_FOR_INTERVAL})")
    if f["at_bound"][0]:
        notes.append("free offset at its bound (0 or the smallest loss): the data do not identify a floor")
    _ci_fields(row, "exponent", f["exponent"], notes, allow)
    _ci_fields(row, "prefactor", np.exp(f["log_prefactor"]), notes, allow)
    _ci_fields(row, "offset", f["offset"], notes, allow and quantity == "free_offset")
    _ci_fields(row, "rho", f["rho"], notes, allow)
    _ci_fields(row, "extrapolation_error", f["extrapolation_error"], notes, allow)
    row["note"] = "; ".join(notes)
    return row


# ----------------------------------------------------------------------------------------------------------------
# the verdict: L − J* against L, paired, and the offset profile
# ----------------------------------------------------------------------------------------------------------------
def _paired_verdict(delta_lo, delta_hi, higher_is_better: bool) -> str:
    if not (np.isfinite(delta_lo) and np.isfinite(delta_hi)):
        return "no interval"
    if delta_lo > 0:
        return "better" if higher_is_better else "worse"
    if delta_hi < 0:
        return "worse" if higher_is_better else "better"
    return "no difference at 95%"


def _jstar_position(js, lo, hi) -> str:
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return "no interval"
    return "inside" if lo <= js <= hi else ("below" if js < lo else "above")


def verdict_table(reps: StudyReplicates, *, axes=AXES, levels=None) -> pd.DataFrame:
    """Per axis and level: Δρ = ρ(L − J*) − ρ(L) and Δ(extrapolation error), paired (same replicates), with 95%
    intervals and a verdict each ("better" / "worse" / "no difference at 95%" for L − J*), and where J* lies
    relative to the free-offset interval."""
    fits = _as_fits(reps)
    reps = fits.reps
    levels = range(reps.loss.shape[2]) if levels is None else levels
    rows = []
    for a in axes:
        for lv in levels:
            raw, mj, fr = (fits.fit(a, q, lv) for q in ("raw", "minus_jstar", "free_offset"))
            n = int(raw["n"][0])
            allow = reps.n_replicates > 0 and n >= MIN_POINTS_FOR_INTERVAL
            row, notes = {"axis": a, "sigma": reps.level_label(lv), "optimal_loss": float(raw["optimal_loss"][0]),
                          "n": n}, []
            row["rho_raw"], row["rho_minus_jstar"] = float(raw["rho"][0]), float(mj["rho"][0])
            row["extrap_raw"] = float(raw["extrapolation_error"][0])
            row["extrap_minus_jstar"] = float(mj["extrapolation_error"][0])
            _ci_fields(row, "delta_rho", mj["rho"] - raw["rho"], notes, allow)
            _ci_fields(row, "delta_extrap", mj["extrapolation_error"] - raw["extrapolation_error"], notes, allow)
            _ci_fields(row, "free_offset", fr["offset"], notes, allow)
            if reps.n_replicates > 0 and not allow:
                notes.append(f"no interval: {n} points (< {MIN_POINTS_FOR_INTERVAL})")
            row["verdict_rho"] = _paired_verdict(row["delta_rho_ci_lo"], row["delta_rho_ci_hi"], True)
            row["verdict_extrap"] = _paired_verdict(row["delta_extrap_ci_lo"], row["delta_extrap_ci_hi"], False)
            row["jstar_vs_free_offset"] = ("free offset at a bound" if fr["at_bound"][0] else
                                           _jstar_position(row["optimal_loss"], row["free_offset_ci_lo"],
                                                           row["free_offset_ci_hi"]))
            row["note"] = "; ".join(notes)
            rows.append(row)
    return pd.DataFrame(rows, columns=VERDICT_COLUMNS)


def offset_profile(reps: StudyReplicates, *, axes=AXES, level: int = 0, num: int = 41) -> pd.DataFrame:
    """ρ of log(L − c) and the extrapolation error of the offset-c line as functions of the subtracted constant c,
    from 0 to just below the smallest frontier loss, with intervals; J* and the free offset are rows of their own
    (column `marker`)."""
    fits = _as_fits(reps)
    reps = fits.reps
    rows = []
    for a in axes:
        ax = fits.axis(a)
        loss = reps.loss[:, :, level]
        w = ax.mask.astype(np.float64)
        ymin = float(np.where(w[0] > 0, loss[0], np.inf).min())
        js = float(np.nanmean(reps.jstar[0, :, level]))
        fr = fits.fit(a, "free_offset", level)
        cs = [(c, "") for c in np.linspace(0.0, ymin, num, endpoint=False)]
        cs += [(js, "jstar"), (float(fr["offset"][0]), "free_offset")]
        allow = reps.n_replicates > 0 and int(w[0].sum()) >= MIN_POINTS_FOR_INTERVAL
        for c, marker in cs:
            if not np.isfinite(c):
                continue
            cc = np.full(loss.shape[0], c)
            k, p, r, _ = loglinear_fit(ax.u_rows, loss, cc, w)
            kf, pf, _, _ = loglinear_fit(ax.u_rows, loss, cc, ax.fit.astype(np.float64))
            err = extrapolation_error(ax.u_rows, loss, loss, cc, kf, pf, ax.test.astype(np.float64))
            row, notes = {"axis": a, "sigma": reps.level_label(level), "c": c, "marker": marker}, []
            _ci_fields(row, "rho", np.abs(r), notes, allow)
            _ci_fields(row, "exponent", k, notes, allow)
            _ci_fields(row, "extrapolation_error", err, notes, allow)
            row["note"] = "; ".join(notes)
            rows.append(row)
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------------------------
# the compute-optimal law  L(N, D) = floor + A/N^a + B/D^b, floor = J* or free
# ----------------------------------------------------------------------------------------------------------------
_CO_MAX_EXPONENT = 10.0
COMPUTE_OPTIMAL_COLUMNS = ["floor", "E", "A", "B", "a", "b", "n_opt_exponent", "d_opt_exponent", "rmse_log", "n"]


def _co_residuals(theta, n, d, logl, log_floor):
    """Residuals log(model) − log L and their Jacobian; θ = (log A', log B', a, b[, log E]) on normalised N, D."""
    theta = np.asarray(theta, dtype=np.float64)
    r, jac = _co_batch_residuals(theta[None], n, d, logl[None], np.array([log_floor if len(theta) == 4 else 0.0]))
    return r[0], jac[0]


def _co_bounds(k: int):
    lo = [-50.0, -50.0, 0.0, 0.0] + ([-50.0] if k == 5 else [])
    hi = [50.0, 50.0, _CO_MAX_EXPONENT, _CO_MAX_EXPONENT] + ([50.0] if k == 5 else [])
    return np.array(lo), np.array(hi)


def _co_solve(theta0, n, d, logl, log_floor):
    from scipy.optimize import least_squares
    lo, hi = _co_bounds(len(theta0))
    res = least_squares(lambda th: _co_residuals(th, n, d, logl, log_floor)[0], np.clip(theta0, lo, hi),
                        jac=lambda th: _co_residuals(th, n, d, logl, log_floor)[1], bounds=(lo, hi),
                        method="trf", xtol=1e-14, ftol=1e-14, gtol=1e-14, max_nfev=2000)
    return res.x, float(np.sum(res.fun ** 2))


def _co_batch_residuals(theta, n, d, logl, log_floor, curvature=False):
    """Rows of θ [P, k] at once: residuals r [P, S] = log(model) − log L and their Jacobian [P, S, k] (closed-form
    log-sum-exp of three terms); ``log_floor`` [P] is the fixed log E of each row when k = 4 (−inf: no floor).
    With ``curvature`` also the softmax weights (w_A, w_B, w_E) [P, S] that make up the model's second
    derivatives: ∇²log(model) = Σ_j w_j x_j x_jᵀ − ∇∇ᵀ with x_A = ∂t_A/∂θ, ….)"""
    ta = theta[:, 0:1] - theta[:, 2:3] * n
    tb = theta[:, 1:2] - theta[:, 3:4] * d
    te = theta[:, 4:5] if theta.shape[1] == 5 else log_floor[:, None]
    lse = np.logaddexp(np.logaddexp(ta, tb), te)
    wa, wb = np.exp(ta - lse), np.exp(tb - lse)
    we = np.exp(te - lse)
    cols = [wa, wb, -wa * n, -wb * d] + ([we] if theta.shape[1] == 5 else [])
    r, jac = lse - logl, np.stack(cols, axis=2)
    return (r, jac, (wa, wb, we)) if curvature else (r, jac)


def _co_newton_system(theta, n, d, logl, lf):
    """Σr², its half-gradient Jᵀr and half-Hessian JᵀJ + Σ_s r_s·∇²r_s (the exact one: the residuals of these fits
    are not small enough for Gauss–Newton's JᵀJ alone, which then converges slowly), for every row."""
    r, jac, (wa, wb, we) = _co_batch_residuals(theta, n, d, logl, lf, curvature=True)
    jt = jac.transpose(0, 2, 1)
    g = np.matmul(jt, r[:, :, None])[:, :, 0]
    h = np.matmul(jt * r[:, None, :], -jac) + np.matmul(jt, jac)
    ra, rb = r * wa, r * wb
    h[:, 0, 0] += ra.sum(1)
    h[:, 1, 1] += rb.sum(1)
    h[:, 0, 2] -= ra @ n
    h[:, 2, 0] -= ra @ n
    h[:, 2, 2] += ra @ (n * n)
    h[:, 1, 3] -= rb @ d
    h[:, 3, 1] -= rb @ d
    h[:, 3, 3] += rb @ (d * d)
    if theta.shape[1] == 5:
        h[:, 4, 4] += (r * we).sum(1)
    return np.einsum("ps,ps->p", r, r), g, h, np.einsum("pkk->pk", np.matmul(jt, jac))


_LM_MAX_ITER = 200
_POLISH_STARTS = 3  # best batched solutions of the point estimate's grid of starts polished by the bounded solve


def _co_solve_batch(theta0, n, d, logl, log_floor=None, stop_floor_below=None):
    """Damped Newton (Levenberg–Marquardt on the exact Hessian) on every row at once — the replicates' refits and
    the grid of starts: returns (θ [P, k], Σr² [P], ok [P]).

    ``ok`` marks rows that converged to an interior point (no bound active, remaining Newton step negligible); the
    others are left to the bounded trust-region solve (``_co_solve``). A free floor (k = 5) whose log falls below
    ``stop_floor_below`` [P] stops there: it is set to 0 anyway (``_co_snap_floor``)."""
    theta0 = np.atleast_2d(np.asarray(theta0, dtype=np.float64))
    p, k = theta0.shape
    lo, hi = _co_bounds(k)
    lf = np.zeros(p) if log_floor is None else np.broadcast_to(np.asarray(log_floor, dtype=np.float64), (p,))
    theta = np.clip(theta0, lo, hi)
    f, g, h, scale = _co_newton_system(theta, n, d, logl, lf)
    lam = np.full(p, 1e-3)
    done = np.zeros(p, dtype=bool)
    eye = np.eye(k)
    for _ in range(_LM_MAX_ITER):
        i = np.flatnonzero(~done)
        if i.size == 0:
            break
        damp = (lam[i, None] * np.maximum(scale[i], 1e-12))[:, :, None] * eye
        with np.errstate(all="ignore"):
            step = -np.linalg.solve(h[i] + damp, g[i][:, :, None])[:, :, 0]
        new = np.clip(theta[i] + np.nan_to_num(step), lo, hi)
        fn, gn, hn, sn = _co_newton_system(new, n, d, logl[i], lf[i])
        better = fn < f[i]
        moved = np.abs(new - theta[i]).max(axis=1)
        a = i[better]
        theta[a], f[a], g[a], h[a], scale[a] = new[better], fn[better], gn[better], hn[better], sn[better]
        lam[i] = np.where(better, np.maximum(lam[i] * 0.1, 1e-12), lam[i] * 10.0)
        # converged: the step no longer changes θ (to rounding), or no step improves on it
        done[i] |= (moved <= 1e-13 * (1.0 + np.abs(theta[i]).max(axis=1))) | (lam[i] > 1e12)
        if stop_floor_below is not None:
            done[i] |= theta[i, 4] < stop_floor_below[i]
    # Near the optimum Σr² changes by less than its rounding, so the acceptance test above stops a little short;
    # two plain Newton steps (which use the gradient, not Σr²) settle on the stationary point.
    for _ in range(2):
        new = theta - _newton_step(h, g)
        fn, gn, hn, sn = _co_newton_system(new, n, d, logl, lf)
        take = done & np.isfinite(fn) & (fn <= f * (1 + 1e-12))
        theta[take], f[take], g[take], h[take], scale[take] = new[take], fn[take], gn[take], hn[take], sn[take]
    interior = ((theta > lo + 1e-9) & (theta < hi - 1e-9)).all(axis=1)
    left = np.abs(_newton_step(h, g)).max(axis=1)
    ok = done & interior & (left <= 1e-9 * (1.0 + np.abs(theta).max(axis=1)))
    return theta, f, ok


def _newton_step(h, g):
    with np.errstate(all="ignore"):
        step = np.linalg.solve(h, g[:, :, None])[:, :, 0]
    return np.where(np.isfinite(step), step, np.inf)


def _co_starts(logl, free: bool):
    lm = float(np.median(logl))
    grid = []
    for a in (0.1, 0.3, 0.7, 1.5):
        for b in (0.1, 0.3, 0.7, 1.5):
            for fa in (0.05, 0.3):
                for fb in (0.05, 0.3):
                    for fe in ((0.2, 0.6, 0.9) if free else (None,)):
                        th = [lm + math.log(fa), lm + math.log(fb), a, b]
                        grid.append(th + ([lm + math.log(fe)] if free else []))
    return np.array(grid)


def fit_compute_optimal(params, images, loss, floor=None) -> dict:
    """Least squares in log space of L = E + A/N^a + B/D^b (N = parameters, D = images seen) from a grid of
    starts; ``floor`` fixes E (J*), None fits it. N_opt ∝ C^(b/(a+b)) and D_opt ∝ C^(a/(a+b)) when C ∝ N·D."""
    N, D, L = (np.asarray(v, dtype=np.float64) for v in (params, images, loss))
    ns, ds = np.exp(np.mean(np.log(N))), np.exp(np.mean(np.log(D)))
    n, d, logl = np.log(N / ns), np.log(D / ds), np.log(L)
    log_floor = None if floor is None else math.log(max(float(floor), 1e-300))
    starts = _co_starts(logl, floor is None)
    # every start at once, then the best few polished by the bounded solve (which also settles bounds)
    th, f, _ = _co_solve_batch(starts, n, d, np.broadcast_to(logl, (len(starts), len(logl))),
                               None if floor is None else np.full(len(starts), log_floor))
    best, best_f = None, math.inf
    for i in np.argsort(f, kind="stable")[:_POLISH_STARTS]:
        t, fi = _co_solve(th[i], n, d, logl, log_floor)
        if fi < best_f - 1e-15:
            best, best_f = t, fi
    if floor is None:
        best, best_f = _co_snap_floor(best, best_f, n, d, logl)
    out = _co_params(best, ns, ds, log_floor)
    out.update({"rmse_log": math.sqrt(best_f / len(L)), "n": len(L), "theta": best, "scale": (ns, ds)})
    return out


def _co_snap_floor(theta, f, n, d, logl):
    """A free floor that the data drive towards 0 has no optimum (its gradient vanishes, so where the solver stops
    depends on rounding): below 1e-6 of the smallest loss it is set to exactly 0 and the rest refitted."""
    if theta[4] > float(np.min(logl)) + math.log(1e-6):
        return theta, f
    th4, f4 = _co_solve(theta[:4], n, d, logl, -math.inf)
    return np.r_[th4, -math.inf], f4


def _co_refit_replicates(theta, n, d, logl, log_js, fixed_floor: bool) -> np.ndarray:
    """Every replicate's law refitted from the point estimate θ (the free floor starting at the replicate's J* when
    the estimate's floor is 0), all at once; rows the batched solve leaves unconverged or at a bound are solved one
    by one with the bounded trust-region method. Returns θ [R, k]."""
    r = len(logl)
    if fixed_floor:
        th, f, ok = _co_solve_batch(np.broadcast_to(theta, (r, 4)), n, d, logl, log_js)
        for i in np.flatnonzero(~ok):
            th[i], f[i] = _co_solve(theta, n, d, logl[i], log_js[i])
        return th
    start = (np.broadcast_to(theta, (r, 5)) if np.isfinite(theta).all()
             else np.column_stack([np.broadcast_to(theta[:4], (r, 4)), log_js]))
    # a floor driven towards 0 is set to exactly 0 and the rest refitted (_co_snap_floor, for every row at once);
    # rows the batched solve drives below that line need no bounded solve of the five-parameter law
    snap_at = logl.min(axis=1) + math.log(1e-6)
    th, f, ok = _co_solve_batch(start, n, d, logl, None, stop_floor_below=snap_at)
    for i in np.flatnonzero(~ok & (th[:, 4] > snap_at)):
        th[i], f[i] = _co_solve(start[i], n, d, logl[i], None)
    snap = th[:, 4] <= snap_at
    out = th.copy()
    if snap.any():
        i = np.flatnonzero(snap)
        th4, f4, ok4 = _co_solve_batch(th[i, :4], n, d, logl[i], np.full(i.size, -math.inf))
        for j in np.flatnonzero(~ok4):
            th4[j], f4[j] = _co_solve(th[i[j], :4], n, d, logl[i[j]], -math.inf)
        out[i, :4], out[i, 4] = th4, -math.inf
    return out


def _co_params(theta, ns, ds, log_floor) -> dict:
    la, lb, a, b = (float(v) for v in theta[:4])
    e = float(theta[4]) if len(theta) == 5 else log_floor
    # A'·(N/ns)^−a = A'·ns^a · N^−a
    return {"E": math.exp(e) if e > -math.inf else 0.0, "A": math.exp(la + a * math.log(ns)), "B": math.exp(lb + b * math.log(ds)),
            "a": a, "b": b, "n_opt_exponent": b / (a + b) if a + b > 0 else math.nan,
            "d_opt_exponent": a / (a + b) if a + b > 0 else math.nan}


def compute_optimal_table(reps: StudyReplicates) -> pd.DataFrame:
    """compute_optimal.csv: the law with the floor fixed to the total J* and with a free floor, fitted to every
    snapshot's total loss, with 95% intervals from the replicates (each refitted from the point estimate)."""
    snaps = reps.snapshots
    N, D = snaps["params"].to_numpy(np.float64), snaps["images_seen"].to_numpy(np.float64)
    total = reps.loss[:, :, 0]
    js = np.nanmean(reps.jstar[:, :, 0], axis=1)
    rows = []
    if len(snaps) < 5 or np.unique(N).size < 2 or np.unique(D).size < 2:
        return pd.DataFrame([{"floor": f, "n": len(snaps),
                              "note": "needs ≥ 5 snapshots over ≥ 2 sizes and ≥ 2 lengths"} for f in ("jstar", "free")])
    ns, ds = np.exp(np.mean(np.log(N))), np.exp(np.mean(np.log(D)))
    n, d = np.log(N / ns), np.log(D / ds)
    for floor in ("jstar", "free"):
        fit = fit_compute_optimal(N, D, total[0], floor=js[0] if floor == "jstar" else None)
        thetas = _co_refit_replicates(fit["theta"], n, d, np.log(total[1:]), np.log(js[1:]), floor == "jstar")
        draws = [_co_params(th, ns, ds, math.log(js[r + 1]) if floor == "jstar" else None)
                 for r, th in enumerate(thetas)]
        row = {"floor": floor, **{k: fit[k] for k in COMPUTE_OPTIMAL_COLUMNS if k in fit}}
        notes = []
        for key in ("E", "A", "B", "a", "b", "n_opt_exponent", "d_opt_exponent"):
            vals = np.array([row[key]] + [dr[key] for dr in draws])
            _ci_fields(row, key, vals, notes, reps.n_replicates > 0)
        if floor == "free" and row["E"] == 0:
            notes.append("free floor at 0: these snapshots do not identify a floor")
        at_bound = [k for k in ("a", "b") if not 1e-6 < row[k] < _CO_MAX_EXPONENT - 1e-6]
        if at_bound:
            notes.append(f"{' and '.join(at_bound)} at the bound [0, {_CO_MAX_EXPONENT:g}]: not identified by "
                         "these snapshots")
        row["note"] = "; ".join(notes)
        rows.append(row)
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------------------------
# exponents.md
# ----------------------------------------------------------------------------------------------------------------
def _fmt(v, spec=".4g") -> str:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return str(v)
    return "—" if not math.isfinite(v) else format(v, spec)


def _with_ci(row, key, spec=".4g") -> str:
    lo, hi = row.get(f"{key}_ci_lo", math.nan), row.get(f"{key}_ci_hi", math.nan)
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return _fmt(row.get(key), spec)
    return f"{_fmt(row[key], spec)} [{_fmt(lo, spec)}, {_fmt(hi, spec)}]"


def _md_table(header, rows) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(r) + " |" for r in rows])


def _verdict_sentence(v) -> str:
    what = "the total loss" if not np.isfinite(v["sigma"]) else f"σ = {_fmt(v['sigma'])}"
    rho = {"better": "fits a power law better than L (higher ρ)", "worse": "fits a power law worse than L (lower ρ)",
           "no difference at 95%": "fits a power law as well as L (no difference in ρ at 95%)",
           "no interval": "cannot be compared with L (no interval)"}[v["verdict_rho"]]
    ext = {"better": "extrapolates to the largest model better", "worse": "extrapolates to the largest model worse",
           "no difference at 95%": "extrapolates no better or worse (at 95%)",
           "no interval": "has no extrapolation interval"}[v["verdict_extrap"]]
    floor = {"inside": "J* lies inside the free-offset interval — the data put the floor where J* is",
             "below": "J* lies below the free-offset interval — the data prefer a higher floor, so a higher ρ "
                      "after subtracting J* shows only that some positive constant helps, not that J* is the floor",
             "above": "J* lies above the free-offset interval — the data prefer a lower floor than J*",
             "no interval": "the free offset has no interval",
             "free offset at a bound": "the free offset sits at a bound (0 or the smallest loss), so the data do "
                                       "not place a floor to compare J* with"}[v["jstar_vs_free_offset"]]
    return (f"For {what} against {v['axis']}, L − J* {rho}: Δρ = {_with_ci(v, 'delta_rho', '.3g')}; it {ext}: "
            f"Δ(extrapolation error) = {_with_ci(v, 'delta_extrap', '.3g')}. {floor[0].upper() + floor[1:]} "
            f"(J* = {_fmt(v['optimal_loss'])}, free offset {_with_ci(v, 'free_offset')}).")


def study_markdown(table: pd.DataFrame, verdict: pd.DataFrame, compute_optimal: pd.DataFrame | None = None,
                   n_replicates: int = 0) -> str:
    """exponents.md: the verdict first, then the total-loss fits, the compute-optimal law, and per-σ tables."""
    ci_text = (f"Brackets are 95% intervals from {n_replicates} bootstrap replicates of the evaluation triples "
               f"(resampled within each σ, shared by all snapshots; the frontier re-chosen in each): the replicates' "
               f"2.5–97.5 percentiles, shifted so that their median sits on the estimate. Fits "
               f"with fewer than {MIN_POINTS_FOR_INTERVAL} points get no interval."
               if n_replicates else "No intervals: this table was fitted without the per-triple errors.")
    parts = ["# Scaling exponents and the verdict on L − J*", "",
             "Fits of log(y − c) = log A + k·log x by least squares (c = 0 for L, c = J* for L − J*, c = 0 for the "
             "directly measured excess E‖Dθ − D*‖²; the free offset fits c by relative least squares). "
             "compute: x = training FLOPs on the study's one frontier (snapshots whose total L beats every cheaper "
             "one), the same points for every σ; params: each model's final snapshot. ρ = |Pearson r| of the "
             "log-log line. Extrapolation error: fit without the largest model, predict its points, mean "
             "|error| / L. " + ci_text, ""]
    tot = verdict[verdict["sigma"].isna()]
    if not tot.empty:
        parts += ["## Verdict (total loss, training weighting)", ""]
        parts += [f"- {_verdict_sentence(v)}" for _, v in tot.iterrows()]
        parts += ["", "A steeper exponent after subtracting J* is not a finding by itself: "
                  "d ln(L − J*)/d ln x = L/(L − J*) · d ln L/d ln x, so subtracting any positive constant steepens "
                  "the exponent by the factor L/(L − J*) (here the fitted exponents differ by a factor " + ", ".join(
                      f"{_fmt(f, '.3g')} on {a}" for a, f in _steepening(table)) + "). "
                  "offset_profile.csv (figure offset_profile.png) shows ρ and the extrapolation error for every "
                  "subtracted constant c, with J* and the free offset marked.", ""]
    total = table[table["sigma"].isna()]
    if not total.empty:
        parts += ["## Total-loss fits", ""]
        rows = [[r["quantity"], r["axis"], _with_ci(r, "exponent"), _with_ci(r, "offset"), _with_ci(r, "rho"),
                 _fmt(r["r2"]), _with_ci(r, "extrapolation_error", ".3g"), str(int(r["n"])), str(r["note"])]
                for _, r in total.iterrows()]
        parts += [_md_table(["quantity", "axis", "exponent", "offset", "ρ", "R²", "extrapolation error", "n",
                             "note"], rows), ""]
    if compute_optimal is not None and "E" in compute_optimal:
        parts += ["## Compute-optimal law L(N, D) = E + A/N^a + B/D^b (every snapshot; N params, D images)", "",
                  "N_opt ∝ C^(b/(a+b)), D_opt ∝ C^(a/(a+b)) for compute C ∝ N·D. floor = jstar fixes E to the "
                  "total J*; floor = free fits it.", ""]
        rows = [[r["floor"], _with_ci(r, "E"), _with_ci(r, "a", ".3g"), _with_ci(r, "b", ".3g"),
                 _with_ci(r, "n_opt_exponent", ".3g"), _with_ci(r, "d_opt_exponent", ".3g"), _fmt(r.get("rmse_log"))]
                for _, r in compute_optimal.iterrows()]
        parts += [_md_table(["floor", "E", "a", "b", "N_opt exponent", "D_opt exponent", "rms log residual"], rows),
                  ""]
    per = verdict[verdict["sigma"].notna()]
    for axis in per["axis"].unique():
        sub = per[per["axis"] == axis]
        counts = sub["verdict_rho"].value_counts()
        parts += [f"## Per σ, x = {axis}", "",
                  "L − J* against L, paired: " + ", ".join(f"{n} {k}" for k, n in counts.items()) + ".", ""]
        rows = [[_fmt(v["sigma"]), _fmt(v["optimal_loss"]), _fmt(v["rho_raw"]), _fmt(v["rho_minus_jstar"]),
                 _with_ci(v, "delta_rho", ".3g"), v["verdict_rho"], _with_ci(v, "delta_extrap", ".3g"),
                 _with_ci(v, "free_offset"), v["jstar_vs_free_offset"]] for _, v in sub.iterrows()]
        parts += [_md_table(["σ", "J*", "ρ L", "ρ L − J*", "Δρ", "verdict", "Δ extrapolation", "free offset",
                             "J* vs free"], rows), ""]
    return "\n".join(parts)


def _steepening(table: pd.DataFrame):
    """Exponent of L − J* over exponent of L for the total, per axis (≈ the mean L/(L − J*) of the points)."""
    out = []
    for axis in table["axis"].unique():
        raw = table[(table["axis"] == axis) & (table["quantity"] == "raw") & table["sigma"].isna()]
        mj = table[(table["axis"] == axis) & (table["quantity"] == "minus_jstar") & table["sigma"].isna()]
        if raw.empty or mj.empty or not np.isfinite(raw["exponent"].iloc[0]):
            continue
        ratio = mj["exponent"].iloc[0] / raw["exponent"].iloc[0]
        out.append((axis, ratio))
    return out


# ----------------------------------------------------------------------------------------------------------------
# several architecture families in one study
# ----------------------------------------------------------------------------------------------------------------
FAMILY_DIFFERENCE_COLUMNS = ["family_a", "family_b", "quantity", "axis", "exponent_a", "exponent_b", "difference",
                             "difference_ci_lo", "difference_ci_hi", "verdict", "note"]


def family_difference_table(by_family: dict, *, quantities=("raw", "minus_jstar", "excess"), axes=AXES,
                            level: int = 0) -> pd.DataFrame:
    """Exponent of family a minus family b for every pair, quantity and axis (total loss), with a 95% interval
    from the shared replicates: the answer to "do the families differ in exponent, once J* is removed?"."""
    names = list(by_family)
    rows = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            for ax in axes:
                for q in quantities:
                    fa, fb = by_family[a].fit(ax, q, level), by_family[b].fit(ax, q, level)
                    row, notes = {"family_a": a, "family_b": b, "quantity": q, "axis": ax,
                                  "exponent_a": float(fa["exponent"][0]), "exponent_b": float(fb["exponent"][0])}, []
                    n = min(int(fa["n"][0]), int(fb["n"][0]))
                    allow = by_family[a].reps.n_replicates > 0 and n >= MIN_POINTS_FOR_INTERVAL
                    if by_family[a].reps.n_replicates > 0 and not allow:
                        notes.append(f"no interval: {n} points (< {MIN_POINTS_FOR_INTERVAL})")
                    _ci_fields(row, "difference", fa["exponent"] - fb["exponent"], notes, allow)
                    lo, hi = row["difference_ci_lo"], row["difference_ci_hi"]
                    row["verdict"] = ("no interval" if not (np.isfinite(lo) and np.isfinite(hi)) else
                                      "differ at 95%" if lo > 0 or hi < 0 else "no difference at 95%")
                    row["note"] = "; ".join(notes)
                    rows.append(row)
    return pd.DataFrame(rows, columns=FAMILY_DIFFERENCE_COLUMNS)


def families_markdown(grouped_table: pd.DataFrame, differences: pd.DataFrame) -> str:
    """The families section of exponents.md: each family's total-loss exponents and their paired differences."""
    fams = [g for g in grouped_table["group"].unique() if g != "all"]
    total = grouped_table[grouped_table["sigma"].isna() & grouped_table["group"].isin(fams)
                          & grouped_table["quantity"].isin(["raw", "minus_jstar", "excess"])]
    rows = [[r["group"], r["quantity"], r["axis"], _with_ci(r, "exponent"), _with_ci(r, "rho"), str(int(r["n"])),
             str(r["note"])] for _, r in total.iterrows()]
    diff_rows = [[f"{d['family_a']} − {d['family_b']}", d["quantity"], d["axis"], _with_ci(d, "difference", ".3g"),
                  d["verdict"]] for _, d in differences.iterrows()]
    return "\n".join([
        "# Architecture families", "",
        f"Families: {', '.join(fams)}. Each family is fitted on its own models (its own compute frontier, chosen "
        "on its total L); differences are paired on the same replicates of the evaluation set.", "",
        _md_table(["family", "quantity", "axis", "exponent", "ρ", "n", "note"], rows), "",
        "## Differences of exponents (total loss)", "",
        _md_table(["families", "quantity", "axis", "difference", "verdict"], diff_rows), ""])
