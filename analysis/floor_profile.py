"""The floors the data support: the forecast error as a function of the floor, and the joint law's free floor per σ.

floor_profile.csv — for every level (the weighted total and each σ) and every floor c on a grid from 0 to just
below the smallest loss on the study's compute frontier (J* of that level among the values), the rolling-origin
forecast error (analysis.forecast's splits, rows and scoring) of two laws with that floor:

    power_law   L = c + A·C^k          fitted on the training sizes' compute frontier, scored on the held-out
                                        snapshots that extend it (points = frontier)
    joint       L = c + A/N^a + B/D^b   fitted on every training snapshot, scored on every held-out snapshot
                                        (points = all); the total only by default (see ``joint_levels``)

with both intervals (analysis.intervals), and the paired difference to the best c of the same law and level. A c is
*supported* when that difference's total 95% interval does not exclude 0 from above (it is not worse than the best
at 95%); the supported floors' range is the verdict ("the data support floors in [a, b]; J* lies inside / below /
above"). Subtracting any c between 0 and the loss often improves a forecast — curvature says there is a floor above
zero, not which one — so the range, not one comparison of L with L − J*, is what the data say about J*.

joint_floor.csv — per level, the joint law L(N, D) = E + A/N^a + B/D^b with a free floor fitted on every snapshot,
E with its intervals beside J* of the level: E is identified only when sizes and training lengths vary apart (a
size trained for several lengths, each run with its own learning-rate decay). At a single training length the
asymptote in N is E + B·D^−b, so E and B·D^−b cannot be told apart there.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from analysis.forecast import MIN_TRAIN_SIZES, _estimate_rows, jackknife_off, mean_over_splits, split_masks, splits
from analysis.intervals import intervals, set_fields
from analysis.joint_fits import FLOOR_AT_ZERO, joint_fit, joint_refit, joint_starts
from analysis.joint_law import joint_log_model, joint_scale
from analysis.power_laws import power_law_fixed, power_law_predict
from analysis.study_stats import IDENTICAL_JSTAR

JOINT_REPLICATES = 200       # the joint law's rows: the estimate, this many evaluation (and seed) replicates, the
                             # jackknife — its refits cost ~1,000× a power law's, and the total interval is the
                             # jackknife's (the evaluation noise is a small part of it)
JOINT_PROFILE_POINTS = 10
PROFILE_POINTS = 20          # floors c = ymin·j/20, j = 0 … 19, plus J*
PROFILE_LAWS = {"power_law": "L = c + A·C^k", "joint": "L = c + A/N^a + B/D^b"}
LAW_POINTS = {"power_law": "frontier", "joint": "all"}
PROFILE_COLUMNS = (["law", "sigma", "c", "is_jstar", "c_over_ymin", "n_points", "error", "error_ci_lo", "error_ci_hi",
                    "error_eval_ci_lo", "error_eval_ci_hi", "difference", "difference_ci_lo", "difference_ci_hi",
                    "supported", "note"])
JOINT_FLOOR_COLUMNS = (["sigma", "jstar", "E", "E_ci_lo", "E_ci_hi", "E_eval_ci_lo", "E_eval_ci_hi", "E_at_bound",
                        "jstar_in_ci", "smallest_loss", "largest_over_jstar", "n", "n_lengths", "note"])


def floor_grid(ymin: float, jstar: float, num: int = PROFILE_POINTS):
    """(c [C], is_jstar [C]): c = ymin·j/num for j = 0 … num − 1 (0 to just below the smallest loss), with J*
    inserted where it lies below ymin."""
    cs = ymin * np.arange(num) / num
    is_js = np.zeros(num, dtype=bool)
    if 0 <= jstar < ymin and not np.isclose(cs, jstar, rtol=0, atol=1e-15 * max(ymin, 1e-300)).any():
        j = int(np.searchsorted(cs, jstar))
        cs, is_js = np.insert(cs, j, jstar), np.insert(is_js, j, True)
    elif 0 <= jstar < ymin:
        is_js[np.argmin(np.abs(cs - jstar))] = True
    return cs, is_js


class FloorBacktest:
    """The rolling-origin splits of a study with their masks on every row, shared by every floor and level."""

    def __init__(self, reps):
        self.reps = reps
        snaps = reps.snapshots
        self.u = np.log(snaps["flops"].to_numpy(np.float64))
        self.params = snaps["params"].to_numpy(np.float64)
        self.images = snaps["images_seen"].to_numpy(np.float64)
        self.scale = joint_scale(self.params, self.images)
        self.n, self.d = np.log(self.params / self.scale[0]), np.log(self.images / self.scale[1])
        self.splits = splits(snaps)
        self.masks = [split_masks(reps, train, test) for _, train, test in self.splits]
        self.off = [jackknife_off(reps, train, k) for k, train, _ in self.splits]
        self.block_estimate = _estimate_rows(np.asarray(reps.kind))     # each row's own study's estimate row

    def n_points(self, law: str) -> int:
        """The held-out points a law's mean error rests on (the estimate row, all splits)."""
        i = 3 if law == "power_law" else 1
        return int(sum(m[i][0].sum() for m in self.masks))

    def errors(self, law: str, level: int, c: np.ndarray) -> np.ndarray:
        """[rows] the mean over the splits of mean |ln L̂ − ln L| of the law with floor c [rows] at one level; a
        jackknife row a split does not use keeps its study's estimate (as analysis.forecast)."""
        y = self.reps.loss[:, :, level]
        per_split = []
        for (in_train, in_test, train_front, on_front), off in zip(self.masks, self.off):
            if law == "power_law":
                pred, scored = self._power_law(y, c, train_front), on_front
            else:
                pred, scored = self._joint(y, c, in_train), in_test
            with np.errstate(invalid="ignore", divide="ignore"):
                err = np.where(scored, np.abs(np.log(pred) - np.log(y)), 0.0).sum(1) / scored.sum(1)
            per_split.append(np.where((scored.sum(1) > 0) & ~off, err, np.nan))
        return mean_over_splits(np.stack(per_split), self.reps, self.splits)

    def _power_law(self, y, c, front):
        u = np.broadcast_to(self.u, y.shape)
        k, p, _, _ = power_law_fixed(u, y, c, front.astype(np.float64))
        return power_law_predict(u, c, k, p)

    def _joint(self, y, c, in_train):
        """L̂ [rows, S] of L = c + A/N^a + B/D^b fitted on each row's training snapshots: each study's estimate row
        from a grid of starts, its other rows refitted from it at once."""
        w = in_train.astype(np.float64)
        logl = np.log(np.where(in_train, y, np.nan))
        with np.errstate(divide="ignore"):
            log_floor = np.log(c)
        theta = np.empty((len(y), 4))
        for start in np.unique(self.block_estimate):
            rows = np.flatnonzero(self.block_estimate == start)
            used = in_train[start]
            theta0, _ = joint_fit(self.n, self.d, logl[start], log_floor=log_floor[start], weights=w[start],
                                  starts=joint_starts(logl[start][used], False), max_starts=16, polish=1)
            theta[start] = theta0
            rest = rows[1:]
            if rest.size:
                theta[rest] = joint_refit(theta0, self.n, self.d, logl[rest], log_floor=log_floor[rest],
                                          weights=w[rest])
        return np.exp(joint_log_model(theta, self.n, self.d, log_floor))


