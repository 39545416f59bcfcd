"""Fit a scaling law to any table of (N, D, L): the fit, its resampled draws, 95% intervals of every parameter and
predictions at new (N, D) with intervals; the command is analysis.fit_law (docs/fit-your-own-table.md).

Laws (the ones the study fits: analysis.joint_fits, analysis.power_laws):
    nd   L = E + A/N^α + B/D^β    in log space, Huber(δ) or least squares, from a grid of starts (joint law)
    n    L = E + A/N^α            E fixed: least-squares line of log(L − E); E free: relative least squares
E is free, fixed to a number (0 = no floor), or taken from a column (each fit uses the mean of its rows' values).

Every fit is repeated on resamples of whole units (a run, or a row), all of them weights on the same points and
refitted at once from the estimate (warm start); the resampling and the intervals: analysis.law_intervals.

A parameter at a bound of its range (a floor driven to 0, an exponent at 0 or at
analysis.joint_law.JOINT_MAX_EXPONENT, a term that vanished) is set to that bound exactly and named in the `at_bound`
column.

Public: ``fit_law`` (→ ``LawFit``), ``rolling_origin``. The joint law on many weight rows is
``analysis.joint_fits.joint_rows``, shared with the study's compute-optimal law and its forecasts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from analysis.forecast import splits
from analysis.joint_fits import epoch_starts, joint_rows, joint_starts
from analysis.joint_law import joint_bounds, joint_log_model, joint_params, joint_scale
from analysis.law_intervals import (
    MAX_LEAVE_ONE_OUT,
    PARAMETERS,
    PREDICTION_COLUMNS,
    Resampling,
    final_rows,
    parameter_table,
    prediction_table,
    resampling,
    widening,
)
from analysis.power_laws import power_law_fixed, power_law_free, power_law_predict

LAWS = ("nd", "n")
FORMULA = {"nd": "L = E + A/N^alpha + B/D^beta", "n": "L = E + A/N^alpha"}
HUBER_DELTA = 1e-3


# ----------------------------------------------------------------------------------------------------------------
# the fitters on every weight row
# ----------------------------------------------------------------------------------------------------------------
def power_rows(u, y, weights, floor=None):
    """L = c + exp(p + k·u) on every row of ``weights`` [R, S]: ``floor`` [R] fixed (least-squares line of
    log(L − c)) or None (free, relative least squares, 0 ≤ c < min L). Returns (k, p, c) [R] each."""
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    if floor is None:
        k, p, c, _ = power_law_free(np.broadcast_to(u, w.shape), np.broadcast_to(y, w.shape), w)
        return k, p, c
    k, p, _, _ = power_law_fixed(np.broadcast_to(u, w.shape), np.broadcast_to(y, w.shape), floor, w)
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
        return jsonable({"law": self.law, "formula": FORMULA[self.law], "floor": self.floor,
                          "huber_delta": self.huber_delta, "resampled_unit": self.unit, "rows": self.rows,
                          "n_points": self.n_points, "n_units": self.n_units,
                          "n_bootstrap": int((self.draws["kind"] == "bootstrap").sum()),
                          "n_leave_one_out": int((self.draws["kind"] == "leave_one_out").sum()),
                          "objective": self.objective, "notes": self.notes,
                          "parameters": self.parameters.to_dict("records"),
                          "predictions": self.predictions.to_dict("records")})


def jsonable(v):
    if isinstance(v, dict):
        return {k: jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, (np.floating, float)):
        return float(v) if math.isfinite(v) else None
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.bool_):
        return bool(v)
    return v


# ----------------------------------------------------------------------------------------------------------------
# one law on every row: its parameters (set to their bounds where they reach them) and predictions
# ----------------------------------------------------------------------------------------------------------------
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
        return joint_log_model(self.theta, n, d, self.log_floor)

    def values(self) -> dict:
        """Every parameter [R], a parameter at a bound of θ set to that bound exactly (a vanished term to 0)."""
        lo, hi = joint_bounds(self.theta.shape[1])
        with np.errstate(invalid="ignore"):
            at_lo, at_hi = self.theta <= lo + 1e-9, self.theta >= hi - 1e-9
        v = joint_params(self.theta, self.scale, self.log_floor)
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
        return np.log(power_law_predict(np.log(params), self.c, self.k, self.p))

    def values(self) -> dict:
        return {"E": np.where(self.c <= 0, 0.0, self.c), "A": np.exp(self.p), "alpha": -self.k}


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
    "study" (analysis.joint_starts), or rows (log A, log B, log E, α, β) in Epoch's parametrisation."""
    if isinstance(spec, str):
        if spec == "study":
            return joint_starts(logl, log_floor is None)
        name, _, k = spec.partition(":")
        if name != "epoch" or not (k == "" or k == "all" or (k.isdigit() and int(k) > 0)):
            raise ValueError(f"starts must be 'epoch', 'epoch:K', 'epoch:all' or 'study', got {spec!r}")
        top_k = 60 if k == "" else None if k == "all" else int(k)
        return epoch_starts(n, d, logl, scale, top_k=top_k, huber_delta=huber_delta, log_floor=log_floor)
    grid = np.atleast_2d(np.asarray(spec, dtype=np.float64))
    if grid.shape[1] != 5 or not np.isfinite(grid).all():
        raise ValueError(f"starts as numbers must be rows (log A, log B, log E, alpha, beta), got shape {grid.shape}")
    return epoch_starts(n, d, logl, scale, top_k=None, log_floor=log_floor, grid=grid)


def _select(n, l, d, runs, rows, drop_highest):
    """The points a fit uses: the highest ``drop_highest`` losses dropped (in table order, as
    analysis.single_fits.fit_chinchilla), then each run's final row where ``rows`` is "final". Returns the index."""
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
    losses first. Returns a LawFit (analysis.law_intervals' doc says how its intervals are made)."""
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
        fitted = power_law_predict(np.log(n), c[:1], k[:1], p[:1])[0]
        # each fitter's own objective: relative squares (free floor), squares of log(L − E) (fixed floor)
        objective = (np.sum(((l - fitted) / l) ** 2) if fl is None
                     else np.sum((np.log(l - c[0]) - np.log(fitted - c[0])) ** 2))
        return _PowerModel(k, p, c, fl is None), objective
    scale = joint_scale(n, d)
    un, ud, logl = np.log(n / scale[0]), np.log(d / scale[1]), np.log(l)
    log_floor = None if floor_rows is None else np.log(floor_rows)
    theta0_starts = _starts(starts, un, ud, logl, scale, None if log_floor is None else log_floor[0], huber_delta)
    theta, objective = joint_rows(un, ud, logl, weights, log_floor, huber_delta=huber_delta, starts=theta0_starts)
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
