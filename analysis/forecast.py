"""The verdict by forecasting: which law predicts the next, larger model best — and so, which floor.

Rolling-origin backtests. Model sizes are ordered by parameters; split k fits every law on the k smallest sizes
(all their snapshots) and predicts every snapshot of size k + 1, for k = 3 … M − 1 (the free-floor law needs three
sizes). Six laws are compared on the same splits and the same rows (analysis.resample), so their differences are
paired:

    pure_L              L = A·C^k                       power law in L against compute C
    L_minus_jstar       L = J* + A·C^k                  power law in L − J*
    free_offset         L = c + A·C^k                   the offset fitted
    joint_floor_jstar   L = J* + A/N^a + B/D^b          the joint law in parameters N and images D, floor J*
    joint_floor_free    L = E + A/N^a + B/D^b           floor fitted
    joint_floor_0       L = A/N^a + B/D^b               no floor

The three laws in C describe the compute frontier (the lowest loss reachable with compute C): they are fitted on the
training sizes' frontier and can only forecast the held-out snapshots that extend it. So every law is scored on the
held-out snapshots on the frontier of the training sizes plus the held-out one (`points` = frontier), and the joint
laws, which predict any (N, D), also on every held-out snapshot (`points` = all). Error: the mean over the scored
points of |ln L̂ − ln L| (≈ the relative error); a law's overall error is the mean over the splits.

Intervals (analysis.intervals): evaluation noise only, and the total — which adds what leaving each model out of the
training sizes moves (the held-out sizes are the backtest's fixed test cases). The verdict names the law with the
smallest overall error and the laws it beats at 95% (paired, total interval); a law not beaten is "no difference at
95%".

Beside it, an information criterion of each law fitted on all the data (the 1-D laws on the study's frontier, the
joint laws on every snapshot) with an error model fitted to the misfit itself — log residuals = a model effect
(shared by a model's snapshots) + a snapshot effect, both Gaussian, their variances by maximum likelihood — not to
the evaluation noise, which is far smaller than the misfit: AICc, compared within each data set.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd

from analysis.compute_optimal import identified
from analysis.frontier import frontier_mask
from analysis.intervals import set_fields
from analysis.joint_fits import joint_rows, joint_starts
from analysis.joint_law import joint_log_model
from analysis.power_laws import power_law_fixed, power_law_free, power_law_predict
from analysis.study_stats import frontier_candidates

LAWS = ("pure_L", "L_minus_jstar", "free_offset", "joint_floor_jstar", "joint_floor_free", "joint_floor_0")
ONE_D = LAWS[:3]
JOINT = LAWS[3:]
LAW_LABELS = {"pure_L": "L = A·C^k", "L_minus_jstar": "L = J* + A·C^k", "free_offset": "L = c + A·C^k",
              "joint_floor_jstar": "L = J* + A/N^a + B/D^b", "joint_floor_free": "L = E + A/N^a + B/D^b",
              "joint_floor_0": "L = A/N^a + B/D^b"}
LAW_PARAMETERS = {"pure_L": 2, "L_minus_jstar": 2, "free_offset": 3, "joint_floor_jstar": 4, "joint_floor_free": 5,
                  "joint_floor_0": 4}
JOINT_FLOOR = {"joint_floor_jstar": "jstar", "joint_floor_free": "free", "joint_floor_0": "zero"}
MIN_TRAIN_SIZES = 3
_SPLIT_STARTS = 16   # a split's joint law: the study-wide fit and the grid starts with the lowest initial objective
POINTS = ("frontier", "all")
FORECAST_COLUMNS = ["law", "split", "held_out_model", "points", "n_points", "error", "error_ci_lo", "error_ci_hi",
                    "error_eval_ci_lo", "error_eval_ci_hi", "note"]
PAIR_COLUMNS = ["law_a", "law_b", "points", "n_points", "difference", "difference_ci_lo", "difference_ci_hi",
                "difference_eval_ci_lo", "difference_eval_ci_hi", "verdict"]
IC_COLUMNS = ["law", "data", "n", "n_parameters", "rms_log_residual", "sd_model", "sd_snapshot",
              "log_likelihood", "aicc", "delta_aicc"]
POINT_COLUMNS = ["law", "split", "held_out_model", "params", "images_seen", "flops", "actual", "predicted",
                 "frontier"]


def sizes_by_params(snapshots: pd.DataFrame) -> list:
    """The model sizes from smallest to largest."""
    return list(snapshots.groupby("model", sort=False)["params"].first().sort_values(kind="stable").index)


def splits(snapshots: pd.DataFrame) -> list[tuple[int, list, str]]:
    """(k, training runs, held-out run) of every rolling-origin split: split k trains on the runs of the k smallest
    parameter counts and holds out those of the next. Runs of one size trained for different lengths (a floor
    study) are held out together, as "a+b"; with one run per size the held-out run is its name."""
    runs = snapshots.groupby("model", sort=False)["params"].first()
    order = sizes_by_params(snapshots)
    counts = sorted(runs.unique())
    of = [[m for m in order if runs[m] == c] for c in counts]
    held = [g[0] if len(g) == 1 else "+".join(map(str, g)) for g in of]
    return [(k, [m for group in of[:k] for m in group], held[k]) for k in range(MIN_TRAIN_SIZES, len(of))]


def held_out_runs(test) -> list:
    """The runs a split's held-out name stands for (several runs of one size are joined by "+")."""
    return test.split("+") if isinstance(test, str) and "+" in test else [test]


