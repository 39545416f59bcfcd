"""The study's power-law tables: fits of L, L − J*, the direct excess and a free offset against compute (one
frontier) and parameters, per σ and for the weighted total (exponents.csv); L − J* against L, paired (verdict.csv);
the profile over the subtracted constant (offset_profile.csv); and, for several architecture families, their
exponent differences (family_differences.csv).

Every number is computed on every row of the study (analysis.resample: the estimate, replicates of the evaluation
triples, of the seed runs, and the study with one model left out), with everything that depends on the data — the
frontier included — recomputed in each row; analysis.intervals turns the rows into the intervals (the total, which
is the headline, and the evaluation noise alone).

Fits (analysis.power_laws). A power law with a fixed offset c (0 for L, J* for L − J*) is a least-squares line in log
space, log(y − c) = log A + k·log x; ρ = |Pearson r| of that line (the paper's measure). With a free offset,
y = c + A·x^k by relative least squares. Axes (analysis.frontier): compute — x = training FLOPs on the study's ONE
frontier (chosen on the total L), reused for every σ and quantity; params — x = parameters, each model's last
snapshot. Extrapolation error: fit on every point but the largest model's, predict the largest model's points, mean
|predicted − actual| / L of the loss L (J* added back for L − J*).

Why ρ alone is no verdict: d ln(L − c)/d ln F = L/(L − c) · d ln L/d ln F, so any c > 0 steepens the exponent, and ρ
of log(L − c) often rises for every c below a data-dependent point. The verdict reports Δρ and Δ(extrapolation
error) between L − J* and L with paired intervals, calls a difference only when it is also practically relevant,
and compares the free offset with the offset a J* floor itself implies on the same points (the joint law with floor
J*, analysis.compute_optimal, fitted and then seen through the same free-offset fit): at finite D the asymptote of a
size sweep is J* + B·D^−b, not J*. The forecasts (analysis.forecast) are the verdict on the floor itself.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from analysis import compute_optimal
from analysis.frontier import final_mask, frontier_mask, largest_model_mask
from analysis.intervals import set_fields
from analysis.power_laws import power_law_fixed, power_law_free, power_law_predict
from analysis.resample import StudyReplicates
from models.sizes import FAMILY

MIN_POINTS_FOR_INTERVAL = 5
QUANTITIES = ("raw", "minus_jstar", "excess", "free_offset")
AXES = ("compute", "params")
# practical significance: a difference between L − J* and L counts when it removes at least this fraction of L's own
# lack of fit (1 − ρ(L)) or of L's extrapolation error; and J* below this fraction of the smallest fitted loss makes
# the two fits identical to rounding
PRACTICAL_FRACTION = 0.1
IDENTICAL_JSTAR = 1e-4   # J*/L below this moves a fit by less than it: the two fits are the same to any precision
                         # the intervals can resolve
POOLED = "all"  # the group of the fits over every model together


def _ci_columns(*names):
    return [c for n in names for c in (n, f"{n}_ci_lo", f"{n}_ci_hi", f"{n}_eval_ci_lo", f"{n}_eval_ci_hi")]


TABLE_COLUMNS = (["quantity", "axis", "sigma"] + _ci_columns("exponent", "prefactor", "offset", "rho") + ["r2"]
                 + _ci_columns("extrapolation_error")
                 + ["n", "n_nonpositive", "optimal_loss", "n_replicates", "n_jackknife", "note"])
VERDICTS = ("better", "worse", "no difference at 95%", "no practical difference", "identical fits (J* ≈ 0)",
            "no interval")
VERDICT_COLUMNS = (["axis", "sigma", "optimal_loss", "rho_raw", "rho_minus_jstar"] + _ci_columns("delta_rho")
                   + ["rho_threshold", "extrap_raw", "extrap_minus_jstar"] + _ci_columns("delta_extrap")
                   + ["extrap_threshold"] + _ci_columns("free_offset", "implied_offset", "free_minus_implied")
                   + ["free_offset_at_bound", "verdict_rho", "verdict_extrap", "free_offset_vs_jstar_law", "n",
                      "note"])


# ----------------------------------------------------------------------------------------------------------------
# the study's fits, on every row
# ----------------------------------------------------------------------------------------------------------------
FRONTIERS = ("all", "final")   # the compute frontier's candidates: every snapshot, or each run's final one only


def frontier_candidates(reps: StudyReplicates, frontier: str = "all") -> np.ndarray:
    """[rows, S] the total losses the compute frontier is chosen from: every snapshot ("all"), or each run's final
    snapshot only ("final": no run's training curve on the frontier, only the sweep of sizes and lengths)."""
    total = reps.loss[:, :, 0]
    if frontier == "final":
        return np.where(final_mask(reps.snapshots)[None, :], total, np.nan)
    return total


def frontier_note(reps: StudyReplicates, frontier: str = "all") -> str:
    """A sentence on what the estimate's compute frontier is made of: it says so when it mixes one run's training
    curve (several of its snapshots) with the other runs' snapshots."""
    flops = reps.snapshots["flops"].to_numpy(np.float64)
    on = frontier_mask(flops, frontier_candidates(reps, frontier)[:1])[0]
    per_run = reps.snapshots["model"][on].value_counts()
    curves = per_run[per_run > 1]
    if frontier == "final":
        return (f"The compute frontier here is chosen among each run's final snapshot only ({int(on.sum())} points "
                f"of {per_run.size} runs). ")
    if curves.empty or per_run.size < 2:
        return f"The compute frontier holds {int(on.sum())} snapshots of {per_run.size} runs. "
    what = ", ".join(f"{n} snapshots of {m}'s training curve" for m, n in curves.items())
    others = per_run.size - curves.size
    return (f"The compute frontier ({int(on.sum())} points) mixes {what} with the snapshots of "
            f"{others} other run{'s' if others != 1 else ''}: one run's training curve and the size sweep in one law "
            "(`--frontier final` fits each run's final snapshot only). ")


class _Axis:
    """The points of one axis for every row: x (log), the use mask, and the extrapolation split."""

    def __init__(self, reps: StudyReplicates, axis: str, frontier: str = "all"):
        snaps = reps.snapshots
        col = "flops" if axis == "compute" else "params"
        x = snaps[col].to_numpy(dtype=np.float64)
        if (x <= 0).any():
            raise ValueError(f"{col} must be positive for a power law in log space")
        self.u = np.log(x)
        available = reps.available
        if axis == "compute":
            self.mask = frontier_mask(x, frontier_candidates(reps, frontier))
        else:
            self.mask = final_mask(snaps)[None, :] & available
        largest = largest_model_mask(snaps["params"].to_numpy(np.float64), available)
        self.test = self.mask & largest
        self.fit = self.mask & ~largest
        self.u_rows = np.broadcast_to(self.u, self.mask.shape)


class StudyFits:
    """A study's rows with every fit computed once and shared by the tables, the verdict, the profile and the
    compute-optimal law."""

    def __init__(self, reps: StudyReplicates, frontier: str = "all"):
        if frontier not in FRONTIERS:
            raise ValueError(f"unknown frontier {frontier!r}; choose from {list(FRONTIERS)}")
        self.reps = reps
        self.frontier = frontier
        self._axes, self._fits, self._joint = {}, {}, {}

    def axis(self, name: str) -> _Axis:
        if name not in AXES:
            raise ValueError(f"unknown axis {name!r}; choose from {list(AXES)}")
        if name not in self._axes:
            self._axes[name] = _Axis(self.reps, name, self.frontier)
        return self._axes[name]

    def fit(self, axis: str, quantity: str, level: int) -> dict:
        key = (axis, quantity, level)
        if key not in self._fits:
            self._fits[key] = fit_quantity(self.reps, self.axis(axis), quantity, level)
        return self._fits[key]

    def joint(self, floor: str) -> compute_optimal.JointRows:
        """The compute-optimal law with this floor ("jstar", "free", "zero") on every row."""
        if floor not in self._joint:
            self._joint[floor] = compute_optimal.JointRows(self.reps, floor)
        return self._joint[floor]


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


def extrapolation_error(u, y, loss, c, k, p, w_test) -> np.ndarray:
    """Mean over the test points of |c + exp(p + k·u) − y| / L: the fitted quantity y's prediction error, measured
    relative to the loss L itself so that every quantity's error is on the same scale."""
    pred = power_law_predict(u, c, k, p)
    n = w_test.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        err = np.where(w_test > 0, np.abs(pred - y) / loss, 0.0).sum(-1) / n
    return np.where(n > 0, err, np.nan)


def fit_quantity(reps: StudyReplicates, ax: _Axis, quantity: str, level: int) -> dict:
    """Every row's fit of one (quantity, axis, level): arrays [rows] (index 0 = the estimate)."""
    y, c, loss, js = _quantity_values(reps, quantity, level)
    w = ax.mask.astype(np.float64)
    u = ax.u_rows
    at_bound = np.zeros(len(y), dtype=bool)
    if quantity == "free_offset":
        k, p, c, valid = power_law_free(u, y, w)
        kf, pf, cf, _ = power_law_free(u, y, ax.fit.astype(np.float64))
        # an offset at 0 or just below the smallest used loss is a boundary, not an estimate of a floor
        ymin = np.where(w > 0, y, np.inf).min(-1)
        at_bound = valid & ((c <= 0) | (c >= ymin * (1 - 1e-6)))
        _, _, r, _ = power_law_fixed(u, y, np.where(np.isfinite(c), c, 0.0), w)  # ρ of the line log(y − ĉ)
    else:
        k, p, r, valid = power_law_fixed(u, y, c, w)
        kf, pf, _, _ = power_law_fixed(u, y, c, ax.fit.astype(np.float64))
        cf = c
    fitted = power_law_predict(u, np.where(np.isfinite(c), c, 0.0), k, p)
    with np.errstate(invalid="ignore", divide="ignore"):
        ly = np.where(w > 0, np.log(np.where(y > 0, y, np.nan)), 0.0)
        rl = np.where(w > 0, ly - np.log(fitted), 0.0)
        ss_tot = (w * (ly - (w * ly).sum(-1, keepdims=True) / w.sum(-1, keepdims=True)) ** 2).sum(-1)
        r2 = 1 - (rl * rl).sum(-1) / ss_tot
    nonpos = ((w > 0) & ~(y - c[:, None] > 0)).sum(-1)
    # the reported offset is the one of y = offset + A·x^k for the quantity itself (L − J* and the excess have 0)
    offset = np.where(valid, c, np.nan) if quantity == "free_offset" else np.where(valid, 0.0, np.nan)
    return {"exponent": k, "log_prefactor": p, "offset": offset, "rho": np.abs(r), "r2": r2,
            "extrapolation_error": _held_out_kept(reps, extrapolation_error(u, y, loss, cf, kf, pf,
                                                                            ax.test.astype(np.float64))),
            "n": w.sum(-1), "n_nonpositive": nonpos, "optimal_loss": js, "at_bound": at_bound}


def _held_out_kept(reps: StudyReplicates, error: np.ndarray) -> np.ndarray:
    """An extrapolation error is defined by its held-out (largest) model: a jackknife row that leaves that model
    out measures another error, so it is dropped (NaN) — the jackknife leaves out the training models only."""
    snaps = reps.snapshots
    largest = snaps.loc[snaps["params"].idxmax(), "model"]
    return np.where((reps.kind == "jackknife") & (reps.left_out == largest), np.nan, error)


def _smallest_fitted(fits: StudyFits, axis: str, level: int) -> float:
    """The smallest loss of the estimate's fit on an axis: a floor or free offset of that fit lies below it."""
    used = fits.axis(axis).mask[0]
    return float(np.min(fits.reps.loss[0, used, level])) if used.any() else math.inf


def _allow(reps: StudyReplicates, n: int) -> bool:
    return reps.n_replicates > 0 and n >= MIN_POINTS_FOR_INTERVAL


def study_table(reps, *, quantities=QUANTITIES, axes=AXES, levels=None) -> pd.DataFrame:
    """exponents.csv: one row per (quantity, axis, σ or total) with the estimate and its 95% intervals, total and
    evaluation noise only (none with fewer than 5 points, or without replicates)."""
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
           "n_replicates": reps.n_replicates, "n_jackknife": int((reps.kind == "jackknife").sum())}
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
    allow = _allow(reps, n)
    if reps.n_replicates > 0 and n < MIN_POINTS_FOR_INTERVAL:
        notes.append(f"no interval: {n} points (< {MIN_POINTS_FOR_INTERVAL})")
    if f["at_bound"][0]:
        notes.append("free offset at its bound (0 or the smallest loss): the data do not identify a floor")
    kind = reps.kind
    set_fields(row, "exponent", f["exponent"], kind, notes, allow=allow)
    set_fields(row, "prefactor", np.exp(f["log_prefactor"]), kind, notes, allow=allow, bounds=(0.0, math.inf))
    set_fields(row, "offset", f["offset"], kind, notes, allow=allow and quantity == "free_offset",
               bounds=(0.0, _smallest_fitted(fits, axis, level)), mark_clipped=True)
    set_fields(row, "rho", f["rho"], kind, notes, allow=allow, transform="fisher", total_upper=1.0)
    set_fields(row, "extrapolation_error", f["extrapolation_error"], kind, notes, allow=allow, bounds=(0.0, math.inf))
    row["note"] = "; ".join(notes)
    return row


