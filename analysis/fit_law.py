"""Fit a scaling law to any table of (N, D, L): the fit, its resampled draws, 95% intervals of every parameter and
predictions at new (N, D) with intervals; the command `python -m analysis.fit_law` (docs/fit-your-own-table.md).

Laws (the ones the study fits, analysis.fits):
    nd   L = E + A/N^α + B/D^β    in log space, Huber(δ) or least squares, from a grid of starts (joint law)
    n    L = E + A/N^α            E fixed: least-squares line of log(L − E); E free: relative least squares
E is free, fixed to a number (0 = no floor), or taken from a column (each fit uses the mean of its rows' values).

Resampling. The unit of resampling is a run when a run column is given (a run's rows share its seed, its data order
and whatever the law misses about that model, so they are not independent evidence), else a row. Every fit is
repeated on ``n_bootstrap`` resamples of the units with replacement and, with ``leave_one_out``, once with each
unit left out; all of them are weights on the same points, refitted at once from the estimate (warm start). A
run's rows are its final row (the most tokens) or all of them (``rows``).

Intervals (95%). `ci`: the percentile interval of the bootstrap draws, widened about the estimate by √(G/(G − k))
(G units, k fitted parameters; log space for E, A, B): a spread measured from G units about a k-parameter fit is
too small by about that much — the small-sample correction HC1 makes to a sandwich variance, with units for
observations (simulated ladders of 24 runs: the plain percentile interval covered 91.5–93%, the widened one
93–95.5%; docs/fit-your-own-table.md). `jackknife`: estimate ± t·se of the leave-one-unit-out fits,
se = √((G−1)/G·Σ(θ₋g − θ̄)²) (unreliable for a Huber fit, whose estimate moves in steps like a median's).
A prediction also gets `pi`, an interval for the loss of a new run: each bootstrap draw of the law (widened as
above) plus the log residual of a random row of a random unit, that residual widened by the same factor
(residuals are smaller than the noise they estimate).

A parameter at a bound of its range (a floor driven to 0, an exponent at 0 or at analysis.fits.JOINT_MAX_EXPONENT,
a term that vanished) is set to that bound exactly and named in the `at_bound` column.

Public: ``fit_law`` (→ ``LawFit``), ``rolling_origin``, ``main`` (the CLI). The joint law on many weight rows is
``analysis.fits.joint_rows``, shared with the study's compute-optimal law and its forecasts.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import fits
from analysis.forecast import splits
from analysis.intervals import LEVEL, MAX_INVALID_FRACTION, jackknife
from study.atomic import atomic_path

LAWS = ("nd", "n")
PARAMETERS = {"nd": ("E", "A", "B", "alpha", "beta", "n_opt_exponent", "d_opt_exponent"), "n": ("E", "A", "alpha")}
FORMULA = {"nd": "L = E + A/N^alpha + B/D^beta", "n": "L = E + A/N^alpha"}
HUBER_DELTA = 1e-3
MAX_LEAVE_ONE_OUT = 500      # units; beyond, the leave-one-out refits are skipped (a note says so)
_TAIL = (100 - LEVEL) / 2
PARAMETER_COLUMNS = ["parameter", "estimate", "ci_lo", "ci_hi", "jackknife_lo", "jackknife_hi", "loo_min", "loo_max",
                     "at_bound", "note"]
PREDICTION_COLUMNS = ["params", "tokens", "predicted", "ci_lo", "ci_hi", "pi_lo", "pi_hi", "jackknife_lo",
                      "jackknife_hi", "actual", "log_error", "in_pi"]


# ----------------------------------------------------------------------------------------------------------------
# resampling: weights on the points
# ----------------------------------------------------------------------------------------------------------------
def final_rows(runs, order) -> np.ndarray:
    """bool [S]: each run's final row — the largest ``order`` (tokens), the last in the table on ties."""
    df = pd.DataFrame({"run": np.asarray(runs), "order": np.asarray(order, dtype=np.float64),
                       "pos": np.arange(len(runs))})
    last = df.sort_values(["order", "pos"], kind="stable").groupby("run", sort=False).tail(1).index
    mask = np.zeros(len(df), dtype=bool)
    mask[last] = True
    return mask


@dataclass
class Resampling:
    """Weight rows on the points: row 0 the data (all ones), then bootstrap resamples of the units, then one row per
    unit left out. ``unit_of`` [S]: each point's unit index; ``units``: the unit labels."""
    weights: np.ndarray
    kind: np.ndarray
    left_out: np.ndarray
    unit_of: np.ndarray
    units: np.ndarray

    @property
    def n_units(self) -> int:
        return len(self.units)


def resampling(units, n_bootstrap: int, seed: int = 0, leave_one_out: bool = True) -> Resampling:
    """Resamples of whole units (``units`` [S]: a label per point): bootstrap with replacement, and leave-one-out
    (when there are at most MAX_LEAVE_ONE_OUT units). Depends only on (units, n_bootstrap, seed)."""
    labels, unit_of = np.unique(np.asarray(units), return_inverse=True)
    g = len(labels)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, g, size=(n_bootstrap, g))
    counts = np.zeros((n_bootstrap, g))
    np.add.at(counts, (np.repeat(np.arange(n_bootstrap), g), draws.ravel()), 1.0)
    rows = [np.ones((1, len(unit_of))), counts[:, unit_of]]
    kind = ["estimate"] + ["bootstrap"] * n_bootstrap
    left = [""] * (n_bootstrap + 1)
    if leave_one_out and 3 <= g <= MAX_LEAVE_ONE_OUT:
        rows.append(1.0 - np.eye(g)[:, unit_of])
        kind += ["leave_one_out"] * g
        left += [str(v) for v in labels]
    return Resampling(np.vstack(rows), np.array(kind), np.array(left, dtype=object), unit_of, labels)