def split_masks(reps, train, test, frontier: str = "all"):
    """[rows, S] masks of one split: (training snapshots, held-out snapshots, the training sizes' frontier, the
    held-out snapshots on the frontier of training and held-out sizes together), the frontier chosen on each row's
    total loss."""
    snaps = reps.snapshots
    model = snaps["model"].to_numpy()
    flops = snaps["flops"].to_numpy(np.float64)
    total = frontier_candidates(reps, frontier)
    in_train = np.isin(model, train)[None, :] & reps.available
    in_test = np.isin(model, held_out_runs(test))[None, :] & reps.available
    with np.errstate(invalid="ignore"):
        both = frontier_mask(flops, np.where(in_train | in_test, total, np.nan))
        train_front = frontier_mask(flops, np.where(in_train, total, np.nan))
    return in_train, in_test, train_front, both & in_test


def jackknife_off(reps, train, k) -> np.ndarray:
    """[rows] the jackknife rows a split does not use: a split's jackknife leaves out its training sizes only (not
    its held-out size, nor a size it does not use), and a split with MIN_TRAIN_SIZES of them has no law left
    without one."""
    jack = reps.kind == "jackknife"
    return jack & (~np.isin(reps.left_out, train) | (k <= MIN_TRAIN_SIZES))


class Backtest:
    """Every law's forecast of every split on every row of a study (``run``), with the predictions of the
    estimate row kept for the figure."""

    def __init__(self, study):
        self.study = study
        reps = study.reps
        snaps = reps.snapshots
        self.snaps = snaps
        self.kind, self.left_out = reps.kind, reps.left_out
        self.total = reps.loss[:, :, 0]
        self.js = np.nanmean(reps.jstar[:, :, 0], axis=1)
        self.available = reps.available
        self.flops = snaps["flops"].to_numpy(np.float64)
        self.params = snaps["params"].to_numpy(np.float64)
        self.images = snaps["images_seen"].to_numpy(np.float64)
        self.splits = splits(snaps)
        self.errors = {}            # (law, points, split index) → [rows]
        self.n_points = {}          # (law, points, split index) → points scored in the estimate row
        self.predictions = []       # rows of forecast_points.csv (estimate row)
        for j, (k, train, test) in enumerate(self.splits):
            self._split(j, train, test)

    def _split(self, j, train, test):
        in_train, in_test, train_front, on_front = split_masks(self.study.reps, train, test,
                                                               getattr(self.study, "frontier", "all"))
        scored = {"frontier": on_front, "all": in_test}
        off = jackknife_off(self.study.reps, train, self.splits[j][0])
        preds = {law: self._one_d(law, train_front) for law in ONE_D}
        preds.update({law: self._joint(law, in_train) for law in JOINT})
        with np.errstate(invalid="ignore", divide="ignore"):
            log_actual = np.log(self.total)
            for law, pred in preds.items():
                for points in (("frontier",) if law in ONE_D else POINTS):
                    w = scored[points]
                    err = np.where(w, np.abs(np.log(pred) - log_actual), 0.0).sum(1) / w.sum(1)
                    self.errors[(law, points, j)] = np.where((w.sum(1) > 0) & ~off, err, np.nan)
                    self.n_points[(law, points, j)] = int(w[0].sum())
                for s in np.flatnonzero(in_test[0]):
                    self.predictions.append({"law": law, "split": j + 1, "held_out_model": test,
                                             "params": self.params[s], "images_seen": int(self.images[s]),
                                             "flops": self.flops[s], "actual": self.total[0, s],
                                             "predicted": pred[0, s], "frontier": bool(scored["frontier"][0, s])})

    def _one_d(self, law, front):
        """L̂ [rows, S] of a law in compute fitted on each row's training frontier."""
        u = np.broadcast_to(np.log(self.flops), front.shape)
        w = front.astype(np.float64)
        if law == "free_offset":
            k, p, c, _ = power_law_free(u, self.total, w)
        else:
            c = self.js if law == "L_minus_jstar" else np.zeros(len(self.js))
            k, p, _, _ = power_law_fixed(u, self.total, c, w)
        return power_law_predict(u, c, k, p)

    def _joint(self, law, in_train):
        """L̂ [rows, S] of a joint law fitted on each row's training snapshots (the estimate row from the study-wide
        fit and the most promising starts of the grid, the others refitted from it)."""
        floor = JOINT_FLOOR[law]
        whole = self.study.joint(floor)
        w = in_train.astype(np.float64)
        logl = np.log(np.where(in_train, self.total, np.nan))
        log_floor = {"jstar": np.log(self.js), "zero": np.full(len(self.js), -math.inf), "free": None}[floor]
        starts = joint_starts(logl[0][in_train[0]], log_floor is None)
        own = whole.theta[0] if np.isfinite(whole.theta[0]).all() else None
        if own is not None:
            starts = np.vstack([own[None, :], starts])
        theta, _ = joint_rows(whole.n, whole.d, logl, w, log_floor, starts=starts,
                              floor_start=np.log(self.js), max_starts=_SPLIT_STARTS, polish=1)
        return np.exp(joint_log_model(theta, whole.n, whole.d, log_floor))

    def mean_error(self, law, points) -> np.ndarray:
        """[rows] the law's error averaged over the splits (``mean_over_splits``)."""
        e = np.stack([self.errors[(law, points, j)] for j in range(len(self.splits))])     # [splits, rows]
        return mean_over_splits(e, self.study.reps, self.splits)