# ----------------------------------------------------------------------------------------------------------------
# the verdict: L − J* against L, paired, and the offset a J* floor implies
# ----------------------------------------------------------------------------------------------------------------
def paired_verdict(estimate, lo, hi, threshold, *, higher_is_better: bool, identical: bool = False) -> str:
    """One of VERDICTS for a paired difference (L − J* minus L) with its interval: a difference counts when its
    interval excludes 0 AND its size reaches ``threshold``."""
    if identical:
        return "identical fits (J* ≈ 0)"
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return "no interval"
    if lo <= 0 <= hi:
        return "no difference at 95%"
    if abs(estimate) < threshold:
        return "no practical difference"
    return "better" if (lo > 0) == higher_is_better else "worse"


def implied_offset(fits: StudyFits, axis: str) -> np.ndarray:
    """[rows] The free offset a J* floor implies on this axis: the joint law with floor J* (fitted to every snapshot
    of the row) evaluated at the axis's points, then seen through the same free-offset fit as the data. On the
    params axis (every final snapshot at the same D) it is J* + B·D^−b."""
    reps = fits.reps
    if not compute_optimal.identified(reps):
        return np.full(reps.loss.shape[0], np.nan)
    ax = fits.axis(axis)
    snaps = reps.snapshots
    pred = fits.joint("jstar").predict(snaps["params"].to_numpy(np.float64), snaps["images_seen"].to_numpy(np.float64))
    _, _, c, valid = power_law_free(ax.u_rows, pred, ax.mask.astype(np.float64))
    return np.where(valid, c, np.nan)