# ----------------------------------------------------------------------------------------------------------------
# the fitters on every weight row
# ----------------------------------------------------------------------------------------------------------------
def power_rows(u, y, weights, floor=None):
    """L = c + exp(p + k·u) on every row of ``weights`` [R, S]: ``floor`` [R] fixed (least-squares line of
    log(L − c)) or None (free, relative least squares, 0 ≤ c < min L). Returns (k, p, c) [R] each."""
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    if floor is None:
        k, p, c, _ = fits.power_law_free(np.broadcast_to(u, w.shape), np.broadcast_to(y, w.shape), w)
        return k, p, c
    k, p, _, _ = fits.power_law_fixed(np.broadcast_to(u, w.shape), np.broadcast_to(y, w.shape), floor, w)
    return k, p, np.where(np.isfinite(k), np.asarray(floor, dtype=np.float64), np.nan)


# ----------------------------------------------------------------------------------------------------------------
# the result
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class LawFit:
    """A law fitted to a table and to every resample of it.

    ``parameters`` (PARAMETER_COLUMNS) and ``predictions`` (PREDICTION_COLUMNS) are the tables the CLI writes;
    ``draws`` holds every parameter on every row (row 0 the estimate; `kind` bootstrap or leave_one_out, `left_out`
    the unit). ``predict(params, tokens)`` gives L̂ [rows, P] of every row's law."""
    law: str
    floor: str
    huber_delta: float | None
    unit: str
    rows: str
    n_points: int
    n_units: int
    objective: float
    parameters: pd.DataFrame
    draws: pd.DataFrame
    predictions: pd.DataFrame
    notes: list = field(default_factory=list)
    _model: object = None

    def predict(self, params, tokens=None) -> np.ndarray:
        return np.exp(self._model.log_predict(np.atleast_1d(params), None if tokens is None else np.atleast_1d(tokens)))

    def summary(self) -> dict:
        """Everything as plain JSON values (NaN → None)."""
        return _jsonable({"law": self.law, "formula": FORMULA[self.law], "floor": self.floor,
                          "huber_delta": self.huber_delta, "resampled_unit": self.unit, "rows": self.rows,
                          "n_points": self.n_points, "n_units": self.n_units,
                          "n_bootstrap": int((self.draws["kind"] == "bootstrap").sum()),
                          "n_leave_one_out": int((self.draws["kind"] == "leave_one_out").sum()),
                          "objective": self.objective, "notes": self.notes,
                          "parameters": self.parameters.to_dict("records"),
                          "predictions": self.predictions.to_dict("records")})


def _jsonable(v):
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (np.floating, float)):
        return float(v) if math.isfinite(v) else None
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.bool_):
        return bool(v)
    return v


# ----------------------------------------------------------------------------------------------------------------
# one law on every row: parameters (set to their bounds where they reach them) and predictions
# ----------------------------------------------------------------------------------------------------------------
def _bounds(law: str) -> dict:
    top = fits.JOINT_MAX_EXPONENT
    b = {"E": (0.0, math.inf), "A": (0.0, math.inf), "B": (0.0, math.inf), "alpha": (0.0, top), "beta": (0.0, top),
         "n_opt_exponent": (0.0, 1.0), "d_opt_exponent": (0.0, 1.0)}
    if law == "n":
        b["alpha"] = (-math.inf, math.inf)
    return b


class _JointModel:
    """The joint law's θ on every row, on N and D normalised by ``scale``."""
    n_free = None

    def __init__(self, theta, scale, log_floor):
        self.theta, self.scale, self.log_floor = theta, scale, log_floor
        self.n_free = theta.shape[1]

    def log_predict(self, params, tokens):
        if tokens is None:
            raise ValueError("the law in N and D needs tokens to predict")
        n, d = np.log(params / self.scale[0]), np.log(tokens / self.scale[1])
        return fits.joint_log_model(self.theta, n, d, self.log_floor)

    def values(self) -> dict:
        """Every parameter [R], a parameter at a bound of θ set to that bound exactly (a vanished term to 0)."""
        lo, hi = fits.joint_bounds(self.theta.shape[1])
        with np.errstate(invalid="ignore"):
            at_lo, at_hi = self.theta <= lo + 1e-9, self.theta >= hi - 1e-9
        v = fits.joint_params(self.theta, self.scale, self.log_floor)
        out = {"E": v["E"], "A": np.where(at_lo[:, 0], 0.0, v["A"]), "B": np.where(at_lo[:, 1], 0.0, v["B"])}
        for j, name in ((2, "alpha"), (3, "beta")):
            out[name] = np.where(at_lo[:, j], 0.0, np.where(at_hi[:, j], hi[j], v["a" if j == 2 else "b"]))
        if self.theta.shape[1] == 5:
            out["E"] = np.where(at_lo[:, 4], 0.0, out["E"])
        a, b = out["alpha"], out["beta"]
        with np.errstate(invalid="ignore", divide="ignore"):
            out["n_opt_exponent"] = np.where(a + b > 0, b / (a + b), np.nan)
            out["d_opt_exponent"] = np.where(a + b > 0, a / (a + b), np.nan)
        return out