def mean_over_splits(e: np.ndarray, reps, study_splits) -> np.ndarray:
    """[rows] the mean over the splits of per-split errors e [splits, rows]. A jackknife row leaves one model out:
    a split that trains on it refits without it; a split that does not use it, or would be left with too few
    training sizes, keeps its study's estimate; and a split that holds it out is dropped from that row's mean.
    The held-out models are the backtest's few test cases and their seeds move every law's error at once: without
    the last rule the intervals of the mean (and of differences between laws) miss that, and on simulated studies
    with seed noise as the default study's they covered about half the time."""
    kind = np.asarray(reps.kind)
    jack = (kind == "jackknife")[None, :]
    e = np.where(jack & ~np.isfinite(e), e[:, _estimate_rows(kind)], e)
    held = np.stack([jack[0] & np.isin(reps.left_out, held_out_runs(test)) for _, _, test in study_splits])
    e = np.where(held, np.nan, e)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(e, axis=0)


def _estimate_rows(kind) -> np.ndarray:
    """[rows] each row's own study's estimate row (several simulated studies may be stacked block after block)."""
    starts = np.flatnonzero(kind == "estimate")
    block = len(kind) if len(starts) <= 1 else int(starts[1] - starts[0])
    return np.arange(len(kind)) // block * block