def verdict_table(reps, *, axes=AXES, levels=None) -> pd.DataFrame:
    """Per axis and level: Δρ = ρ(L − J*) − ρ(L) and Δ(extrapolation error), paired (same rows), with 95%
    intervals and a verdict each (VERDICTS, for L − J*); for the total, the free offset against the offset a J*
    floor implies on the same points."""
    fits = _as_fits(reps)
    reps = fits.reps
    levels = range(reps.loss.shape[2]) if levels is None else levels
    kind = reps.kind
    rows = []
    for a in axes:
        for lv in levels:
            raw, mj, fr = (fits.fit(a, q, lv) for q in ("raw", "minus_jstar", "free_offset"))
            n = int(raw["n"][0])
            allow = _allow(reps, n)
            js = float(raw["optimal_loss"][0])
            row, notes = {"axis": a, "sigma": reps.level_label(lv), "optimal_loss": js, "n": n}, []
            row["rho_raw"], row["rho_minus_jstar"] = float(raw["rho"][0]), float(mj["rho"][0])
            row["extrap_raw"] = float(raw["extrapolation_error"][0])
            row["extrap_minus_jstar"] = float(mj["extrapolation_error"][0])
            set_fields(row, "delta_rho", mj["rho"] - raw["rho"], kind, notes, allow=allow)
            set_fields(row, "delta_extrap", mj["extrapolation_error"] - raw["extrapolation_error"], kind, notes,
                       allow=allow)
            set_fields(row, "free_offset", fr["offset"], kind, notes, allow=allow,
                       bounds=(0.0, _smallest_fitted(fits, a, lv)), mark_clipped=True)
            row["free_offset_at_bound"] = bool(fr["at_bound"][0])
            if reps.n_replicates > 0 and not allow:
                notes.append(f"no interval: {n} points (< {MIN_POINTS_FOR_INTERVAL})")
            # one threshold for every axis: J* against the level's smallest loss over all snapshots
            identical = js <= IDENTICAL_JSTAR * float(np.nanmin(reps.loss[0, :, lv]))
            row["rho_threshold"] = PRACTICAL_FRACTION * (1 - row["rho_raw"])
            row["extrap_threshold"] = PRACTICAL_FRACTION * row["extrap_raw"]
            row["verdict_rho"] = paired_verdict(row["delta_rho"], row["delta_rho_ci_lo"], row["delta_rho_ci_hi"],
                                                row["rho_threshold"], higher_is_better=True, identical=identical)
            row["verdict_extrap"] = paired_verdict(row["delta_extrap"], row["delta_extrap_ci_lo"],
                                                   row["delta_extrap_ci_hi"], row["extrap_threshold"],
                                                   higher_is_better=False, identical=identical)
            if lv == 0:
                implied = implied_offset(fits, a)
                set_fields(row, "implied_offset", implied, kind, notes, allow=allow,
                           bounds=(0.0, _smallest_fitted(fits, a, lv)), mark_clipped=True)
                set_fields(row, "free_minus_implied", fr["offset"] - implied, kind, notes, allow=allow)
                row["free_offset_vs_jstar_law"] = _against_implied(row, bool(fr["at_bound"][0]))
            else:
                row["free_offset_vs_jstar_law"] = "total only"
            row["note"] = "; ".join(notes)
            rows.append(row)
    return pd.DataFrame(rows, columns=VERDICT_COLUMNS)