class _PowerModel:
    """L = c + exp(p + k·log N) on every row."""

    def __init__(self, k, p, c, free: bool):
        self.k, self.p, self.c = k, p, c
        self.n_free = 3 if free else 2

    def log_predict(self, params, tokens):
        return np.log(fits.power_law_predict(np.log(params), self.c, self.k, self.p))

    def values(self) -> dict:
        return {"E": np.where(self.c <= 0, 0.0, self.c), "A": np.exp(self.p), "alpha": -self.k}


def _percentile(draws: np.ndarray):
    """(2.5, 97.5) percentiles along axis 0 of draws [B, P]; NaN where more than MAX_INVALID_FRACTION of the draws
    have no value (or there are none)."""
    draws = np.asarray(draws, dtype=np.float64)
    draws = draws[:, None] if draws.ndim == 1 else draws
    ok = np.isfinite(draws)
    nan = np.full(draws.shape[1], np.nan)
    if len(draws) == 0 or not ok.any():
        return nan, nan.copy()
    q = np.nanpercentile(np.where(ok, draws, np.nan), [_TAIL, 100 - _TAIL], axis=0)
    bad = 1.0 - ok.mean(axis=0) > MAX_INVALID_FRACTION
    return np.where(bad, np.nan, q[0]), np.where(bad, np.nan, q[1])


def widening(n_units: int, n_free: int) -> float:
    """√(G/(G − k)): a spread estimated from G resampled units about a fit of k parameters is too small by about
    that much (the small-sample correction HC1 makes to a sandwich variance, with units for observations)."""
    return math.sqrt(n_units / (n_units - n_free)) if n_units > n_free else math.nan


def _widen(estimate, q, factor, log=False):
    """Interval ends q moved away from the estimate by ``factor`` (in log space with ``log``; an end or estimate
    at 0 stays where it is)."""
    estimate, q = np.asarray(estimate, dtype=np.float64), np.asarray(q, dtype=np.float64)
    if not log:
        return estimate + factor * (q - estimate)
    with np.errstate(divide="ignore", invalid="ignore"):
        moved = np.exp(np.log(estimate) + factor * (np.log(q) - np.log(estimate)))
    return np.where((estimate > 0) & (q > 0), moved, q)


def _jackknife_interval(estimate, loo: np.ndarray):
    """estimate ± t·se of the leave-one-out values loo [G, P] (NaN with fewer than three)."""
    loo = np.asarray(loo, dtype=np.float64)
    loo = loo[:, None] if loo.ndim == 1 else loo
    half, _, _ = jackknife(loo.T)
    return estimate - half, estimate + half


def parameter_table(values: dict, kind, law: str, fixed_floor: bool, widen: float = 1.0) -> pd.DataFrame:
    """PARAMETER_COLUMNS for every parameter of ``values`` (name → [R] on the rows of ``kind``): the bootstrap
    percentile interval widened about the estimate by ``widen`` (``widening``; in log space for E, A and B)."""
    bounds = _bounds(law)
    boot, loo = kind == "bootstrap", kind == "leave_one_out"
    rows = []
    for name in PARAMETERS[law]:
        v = values[name]
        lo_b, hi_b = bounds[name]
        est = float(v[0])
        log = name in ("E", "A", "B")
        ci_lo, ci_hi = (float(np.clip(_widen(est, x[0], widen, log), lo_b, hi_b)) for x in _percentile(v[boot]))
        j_lo, j_hi = (float(np.clip(x[0], lo_b, hi_b)) for x in _jackknife_interval(est, v[loo][:, None]))
        lv = v[loo][np.isfinite(v[loo])]
        row = {"parameter": name, "estimate": est, "ci_lo": ci_lo, "ci_hi": ci_hi, "jackknife_lo": j_lo,
               "jackknife_hi": j_hi, "loo_min": float(lv.min()) if lv.size else math.nan,
               "loo_max": float(lv.max()) if lv.size else math.nan}
        ends = [f"{k} at {b:g}" for k in ("estimate", "ci_lo", "ci_hi") for b in (lo_b, hi_b)
                if math.isfinite(b) and row[k] == b]
        row["at_bound"] = "; ".join(ends)
        row["note"] = "fixed" if (name == "E" and fixed_floor) else ""
        rows.append(row)
    return pd.DataFrame(rows, columns=PARAMETER_COLUMNS)


def _residual_draws(log_residual, unit_of, n_units, n_draws, rng) -> np.ndarray:
    """[n_draws] log residuals of a random row of a random unit (a new run is a new unit)."""
    order = np.argsort(unit_of, kind="stable")
    size = np.bincount(unit_of, minlength=n_units)
    start = np.r_[0, np.cumsum(size)[:-1]]
    g = rng.integers(0, n_units, n_draws)
    pos = np.floor(rng.random(n_draws) * size[g]).astype(np.int64)
    return log_residual[order][start[g] + pos]