def fewer_replicates(reps, n: int = JOINT_REPLICATES):
    """The same study with at most ``n`` evaluation and ``n`` seed replicates (the first ones), every estimate and
    jackknife row kept."""
    kind = np.asarray(reps.kind)
    keep = np.ones(len(kind), dtype=bool)
    for k in ("evaluation", "seed"):
        idx = np.flatnonzero(kind == k)
        keep[idx[n:]] = False
    if keep.all():
        return reps
    from analysis.resample import StudyReplicates
    return StudyReplicates(reps.snapshots, reps.sigma, reps.loss[keep], reps.jstar[keep], reps.excess[keep],
                           kind[keep], np.asarray(reps.left_out)[keep])


def level_floor_grid(reps, level: int, num: int = PROFILE_POINTS):
    """The floors of one level: (c [C], is_jstar [C], ymin) — ymin the smallest loss of the level on the study's
    compute frontier (the estimate row), J* the level's."""
    from analysis.frontier import frontier_mask
    flops = reps.snapshots["flops"].to_numpy(np.float64)
    front = frontier_mask(flops, reps.loss[:1, :, 0])[0]
    ymin = float(np.min(reps.loss[0, front, level]))
    ymin = min(ymin, float(np.nanmin(reps.loss[0, :, level])))      # the joint law sees every snapshot
    js = float(np.nanmean(reps.jstar[0, :, level]))
    cs, is_js = floor_grid(ymin, js, num)
    return cs, is_js, ymin