def _against_implied(row, at_bound: bool) -> str:
    if at_bound:
        return "free offset at a bound"
    lo, hi = row["free_minus_implied_ci_lo"], row["free_minus_implied_ci_hi"]
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return "no interval"
    return "consistent" if lo <= 0 <= hi else ("above" if lo > 0 else "below")


def offset_profile(reps, *, axes=AXES, level: int = 0, num: int = 41) -> pd.DataFrame:
    """ρ of log(L − c) and the extrapolation error of the offset-c line as functions of the subtracted constant c,
    from 0 to just below the smallest frontier loss, with intervals; J*, the free offset and the offset a J* floor
    implies are rows of their own (column `marker`: jstar, free_offset, implied_offset)."""
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
        if level == 0:
            cs.append((float(implied_offset(fits, a)[0]), "implied_offset"))
        allow = _allow(reps, int(w[0].sum()))
        for c, marker in cs:
            if not np.isfinite(c) or c >= ymin:
                continue
            cc = np.full(loss.shape[0], c)
            k, p, r, _ = power_law_fixed(ax.u_rows, loss, cc, w)
            kf, pf, _, _ = power_law_fixed(ax.u_rows, loss, cc, ax.fit.astype(np.float64))
            err = _held_out_kept(reps, extrapolation_error(ax.u_rows, loss, loss, cc, kf, pf,
                                                           ax.test.astype(np.float64)))
            row, notes = {"axis": a, "sigma": reps.level_label(level), "c": c, "marker": marker}, []
            set_fields(row, "rho", np.abs(r), reps.kind, notes, allow=allow, transform="fisher", total_upper=1.0)
            set_fields(row, "exponent", k, reps.kind, notes, allow=allow)
            set_fields(row, "extrapolation_error", err, reps.kind, notes, allow=allow, bounds=(0.0, math.inf))
            row["note"] = "; ".join(notes)
            rows.append(row)
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------------------------
# several architecture families in one study
# ----------------------------------------------------------------------------------------------------------------
FAMILY_DIFFERENCE_COLUMNS = (["family_a", "family_b", "quantity", "axis", "exponent_a", "exponent_b"]
                             + _ci_columns("difference") + ["verdict", "note"])