def prediction_table(model, kind, points, actual, log_residual, unit_of, n_units, seed) -> pd.DataFrame:
    """PREDICTION_COLUMNS at ``points`` [P, 2] (N, D; D NaN for the law in N): the law's value with its bootstrap
    interval (ci) and jackknife, and a new run's loss (pi, see the module's doc)."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    logp = model.log_predict(points[:, 0], points[:, 1])                    # [R, P]
    boot, loo = kind == "bootstrap", kind == "leave_one_out"
    widen = widening(n_units, model.n_free)
    law_draws = logp[0] + widen * (logp[boot] - logp[0])                     # widened about the estimate
    ci_lo, ci_hi = np.exp(_percentile(law_draws))
    j_lo, j_hi = _jackknife_interval(logp[0], logp[loo])
    rng = np.random.default_rng([seed, 2])
    eps = _residual_draws(log_residual, unit_of, n_units, int(boot.sum()), rng) * widen
    pi_lo, pi_hi = np.exp(_percentile(law_draws + eps[:, None]))
    actual = np.full(len(points), np.nan) if actual is None else np.asarray(actual, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        log_error = logp[0] - np.log(actual)
    scored = np.isfinite(actual) & np.isfinite(pi_lo)
    in_pi = np.where(scored, (pi_lo <= actual) & (actual <= pi_hi), None).astype(object)
    return pd.DataFrame({"params": points[:, 0], "tokens": points[:, 1], "predicted": np.exp(logp[0]),
                         "ci_lo": ci_lo, "ci_hi": ci_hi, "pi_lo": pi_lo, "pi_hi": pi_hi,
                         "jackknife_lo": np.exp(j_lo), "jackknife_hi": np.exp(j_hi), "actual": actual,
                         "log_error": log_error, "in_pi": in_pi}, columns=PREDICTION_COLUMNS)


# ----------------------------------------------------------------------------------------------------------------
# fit_law: the public function
# ----------------------------------------------------------------------------------------------------------------
def _positive(name: str, v, size=None) -> np.ndarray:
    a = np.asarray(v, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {a.shape}")
    if size is not None and a.size != size:
        raise ValueError(f"{name} has {a.size} values, params has {size}")
    bad = ~(np.isfinite(a) & (a > 0))
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"{name}: {int(bad.sum())} values are not positive finite numbers (first at index {i}: "
                         f"{a[i]!r}); the fit is in log space")
    return a


def _floor_values(floor, size):
    """None (free), or the floor per point [S]."""
    if isinstance(floor, str):
        if floor != "free":
            raise ValueError(f"floor must be 'free', a number ≥ 0 or one value per point, got {floor!r}")
        return None
    f = np.broadcast_to(np.asarray(floor, dtype=np.float64), (size,)).copy() if np.ndim(floor) == 0 else \
        np.asarray(floor, dtype=np.float64)
    if f.shape != (size,):
        raise ValueError(f"floor has {f.size} values, params has {size}")
    if not (np.isfinite(f).all() and (f >= 0).all()):
        raise ValueError("floor values must be finite and ≥ 0")
    return f


def _starts(spec, n, d, logl, scale, log_floor, huber_delta):
    """θ starts of the joint law: "epoch" (Epoch AI's grid, its 60 most promising), "epoch:K", "epoch:all",
    "study" (analysis.fits.joint_starts), or rows (log A, log B, log E, α, β) in Epoch's parametrisation."""
    if isinstance(spec, str):
        if spec == "study":
            return fits.joint_starts(logl, log_floor is None)
        name, _, k = spec.partition(":")
        if name != "epoch" or not (k == "" or k == "all" or (k.isdigit() and int(k) > 0)):
            raise ValueError(f"starts must be 'epoch', 'epoch:K', 'epoch:all' or 'study', got {spec!r}")
        top_k = 60 if k == "" else None if k == "all" else int(k)
        return fits.epoch_starts(n, d, logl, scale, top_k=top_k, huber_delta=huber_delta, log_floor=log_floor)
    grid = np.atleast_2d(np.asarray(spec, dtype=np.float64))
    if grid.shape[1] != 5 or not np.isfinite(grid).all():
        raise ValueError(f"starts as numbers must be rows (log A, log B, log E, alpha, beta), got shape {grid.shape}")
    return fits.epoch_starts(n, d, logl, scale, top_k=None, log_floor=log_floor, grid=grid)


def _select(n, l, d, runs, rows, drop_highest):
    """The points a fit uses: the highest ``drop_highest`` losses dropped (in table order, as
    analysis.fits.fit_chinchilla), then each run's final row where ``rows`` is "final". Returns the index."""
    if not 0 <= drop_highest < n.size:
        raise ValueError(f"drop_highest must be in [0, {n.size}), got {drop_highest}")
    keep = np.sort(np.argsort(l)[: n.size - drop_highest]) if drop_highest else np.arange(n.size)
    if rows not in ("all", "final"):
        raise ValueError(f"rows must be 'all' or 'final', got {rows!r}")
    if rows == "final" and runs is not None:
        order = d[keep] if d is not None else np.arange(keep.size)
        keep = keep[final_rows(np.asarray(runs)[keep], order)]
    return keep


def fit_law(params, loss, tokens=None, *, law: str | None = None, runs=None, rows: str = "all", floor="free",
            huber_delta="auto", starts="epoch", n_bootstrap: int = 1000, leave_one_out: bool = True, seed: int = 0,
            predict=None, actual=None, drop_highest: int = 0) -> LawFit:
    """Fit ``law`` ("nd": L = E + A/N^α + B/D^β, the default with ``tokens``; "n": L = E + A/N^α) to points
    (params N, tokens D, loss L), with intervals from resampling whole ``runs`` (a label per point; without, each
    point is its own unit) and predictions at ``predict`` ([P, 2] (N, D) pairs, or [P] N for the law in N;
    ``actual`` [P] the observed losses there, if known).

    ``floor``: "free", a number ≥ 0 (0 = no floor) or one value per point (each fit uses its points' mean).
    ``huber_delta``: the Huber δ on log residuals of the law in N and D ("auto" = 1e-3, Epoch AI's; None = least
    squares); the law in N is fitted as the study fits it (least squares) and takes none. ``starts``: see
    ``_starts``. ``rows``: "all" of a run's rows or its "final" one. ``drop_highest``: drop that many highest
    losses first. Returns a LawFit (see the module's doc for the intervals)."""
    n = _positive("params", params)
    l = _positive("loss", loss, n.size)
    d = None if tokens is None else _positive("tokens", tokens, n.size)
    law, huber_delta = _check_options(law, d, huber_delta, runs, n.size, n_bootstrap)
    fl = _floor_values(floor, n.size)
    fixed = not isinstance(floor, str) and np.ndim(floor) == 0
    keep = _select(n, l, d, runs, rows, drop_highest)
    n, l = n[keep], l[keep]
    d = None if d is None else d[keep]
    fl = None if fl is None else fl[keep]
    _check_enough(law, n, d, fl, l)
    units = np.asarray(runs)[keep] if runs is not None else np.arange(n.size)
    rs = resampling(units, n_bootstrap, seed, leave_one_out)
    model, objective = _fit_rows(law, n, d, l, fl, rs.weights, huber_delta, starts)
    values = model.values()
    notes = _notes(rs, runs is not None, leave_one_out)
    if rs.n_units <= model.n_free:
        notes.append(f"{rs.n_units} units for {model.n_free} fitted parameters: no bootstrap intervals")
    draws = pd.DataFrame({"kind": rs.kind, "left_out": rs.left_out, **{k: values[k] for k in PARAMETERS[law]}})
    params_table = parameter_table(values, rs.kind, law, fixed_floor=fixed, widen=widening(rs.n_units, model.n_free))
    log_resid = np.log(l) - model.log_predict(n, d)[0]
    pts = _points(predict, law)
    preds = prediction_table(model, rs.kind, pts, actual, log_resid, rs.unit_of, rs.n_units, seed)
    return LawFit(law=law, floor="free" if fl is None else f"{float(floor):.17g}" if fixed else "per point mean",
                  huber_delta=huber_delta, unit="run" if runs is not None else "row",
                  rows=rows if runs is not None else "all", n_points=int(n.size), n_units=rs.n_units,
                  objective=float(objective), parameters=params_table, draws=draws, predictions=preds, notes=notes,
                  _model=model)


def _check_options(law, d, huber_delta, runs, size, n_bootstrap):
    """(law, Huber δ) checked, their defaults filled in."""
    law = law or ("nd" if d is not None else "n")
    if law not in LAWS:
        raise ValueError(f"law must be one of {LAWS}, got {law!r}")
    if law == "nd" and d is None:
        raise ValueError("the law in N and D (law 'nd') needs tokens")
    if huber_delta == "auto":
        huber_delta = HUBER_DELTA if law == "nd" else None
    if law == "n" and huber_delta is not None:
        raise ValueError("the law in N alone is fitted by least squares (as the study fits it); "
                         "it takes no huber_delta")
    if huber_delta is not None and not (math.isfinite(huber_delta) and huber_delta > 0):
        raise ValueError(f"huber_delta must be a positive number or None, got {huber_delta!r}")
    if runs is not None and len(runs) != size:
        raise ValueError(f"runs has {len(runs)} labels, params has {size}")
    if n_bootstrap < 0:
        raise ValueError(f"n_bootstrap must be ≥ 0, got {n_bootstrap}")
    return law, huber_delta


def _check_enough(law, n, d, fl, l):
    need = 5 if law == "nd" else 3
    if n.size < need:
        raise ValueError(f"the law {FORMULA[law]} needs at least {need} points, got {n.size}")
    if np.unique(n).size < 2 or (d is not None and law == "nd" and np.unique(d).size < 2):
        raise ValueError("params (and tokens, for the law in N and D) must take at least two distinct values")
    if fl is not None and (fl >= l).any():
        i = int(np.argmax(fl >= l))
        raise ValueError(f"the floor ({fl[i]:g}) is not below every loss (loss {l[i]:g} at point {i})")


def _notes(rs: Resampling, by_run: bool, leave_one_out: bool) -> list:
    notes = []
    if rs.n_units < 10:
        notes.append(f"only {rs.n_units} {'runs' if by_run else 'points'} to resample: intervals are rough")
    if leave_one_out and not (rs.kind == "leave_one_out").any():
        notes.append(f"no leave-one-out: {rs.n_units} units (needs 3 … {MAX_LEAVE_ONE_OUT})")
    return notes


def _points(predict, law) -> np.ndarray:
    """[P, 2] (N, D) from the user's points (D NaN for the law in N)."""
    if predict is None:
        return np.empty((0, 2))
    p = np.asarray(predict, dtype=np.float64)
    if law == "n" and p.ndim == 1:
        p = np.column_stack([p, np.full(p.size, np.nan)])
    p = np.atleast_2d(p)
    if p.shape[1] != 2 or (law == "nd" and not (np.isfinite(p) & (p > 0)).all()) or not (p[:, 0] > 0).all():
        raise ValueError(f"predict must be positive (N, D) pairs{' (or N values)' if law == 'n' else ''}, "
                         f"got shape {p.shape}")
    return p


def _fit_rows(law, n, d, l, fl, weights, huber_delta, starts):
    """(model on every weight row, row 0's objective)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        floor_rows = None if fl is None else (weights @ fl) / weights.sum(axis=1)
    if law == "n":
        k, p, c = power_rows(np.log(n), l, weights, floor_rows)
        fitted = fits.power_law_predict(np.log(n), c[:1], k[:1], p[:1])[0]
        # each fitter's own objective: relative squares (free floor), squares of log(L − E) (fixed floor)
        objective = (np.sum(((l - fitted) / l) ** 2) if fl is None
                     else np.sum((np.log(l - c[0]) - np.log(fitted - c[0])) ** 2))
        return _PowerModel(k, p, c, fl is None), objective
    scale = fits.joint_scale(n, d)
    un, ud, logl = np.log(n / scale[0]), np.log(d / scale[1]), np.log(l)
    log_floor = None if floor_rows is None else np.log(floor_rows)
    theta0_starts = _starts(starts, un, ud, logl, scale, None if log_floor is None else log_floor[0], huber_delta)
    theta, objective = fits.joint_rows(un, ud, logl, weights, log_floor, huber_delta=huber_delta, starts=theta0_starts)
    return _JointModel(theta, scale, log_floor), objective


# ----------------------------------------------------------------------------------------------------------------
# rolling origin: fit up to a size, predict the next
# ----------------------------------------------------------------------------------------------------------------
ROLLING_COLUMNS = ["n_train_sizes", "train_max_params", "held_out_params"] + PREDICTION_COLUMNS


def rolling_origin(params, loss, tokens=None, *, runs=None, rows: str = "all", floor="free", last: int | None = 3,
                   drop_highest: int = 0, **kw) -> pd.DataFrame:
    """The study's rolling-origin splits (analysis.forecast.splits) on a table: sizes are the distinct N (to 6
    significant digits); split k fits the law on the k smallest sizes and predicts every point of size k + 1 with
    its intervals (ROLLING_COLUMNS). ``last``: only the last that many splits (None = all). ``kw`` go to
    ``fit_law``; ``rows`` and ``drop_highest`` apply to the whole table first."""
    # imported here: analysis.forecast imports analysis.compute_optimal, which imports this module

    n = _positive("params", params)
    l = _positive("loss", loss, n.size)
    d = None if tokens is None else _positive("tokens", tokens, n.size)
    fl = _floor_values(floor, n.size)
    keep = _select(n, l, d, runs, rows, drop_highest)
    size = np.array([float(f"{v:.6g}") for v in n[keep]])
    snaps = pd.DataFrame({"model": size, "params": size})
    cuts = splits(snaps)
    if not cuts:
        raise ValueError(f"rolling origin needs at least 4 distinct params values, got {np.unique(size).size}")
    cuts = cuts if last is None else cuts[-last:]
    take = lambda v, m: None if v is None else np.asarray(v)[keep][m]  # noqa: E731
    out = []
    for k, train, test in cuts:
        tr, te = np.isin(size, train), size == test
        f_floor = floor if (isinstance(floor, str) or np.ndim(floor) == 0) else take(fl, tr)
        pts = np.column_stack([n[keep][te], d[keep][te] if d is not None else np.full(te.sum(), np.nan)])
        try:
            f = fit_law(n[keep][tr], l[keep][tr], take(d, tr), runs=take(runs, tr), floor=f_floor, predict=pts,
                        actual=l[keep][te], **kw)
        except ValueError as err:
            raise ValueError(f"rolling origin, split {k} (train on N ≤ {max(train):.6g}): {err}") from None
        out.append(f.predictions.assign(n_train_sizes=k, train_max_params=max(train),
                                        held_out_params=test))
    return pd.concat(out, ignore_index=True)[ROLLING_COLUMNS]


# ----------------------------------------------------------------------------------------------------------------
# the command
# ----------------------------------------------------------------------------------------------------------------
class TableError(ValueError):
    """Bad input to the command: one line, naming the file, column, value or option."""


def _read_table(path: str) -> pd.DataFrame:
    source = sys.stdin if path == "-" else Path(path)
    if path != "-" and not Path(path).is_file():
        raise TableError(f"table file not found: {path}")
    try:
        return pd.read_csv(source)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise TableError(f"cannot read {path} as CSV: {str(err).strip().splitlines()[0]}") from None


def _column(df: pd.DataFrame, name: str, option: str, source: str, *, positive=True) -> np.ndarray:
    """A numeric column, every value a finite number (> 0 with ``positive``, ≥ 0 without)."""
    if name not in df.columns:
        raise TableError(f"{source} has no column {name!r} ({option}); its columns: {', '.join(map(str, df.columns))}")
    v = pd.to_numeric(df[name], errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(v) | ((v <= 0) if positive else (v < 0))
    if bad.any():
        i = int(np.argmax(bad))
        raw = df[name].iloc[i]
        raise TableError(f"{source} column {name!r} ({option}): {int(bad.sum())} values are not "
                         f"{'positive' if positive else 'non-negative'} numbers (first on line {i + 2}: "
                         f"{'empty' if pd.isna(raw) else raw})")
    return v


def _predict_points(specs, law) -> list:
    out = []
    for s in specs or []:
        parts = s.split(",")
        want = 2 if law == "nd" else 1
        try:
            vals = [float(p) for p in parts]
        except ValueError:
            vals = []
        if len(vals) != want or not all(math.isfinite(v) and v > 0 for v in vals):
            raise TableError(f"--predict {s!r}: expected {'N,D' if want == 2 else 'N'} as positive numbers "
                             f"(e.g. {'70e9,1.4e12' if want == 2 else '70e9'})")
        out.append(vals + ([math.nan] if want == 1 else []))
    return out


def _floor_arg(spec: str, df: pd.DataFrame, source: str):
    if spec == "free":
        return "free"
    try:
        v = float(spec)
    except ValueError:
        return _column(df, spec, "--floor", source, positive=False)
    if not (math.isfinite(v) and v >= 0):
        raise TableError(f"--floor {spec!r}: a fixed floor must be a finite number ≥ 0")
    return v


def _huber_arg(spec: str):
    if spec in ("none", "auto"):
        return None if spec == "none" else spec
    try:
        v = float(spec)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number or 'none', got {spec!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number or 'none', got {spec!r}")
    return v


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m analysis.fit_law",
                                 description="Fit a scaling law to a CSV table of (N, D, L) — L = E + A/N^alpha + "
                                             "B/D^beta, or L = E + A/N^alpha — with 95% intervals from resampling "
                                             "whole runs, and predict L at new (N, D). See docs/fit-your-own-table.md.")
    ap.add_argument("table", help="CSV file ('-' = standard input)")
    ap.add_argument("--params", default="params", metavar="COL", help="column of N, parameters (default: params)")
    ap.add_argument("--tokens", default="tokens", metavar="COL",
                    help="column of D, tokens or images seen (default: tokens; not needed by --law n)")
    ap.add_argument("--loss", default="loss", metavar="COL", help="column of L (default: loss)")
    ap.add_argument("--run", metavar="COL", help="column naming each row's training run: runs are resampled whole")
    ap.add_argument("--rows", choices=("all", "final"), default="all",
                    help="with --run: fit every row of a run, or only its final one (most tokens); default all")
    ap.add_argument("--law", choices=LAWS, default="nd",
                    help="nd: E + A/N^alpha + B/D^beta (default); n: E + A/N^alpha")
    ap.add_argument("--floor", default="free", metavar="free|NUMBER|COL",
                    help="E: fitted (free, default), fixed to a number (0 = no floor), or a column's mean")
    ap.add_argument("--huber-delta", type=_huber_arg, default="auto", metavar="DELTA|none",
                    help=f"Huber delta on log residuals of --law nd (default {HUBER_DELTA:g}; none = least squares)")
    ap.add_argument("--starts", default="epoch", metavar="SPEC",
                    help="starts of --law nd: epoch (Epoch AI's grid, its 60 most promising; default), epoch:K, "
                         "epoch:all (all 5400), study (the study's grid)")
    ap.add_argument("--drop-highest", type=int, default=0, metavar="K",
                    help="drop the K highest-loss rows first (Epoch AI drop 5 of the Chinchilla points)")
    ap.add_argument("--n-bootstrap", type=int, default=1000, metavar="B", help="bootstrap resamples (default 1000)")
    ap.add_argument("--no-leave-one-out", action="store_true", help="skip the leave-one-unit-out refits")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--predict", action="append", metavar="N,D",
                    help="predict L at N,D (N alone for --law n); repeatable")
    ap.add_argument("--predict-file", metavar="CSV",
                    help="predict at every row of this CSV (same --params/--tokens columns; with the --loss column "
                         "too, each prediction is scored)")
    ap.add_argument("--rolling-origin", type=int, nargs="?", const=3, default=None, metavar="K",
                    help="also fit on the k smallest sizes (distinct N) and predict size k+1, for the last K such "
                         "splits (default 3; 0 = all)")
    ap.add_argument("--out", type=Path, metavar="DIR",
                    help="write parameters.csv, predictions.csv, draws.csv, fit.json (and rolling_origin.csv)")
    return ap


def _inputs(args, df: pd.DataFrame, source: str) -> dict:
    """fit_law's arguments from the table's columns."""
    kw = {"params": _column(df, args.params, "--params", source), "loss": _column(df, args.loss, "--loss", source)}
    if args.law == "nd" or args.tokens in df.columns:        # the law in N: tokens only order a run's rows
        kw["tokens"] = _column(df, args.tokens, "--tokens", source)
    if args.run is not None:
        if args.run not in df.columns:
            raise TableError(f"{source} has no column {args.run!r} (--run); its columns: "
                             f"{', '.join(map(str, df.columns))}")
        if df[args.run].isna().any():
            raise TableError(f"{source} column {args.run!r} (--run): {int(df[args.run].isna().sum())} rows name no "
                             f"run (first on line {int(np.argmax(df[args.run].isna().to_numpy())) + 2})")
        kw["runs"] = df[args.run].astype(str).to_numpy()
    kw["floor"] = _floor_arg(args.floor, df, source)
    return kw


def _prediction_inputs(args, law) -> tuple:
    pts = _predict_points(args.predict, law)
    actual = [math.nan] * len(pts)
    if args.predict_file:
        pf = _read_table(args.predict_file)
        n = _column(pf, args.params, "--params", args.predict_file)
        d = _column(pf, args.tokens, "--tokens", args.predict_file) if law == "nd" else np.full(n.size, np.nan)
        pts += np.column_stack([n, d]).tolist()
        actual += (_column(pf, args.loss, "--loss", args.predict_file).tolist() if args.loss in pf.columns
                   else [math.nan] * n.size)
    return (pts or None), np.array(actual)


def _format(v: float, at_bound: bool) -> str:
    return f"{v:.6g} (at bound)" if at_bound else f"{v:.6g}"


def summary_text(fit: LawFit) -> str:
    """The fit as a few lines for the terminal (the files hold full precision)."""
    by = f"{fit.n_units} {fit.unit}s" + (f" ({fit.rows} rows)" if fit.unit == "run" else "")
    h = "least squares" if fit.huber_delta is None else f"Huber delta {fit.huber_delta:g}"
    lines = [f"{FORMULA[fit.law]}   floor {fit.floor}; {fit.n_points} points, {h}, objective {fit.objective:.6g}",
             f"95% intervals: bootstrap over {by}, {int((fit.draws['kind'] == 'bootstrap').sum())} resamples"]
    lines += [f"note: {n}" for n in fit.notes]
    for r in fit.parameters.itertuples():
        marks = r.at_bound
        est = _format(r.estimate, "estimate at" in marks)
        ci = (f"   [{_format(r.ci_lo, 'ci_lo at' in marks)}, {_format(r.ci_hi, 'ci_hi at' in marks)}]"
              if math.isfinite(r.ci_lo) else "")
        lines.append(f"  {r.parameter:15s} {est}{ci}{'   (fixed)' if r.note == 'fixed' else ''}")
    for r in fit.predictions.itertuples():
        at = f"N={r.params:.6g}" + (f", D={r.tokens:.6g}" if math.isfinite(r.tokens) else "")
        obs = f"   observed {r.actual:.6g}" if math.isfinite(r.actual) else ""
        lines.append(f"  L({at}) = {r.predicted:.6g}   law [{r.ci_lo:.6g}, {r.ci_hi:.6g}]   "
                     f"new run [{r.pi_lo:.6g}, {r.pi_hi:.6g}]{obs}")
    return "\n".join(lines)


def write_outputs(fit: LawFit, out: Path, rolling: pd.DataFrame | None = None) -> list:
    """parameters.csv, predictions.csv, draws.csv, fit.json (+ rolling_origin.csv), each written whole or not at
    all; full precision."""
    out.mkdir(parents=True, exist_ok=True)
    files = {"parameters.csv": fit.parameters, "predictions.csv": fit.predictions, "draws.csv": fit.draws}
    if rolling is not None:
        files["rolling_origin.csv"] = rolling
    for name, table in files.items():
        with atomic_path(out / name) as tmp:
            table.to_csv(tmp, index=False)
    summary = fit.summary()
    if rolling is not None:
        summary["rolling_origin"] = _jsonable(rolling.to_dict("records"))
    with atomic_path(out / "fit.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=1, allow_nan=False) + "\n")
    return sorted(files) + ["fit.json"]


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.n_bootstrap < 0:
            raise TableError(f"--n-bootstrap must be ≥ 0, got {args.n_bootstrap}")
        if args.rows == "final" and args.run is None:
            raise TableError("--rows final needs --run (which rows belong to one run)")
        df = _read_table(args.table)
        source = "standard input" if args.table == "-" else args.table
        kw = _inputs(args, df, source)
        pts, actual = _prediction_inputs(args, args.law)
        opts = {"law": args.law, "rows": args.rows, "huber_delta": args.huber_delta, "starts": args.starts,
                "n_bootstrap": args.n_bootstrap, "leave_one_out": not args.no_leave_one_out, "seed": args.seed,
                "drop_highest": args.drop_highest}
        fit = fit_law(**kw, **opts, predict=pts, actual=actual if pts else None)
        rolling = None
        if args.rolling_origin is not None:
            opts.pop("drop_highest"), opts.pop("rows")
            rolling = rolling_origin(**kw, rows=args.rows, drop_highest=args.drop_highest,
                                     last=args.rolling_origin or None, **opts)
    except ValueError as err:       # TableError, and fit_law's own checks of the values
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary_text(fit))
    if rolling is not None:
        cover = rolling["in_pi"].mean()
        print(f"rolling origin: {rolling['n_train_sizes'].nunique()} splits, {len(rolling)} held-out points, "
              f"mean |log error| {np.abs(rolling['log_error']).mean():.4g}, inside the new-run interval {cover:.0%}")
    if args.out is not None:
        names = write_outputs(fit, args.out, rolling)
        print(f"wrote {', '.join(names)} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