def profile_level(bt: FloorBacktest, law: str, level: int, cs: np.ndarray) -> np.ndarray:
    """[C, rows] the mean forecast error of every floor c (the same c on every row)."""
    rows = len(bt.reps.kind)
    return np.stack([bt.errors(law, level, np.full(rows, c)) for c in cs])


def supported_matrix(errors: np.ndarray, kinds) -> tuple[np.ndarray, np.ndarray]:
    """For B studies stacked block after block (``errors`` [C, B·n], each block laid out as ``kinds`` [n]): (the
    best floor's index [B], supported [C, B]) — c is supported when the total 95% interval of err(c) − err(best) does
    not lie above 0. Vectorised over studies (the simulator's coverage tests)."""
    c, total = errors.shape
    n = len(kinds)
    e = errors.reshape(c, total // n, n)
    best = np.nanargmin(np.where(np.isfinite(e[:, :, 0]), e[:, :, 0], np.inf), axis=0)     # [B]
    diff = e - e[best, np.arange(e.shape[1])][None]                                         # [C, B, n]
    supported = np.zeros((c, e.shape[1]), dtype=bool)
    for j in range(c):
        lo = intervals(diff[j], kinds)["lo"]
        supported[j] = (j == best) | (np.isfinite(lo) & (lo <= 0))
    return best, supported


def supported_floors(errors: np.ndarray, kinds, *, allow=True):
    """The best floor and the supported ones of one profile ``errors`` [C, rows]: (best index, the paired difference
    intervals to the best [C] dicts, supported [C] bool — not worse than the best at 95%, total interval)."""
    best = int(np.nanargmin(errors[:, 0]))
    rows, supported = [], np.zeros(len(errors), dtype=bool)
    for j in range(len(errors)):
        row, notes = {}, []
        set_fields(row, "difference", errors[j] - errors[best], kinds, notes, allow=allow)
        row["note"] = "; ".join(notes)
        lo = row["difference_ci_lo"]
        supported[j] = j == best or (np.isfinite(lo) and lo <= 0)
        rows.append(row)
    return best, rows, supported


def floor_profile_table(study, *, joint_levels=(0,), num: int = PROFILE_POINTS) -> pd.DataFrame:
    """floor_profile.csv for every level (the power law) and ``joint_levels`` (the joint law): one row per
    (law, level, c)."""
    reps = study.reps
    if not splits(reps.snapshots):
        return pd.DataFrame(columns=PROFILE_COLUMNS)
    allow = reps.n_replicates > 0
    out = []
    for law in PROFILE_LAWS:
        levels = range(reps.loss.shape[2]) if law == "power_law" else joint_levels
        if law == "joint":
            reps = fewer_replicates(reps)
        bt = FloorBacktest(reps)
        for level in levels:
            cs, is_js, ymin = level_floor_grid(reps, level, num if law == "power_law" else JOINT_PROFILE_POINTS)
            errors = profile_level(bt, law, level, cs)
            if not np.isfinite(errors[:, 0]).any():
                continue
            _, diffs, supported = supported_floors(errors, reps.kind, allow=allow)
            for j, c in enumerate(cs):
                row, notes = {"law": law, "sigma": reps.level_label(level), "c": float(c), "is_jstar": bool(is_js[j]),
                              "c_over_ymin": float(c / ymin) if ymin > 0 else math.nan,
                              "n_points": bt.n_points(law)}, []
                set_fields(row, "error", errors[j], reps.kind, notes, allow=allow, bounds=(0.0, math.inf))
                row.update({k: diffs[j][k] for k in ("difference", "difference_ci_lo", "difference_ci_hi")})
                row["supported"] = bool(supported[j]) if allow else math.nan
                row["note"] = "; ".join(n for n in notes + [diffs[j]["note"]] if n)
                out.append(row)
    return pd.DataFrame(out, columns=PROFILE_COLUMNS)


def supported_range(profile: pd.DataFrame, law: str, level_sigma) -> dict | None:
    """The supported floors of one (law, level) of floor_profile.csv: {lo, hi, best, jstar, where ("inside",
    "below", "above", "no interval"), contiguous, n_points}; None without a profile."""
    sel = profile[(profile["law"] == law) & (profile["sigma"].isna() if not np.isfinite(level_sigma)
                                             else np.isclose(profile["sigma"], level_sigma))]
    if sel.empty:
        return None
    best = sel.loc[sel["error"].idxmin()]
    js = sel[sel["is_jstar"]]
    jstar = float(js["c"].iloc[0]) if not js.empty else math.nan
    sup = sel[sel["supported"] == True]  # noqa: E712  (NaN = no interval)
    if sup.empty or sel["supported"].isna().all():
        return {"lo": math.nan, "hi": math.nan, "best": float(best["c"]), "jstar": jstar, "where": "no interval",
                "contiguous": False, "n_points": int(best["n_points"])}
    lo, hi = float(sup["c"].min()), float(sup["c"].max())
    where = ("inside" if lo <= jstar <= hi else "below" if jstar < lo else "above") if np.isfinite(jstar) else "—"
    flags = sel.sort_values("c")["supported"].to_numpy(dtype=bool)
    idx = np.flatnonzero(flags)
    return {"lo": lo, "hi": hi, "best": float(best["c"]), "jstar": jstar, "where": where,
            "contiguous": bool(idx[-1] - idx[0] + 1 == idx.size), "n_points": int(best["n_points"])}


# ----------------------------------------------------------------------------------------------------------------
# the joint law's free floor per σ
# ----------------------------------------------------------------------------------------------------------------
def joint_free_floor_rows(reps, level: int) -> tuple[np.ndarray, float]:
    """[rows] E of L = E + A/N^a + B/D^b (free floor, every snapshot) fitted on every row at one level, and the
    root-mean-square log residual of the estimate."""
    snaps = reps.snapshots
    params, images = snaps["params"].to_numpy(np.float64), snaps["images_seen"].to_numpy(np.float64)
    scale = joint_scale(params, images)
    n, d = np.log(params / scale[0]), np.log(images / scale[1])
    y = reps.loss[:, :, level]
    w = (reps.available & (y > 0)).astype(np.float64)
    logl = np.log(np.where(w > 0, y, np.nan))
    theta, f = joint_fit(n, d, logl[0], weights=w[0])
    th = np.empty((len(y), 5))
    th[0] = theta
    if len(y) > 1:
        js = np.nanmean(reps.jstar[1:, :, level], axis=1)
        th[1:] = joint_refit(theta, n, d, logl[1:], weights=w[1:],
                             floor_start=np.log(np.maximum(js, 1e-3 * np.nanmin(y[1:], axis=1))))
    return np.exp(th[:, 4]), math.sqrt(f / max(w[0].sum(), 1))


def joint_floor_table(reps) -> pd.DataFrame:
    """joint_floor.csv: per level, the joint law's free floor E with its intervals (clipped to the feasible
    [0, smallest loss of its fit], a clipped end noted) beside J*, and whether J* lies inside the total interval."""
    snaps = reps.snapshots
    n_lengths = int(snaps.groupby("params")["model"].nunique().max()) if len(snaps) else 0
    from analysis.compute_optimal import identified
    if not identified(reps):
        return pd.DataFrame(columns=JOINT_FLOOR_COLUMNS)
    reps = fewer_replicates(reps)
    allow = reps.n_replicates > 0
    out = []
    for level in range(reps.loss.shape[2]):
        y0 = reps.loss[0, :, level]
        ymin = float(np.nanmin(y0))
        js = float(np.nanmean(reps.jstar[0, :, level]))
        final = snaps["params"].to_numpy() == snaps["params"].max()
        largest = float(np.nanmin(y0[final]))
        row, notes = {"sigma": reps.level_label(level), "jstar": js, "smallest_loss": ymin,
                      "largest_over_jstar": largest / js if js > 0 else math.inf, "n": int(np.isfinite(y0).sum()),
                      "n_lengths": n_lengths}, []
        e, _ = joint_free_floor_rows(reps, level)
        # feasible: 0 … the smallest loss of the fit (or the estimate, where least squares put it a little above)
        set_fields(row, "E", e, reps.kind, notes, allow=allow, bounds=(0.0, max(ymin, float(e[0]))),
                   mark_clipped=True)
        row["E_at_bound"] = bool(row["E"] <= FLOOR_AT_ZERO * ymin)
        if row["E_at_bound"]:
            notes.append("E at its bound 0: the data drive the floor to zero")
        if n_lengths < 2:
            notes.append("one training length per size: E and B·D^−b are not told apart")
        lo, hi = row["E_ci_lo"], row["E_ci_hi"]
        tol = IDENTICAL_JSTAR * ymin      # J* ≈ 0 and E at 0 are the same floor
        row["jstar_in_ci"] = bool(lo - tol <= js <= hi + tol) if np.isfinite(lo) and np.isfinite(hi) else math.nan
        row["note"] = "; ".join(notes)
        out.append(row)
    return pd.DataFrame(out, columns=JOINT_FLOOR_COLUMNS)


# ----------------------------------------------------------------------------------------------------------------
# exponents.md's opening
# ----------------------------------------------------------------------------------------------------------------
def _f(v, spec=".4g") -> str:
    return "—" if v is None or not np.isfinite(v) else format(v, spec)


def range_sentence(rng: dict, law: str, what: str) -> str:
    """"the data support floors in [a, b]; J* = … lies inside / below / above" for one (law, level)."""
    pts = f"{rng['n_points']} held-out points"
    if rng["where"] == "no interval":
        return (f"{what}, {PROFILE_LAWS[law]} ({pts}): no interval; the best floor is c = {_f(rng['best'])}, "
                f"J* = {_f(rng['jstar'])}.")
    gaps = "" if rng["contiguous"] else " (not one interval: some floors inside are worse)"
    return (f"{what}, {PROFILE_LAWS[law]} ({pts}): the data support floors in [{_f(rng['lo'])}, {_f(rng['hi'])}]"
            f"{gaps}; J* = {_f(rng['jstar'])} lies {rng['where']} (best c = {_f(rng['best'])}).")


def floor_markdown(profile: pd.DataFrame, joint: pd.DataFrame | None = None) -> list[str]:
    """The lines exponents.md opens with: the supported floors in total (both laws) and per σ (the power law), and
    the joint law's free floor per σ beside J*."""
    has_joint = joint is not None and not joint.empty
    if (profile is None or profile.empty) and not has_joint:
        return []
    parts = ["## The floors the data support", ""]
    if profile is None or profile.empty:
        profile = pd.DataFrame(columns=PROFILE_COLUMNS)
        parts += [f"No floor profile: a rolling-origin forecast needs ≥ {MIN_TRAIN_SIZES + 1} model sizes.", ""]
    for law in PROFILE_LAWS:
        rng = supported_range(profile, law, math.nan)
        if rng is not None:
            parts.append("- " + range_sentence(rng, law, "Total loss"))
    if not profile.empty:
        parts += ["", "A floor c is supported when its rolling-origin forecast error is not worse than the best c's at "
                  "95% (paired, total interval); c runs from 0 to just below the smallest loss, J* among the values "
                  f"(floor_profile.csv; the joint law on {JOINT_REPLICATES} evaluation replicates and "
                  f"{JOINT_PROFILE_POINTS} floors). Any floor between 0 and the loss can forecast better than none: "
                  "curvature shows a floor above zero, and only the range says whether J* is the one.", ""]
    rows = []
    for sigma in sorted(profile.loc[profile["law"] == "power_law", "sigma"].dropna().unique()):
        r = supported_range(profile, "power_law", sigma)
        rows.append([_f(sigma), _f(r["jstar"]), f"[{_f(r['lo'])}, {_f(r['hi'])}]", r["where"], _f(r["best"]),
                     str(r["n_points"])])
    if rows:
        parts += ["Per σ, L = c + A·C^k on the frontier snapshots:", "",
                  "| σ | J* | supported floors | J* lies | best c | held-out points |", "|---|---|---|---|---|---|"]
        parts += ["| " + " | ".join(r) + " |" for r in rows] + [""]
    if joint is not None and not joint.empty:
        parts += ["The joint law L(N, D) = E + A/N^a + B/D^b with a free floor, every snapshot (joint_floor.csv; E "
                  "is identified only where sizes are trained for several lengths):", "",
                  "| σ | J* | E | J* inside | largest model / J* | note |", "|---|---|---|---|---|---|"]
        for _, r in joint.iterrows():
            e = ("at bound (0)" if r["E_at_bound"] else
                 f"{_f(r['E'])} [{_f(r['E_ci_lo'])}, {_f(r['E_ci_hi'])}]" if np.isfinite(r["E_ci_lo"])
                 else _f(r["E"]))
            inside = {True: "yes", False: "no"}.get(r["jstar_in_ci"], "—")
            parts.append(f"| {'total' if not np.isfinite(r['sigma']) else _f(r['sigma'])} | {_f(r['jstar'])} | {e} | "
                         f"{inside} | {_f(r['largest_over_jstar'], '.3g')} | {r['note']} |")
        parts.append("")
    return parts