def model_families(df: pd.DataFrame) -> pd.Series:
    """Each row's architecture family ("edm2", "dit", …) from its `arch` column (models.sizes' table; an arch
    name the table does not know is its own group). No `arch` column: one group, POOLED."""
    if "arch" not in df.columns:
        return pd.Series(POOLED, index=df.index)
    return df["arch"].map(lambda a: FAMILY.get(a, a) if isinstance(a, str) else POOLED)


def pooled_fits(table: pd.DataFrame | None) -> pd.DataFrame | None:
    """The rows of a fit table over every model (drops the per-family rows of a multi-family study)."""
    if table is None or "group" not in table.columns:
        return table
    return table[table["group"] == POOLED].drop(columns="group").reset_index(drop=True)


def family_difference_table(by_family: dict, *, quantities=("raw", "minus_jstar", "excess"), axes=AXES,
                            level: int = 0) -> pd.DataFrame:
    """Exponent of family a minus family b for every pair, quantity and axis (total loss), with 95% intervals:
    paired on the shared replicates of the evaluation set, and, in the total, widened by leaving out each model of
    either family — the answer to "do the families differ in exponent, once J* is removed?"."""
    names = list(by_family)
    rows = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            ra, rb = by_family[a].reps, by_family[b].reps
            common = ra.kind != "jackknife"
            kinds = np.r_[ra.kind[common], ["jackknife"] * int((ra.kind == "jackknife").sum())]
            for ax in axes:
                for q in quantities:
                    fa, fb = by_family[a].fit(ax, q, level), by_family[b].fit(ax, q, level)
                    ea, eb = fa["exponent"], fb["exponent"]
                    row, notes = {"family_a": a, "family_b": b, "quantity": q, "axis": ax,
                                  "exponent_a": float(ea[0]), "exponent_b": float(eb[0])}, []
                    n = min(int(fa["n"][0]), int(fb["n"][0]))
                    allow = _allow(ra, n)
                    if ra.n_replicates > 0 and not allow:
                        notes.append(f"no interval: {n} points (< {MIN_POINTS_FOR_INTERVAL})")
                    values = np.r_[ea[common] - eb[rb.kind != "jackknife"], ea[ra.kind == "jackknife"] - eb[0]]
                    other = (ea[0] - eb[rb.kind == "jackknife"])[None, :]
                    set_fields(row, "difference", values, kinds, notes, allow=allow, extra_jackknife=(other,))
                    lo, hi = row["difference_ci_lo"], row["difference_ci_hi"]
                    row["verdict"] = ("no interval" if not (np.isfinite(lo) and np.isfinite(hi)) else
                                      "differ at 95%" if lo > 0 or hi < 0 else "no difference at 95%")
                    row["note"] = "; ".join(notes)
                    rows.append(row)
    return pd.DataFrame(rows, columns=FAMILY_DIFFERENCE_COLUMNS)