def forecast_tables(study) -> dict:
    """forecast.csv (per law, split and scored points, and each law's mean over the splits: `split` = mean),
    forecast_pairs.csv (paired differences of the mean errors), forecast_points.csv (the estimate's predictions)
    and information.csv; plus the verdict sentences ("verdict") for exponents.md."""
    reps = study.reps
    allow = reps.n_replicates > 0
    if not splits(reps.snapshots):
        note = f"needs ≥ {MIN_TRAIN_SIZES + 1} model sizes"
        return {"forecast.csv": pd.DataFrame([{"law": law, "note": note} for law in LAWS], columns=FORECAST_COLUMNS),
                "forecast_pairs.csv": pd.DataFrame(columns=PAIR_COLUMNS),
                "forecast_points.csv": pd.DataFrame(columns=POINT_COLUMNS),
                "information.csv": information_table(study), "verdict": [f"No forecast: {note}."]}
    bt = Backtest(study)
    rows = []
    for law in LAWS:
        for points in (("frontier",) if law in ONE_D else POINTS):
            for j, (k, _, test) in enumerate(bt.splits):
                row, notes = {"law": law, "split": str(j + 1), "held_out_model": test, "points": points,
                              "n_points": bt.n_points[(law, points, j)]}, []
                set_fields(row, "error", bt.errors[(law, points, j)], reps.kind, notes, allow=allow,
                           bounds=(0.0, math.inf))
                row["note"] = "; ".join(notes)
                rows.append(row)
            row, notes = {"law": law, "split": "mean", "held_out_model": "", "points": points,
                          "n_points": sum(bt.n_points[(law, points, j)] for j in range(len(bt.splits)))}, []
            set_fields(row, "error", bt.mean_error(law, points), reps.kind, notes, allow=allow, bounds=(0.0, math.inf))
            row["note"] = "; ".join(notes)
            rows.append(row)
    table = pd.DataFrame(rows, columns=FORECAST_COLUMNS)
    pairs = []
    for points, laws in (("frontier", LAWS), ("all", JOINT)):
        for i, a in enumerate(laws):
            for b in laws[i + 1:]:
                row, notes = {"law_a": a, "law_b": b, "points": points,
                              "n_points": sum(bt.n_points[(a, points, j)] for j in range(len(bt.splits)))}, []
                set_fields(row, "difference", bt.mean_error(a, points) - bt.mean_error(b, points), reps.kind, notes,
                           allow=allow)
                lo, hi = row["difference_ci_lo"], row["difference_ci_hi"]
                row["verdict"] = ("no interval" if not (np.isfinite(lo) and np.isfinite(hi)) else
                                  f"{a} better" if hi < 0 else f"{b} better" if lo > 0 else "no difference at 95%")
                pairs.append(row)
    pairs = pd.DataFrame(pairs, columns=PAIR_COLUMNS)
    return {"forecast.csv": table, "forecast_pairs.csv": pairs,
            "forecast_points.csv": pd.DataFrame(bt.predictions, columns=POINT_COLUMNS),
            "information.csv": information_table(study), "verdict": verdict_sentences(table, pairs)}


def best_law(table: pd.DataFrame, pairs: pd.DataFrame, points: str, laws) -> tuple[str, list, list]:
    """(the law with the smallest mean error, the laws it beats at 95%, the laws it does not)."""
    mean = table[(table["split"] == "mean") & (table["points"] == points) & table["law"].isin(laws)]
    mean = mean[np.isfinite(mean["error"])]
    if mean.empty:
        return "", [], []
    # laws whose errors agree to rounding (a free floor fitted to 0 is the law without one) go to the simpler
    tied = mean[mean["error"] <= mean["error"].min() * (1 + 1e-6)]
    best = min(tied["law"], key=lambda law: (LAW_PARAMETERS[law], LAWS.index(law)))
    beaten, tied = [], []
    for law in mean["law"]:
        if law == best:
            continue
        p = pairs[(pairs["points"] == points) & (((pairs["law_a"] == best) & (pairs["law_b"] == law))
                                                 | ((pairs["law_a"] == law) & (pairs["law_b"] == best)))]
        (beaten if not p.empty and p["verdict"].iloc[0] == f"{best} better" else tied).append(law)
    return best, beaten, tied


def verdict_sentences(table: pd.DataFrame, pairs: pd.DataFrame) -> list[str]:
    """The forecast verdict, one sentence per scored point set."""
    out = []
    for points, laws, what in (("frontier", LAWS, "the held-out sizes' frontier snapshots, all six laws"),
                               ("all", JOINT, "every held-out snapshot, the joint laws")):
        best, beaten, tied = best_law(table, pairs, points, laws)
        if not best:
            continue
        err = table[(table["split"] == "mean") & (table["points"] == points) & (table["law"] == best)].iloc[0]
        ci = (f" [{err['error_ci_lo']:.3g}, {err['error_ci_hi']:.3g}]" if np.isfinite(err["error_ci_lo"]) else "")
        n = int(err["n_points"]) if np.isfinite(err["n_points"]) else 0
        n_splits = int(((table["law"] == best) & (table["points"] == points) & (table["split"] != "mean")).sum())
        s = (f"On {what} ({n} held-out points in {n_splits} splits): {best} ({LAW_LABELS[best]}) forecasts best, "
             f"mean error {err['error']:.3g}{ci}")
        if not tied:
            s += "; every other law's error is larger at 95%."
        else:
            s += (f"; no difference at 95% from {', '.join(tied)}"
                  + (f", better than {', '.join(beaten)}." if beaten else "."))
        out.append(s)
    return out


