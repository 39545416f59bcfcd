"""The intervals of a law fitted to a table (analysis.table_law) on every resample of it: whole units resampled
as weight rows, and the parameter and prediction tables built from the fits on those rows.

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

A parameter at a bound of its range is set to that bound exactly and named in the `at_bound` column.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from analysis.intervals import LEVEL, MAX_INVALID_FRACTION, jackknife
from analysis.joint_law import JOINT_MAX_EXPONENT

PARAMETERS = {"nd": ("E", "A", "B", "alpha", "beta", "n_opt_exponent", "d_opt_exponent"), "n": ("E", "A", "alpha")}
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
# the intervals: parameters (each within its range) and predictions
# ----------------------------------------------------------------------------------------------------------------
def _bounds(law: str) -> dict:
    top = JOINT_MAX_EXPONENT
    b = {"E": (0.0, math.inf), "A": (0.0, math.inf), "B": (0.0, math.inf), "alpha": (0.0, top), "beta": (0.0, top),
         "n_opt_exponent": (0.0, 1.0), "d_opt_exponent": (0.0, 1.0)}
    if law == "n":
        b["alpha"] = (-math.inf, math.inf)
    return b


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