# ----------------------------------------------------------------------------------------------------------------
# information criterion with an error model of the misfit
# ----------------------------------------------------------------------------------------------------------------
def misfit_likelihood(residuals: np.ndarray, groups: np.ndarray) -> dict:
    """Maximum likelihood of residuals r = u_g + e: a Gaussian effect u per group (sd_model) and an independent
    Gaussian e per point (sd_snapshot). For a ratio ρ = τ²/s² the variance s² has a closed form, so the likelihood
    is profiled over ρ ≥ 0 (a group of n points: |V| = 1 + ρn, rᵀV⁻¹r = Σr² − ρ/(1 + ρn)·(Σr)²)."""
    r = np.asarray(residuals, dtype=np.float64)
    _, g = np.unique(groups, return_inverse=True)
    n_g = np.bincount(g).astype(np.float64)
    s_g = np.bincount(g, weights=r)
    ss = float(r @ r)
    n = r.size

    def neg_loglik(rho):
        q = ss - float(np.sum(rho / (1 + rho * n_g) * s_g ** 2))
        s2 = max(q / n, 1e-300)
        return 0.5 * (n * math.log(2 * math.pi * s2) + float(np.sum(np.log1p(rho * n_g))) + n), s2

    # ρ on a grid in log ρ (plus ρ = 0), refined twice around the best: the same optimum on every machine
    grid = np.r_[-np.inf, np.linspace(-12.0, 12.0, 97)]
    for _ in range(3):
        values = [neg_loglik(math.exp(t))[0] for t in grid]
        j = int(np.argmin(values))
        if not np.isfinite(grid[j]):
            break
        step = grid[2] - grid[1]
        grid = np.linspace(grid[j] - step, grid[j] + step, 41)
    best_rho = math.exp(grid[j])
    best, s2 = neg_loglik(best_rho)
    return {"log_likelihood": -best, "sd_snapshot": math.sqrt(s2), "sd_model": math.sqrt(best_rho * s2)}


def _aicc(loglik, k, n):
    return -2 * loglik + 2 * k + (2 * k * (k + 1) / (n - k - 1) if n - k - 1 > 0 else math.inf)


def information_table(study, row: int = 0) -> pd.DataFrame:
    """information.csv: each law fitted on all the data of one row (the estimate) — the 1-D laws on the study's
    compute frontier, the joint laws on every snapshot — with the misfit's error model (misfit_likelihood; two
    variance parameters added to the law's own), AICc and its difference to the best law on the same data."""
    reps = study.reps
    snaps = reps.snapshots
    total = reps.loss[row, :, 0]
    rows = []
    front = study.axis("compute").mask[row]
    u = np.log(snaps["flops"].to_numpy(np.float64))
    model = snaps["model"].to_numpy()
    js = float(np.nanmean(reps.jstar[row, :, 0]))
    for law in ONE_D:
        w = front[None, :].astype(np.float64)
        if law == "free_offset":
            k, p, c, _ = power_law_free(u[None], total[None], w)
        else:
            c = np.array([js if law == "L_minus_jstar" else 0.0])
            k, p, _, _ = power_law_fixed(u[None], total[None], c, w)
        pred = power_law_predict(u[None], c, k, p)[0]
        ymin = float(np.min(total[front]))
        at_bound = law == "free_offset" and not 0 < float(c[0]) < ymin * (1 - 1e-6)
        rows.append(_ic_row(law, "compute frontier", np.log(total[front]) - np.log(pred[front]), model[front],
                            at_bound))
    if identified(reps):
        for law in JOINT:
            jr = study.joint(JOINT_FLOOR[law])
            pred = jr.predict(snaps["params"].to_numpy(np.float64), snaps["images_seen"].to_numpy(np.float64))[row]
            at_bound = law == "joint_floor_free" and not jr.values["E"][row] > 0
            rows.append(_ic_row(law, "every snapshot", np.log(total) - np.log(pred), model, at_bound))
    table = pd.DataFrame(rows, columns=IC_COLUMNS)
    table["delta_aicc"] = table["aicc"] - table.groupby("data")["aicc"].transform("min")
    return table


def _ic_row(law, data, residuals, groups, floor_at_bound=False) -> dict:
    """One law's AICc. Only fitted parameters count: a free floor the data put at its bound is not one (the law is
    then the one without it), nor a model effect whose sd the likelihood puts at 0."""
    ok = np.isfinite(residuals)
    lik = misfit_likelihood(residuals[ok], groups[ok])
    k = LAW_PARAMETERS[law] - int(floor_at_bound) + 1 + int(lik["sd_model"] > 0)
    n = int(ok.sum())
    return {"law": law, "data": data, "n": n, "n_parameters": k,
            "rms_log_residual": float(np.sqrt(np.mean(residuals[ok] ** 2))), **lik,
            "aicc": _aicc(lik["log_likelihood"], k, n)}
