"""The compute-optimal law L(N, D) = E + A/N^a + B/D^b of a study: every snapshot's total loss (N parameters, D images
seen), least squares in log space, with the floor E fixed to the total J* or free; compute_optimal.csv.

At fixed compute C ∝ N·D the optimal allocation is N_opt ∝ C^(b/(a+b)), D_opt ∝ C^(a/(a+b)). The law is fitted on
every row of the study (analysis.resample): the point estimate from a grid of starts, every other row refitted from
it at once (analysis.joint_fits.joint_refit), so the intervals (analysis.intervals) hold the evaluation noise and,
in the total, what leaving each model out moves.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from analysis.intervals import set_fields
from analysis.joint_fits import joint_rows
from analysis.joint_law import JOINT_MAX_EXPONENT, joint_log_model, joint_params, joint_scale

FLOORS = ("jstar", "free")
PARAMETERS = ("E", "A", "B", "a", "b", "n_opt_exponent", "d_opt_exponent")
# the range each parameter lives in (intervals are clipped to it)
BOUNDS = {"E": (0.0, math.inf), "A": (0.0, math.inf), "B": (0.0, math.inf), "a": (0.0, JOINT_MAX_EXPONENT),
          "b": (0.0, JOINT_MAX_EXPONENT), "n_opt_exponent": (0.0, 1.0), "d_opt_exponent": (0.0, 1.0)}


class JointRows:
    """The joint law fitted on every row of a study: θ [rows, k], the scale of N and D, the fixed log floor per row
    (floor "jstar" — the row's total J* —, "zero", or None for a free floor) and the parameters per row."""

    def __init__(self, reps, floor: str, *, weights=None):
        snaps = reps.snapshots
        self.params = snaps["params"].to_numpy(np.float64)
        self.images = snaps["images_seen"].to_numpy(np.float64)
        self.scale = joint_scale(self.params, self.images)
        self.n, self.d = np.log(self.params / self.scale[0]), np.log(self.images / self.scale[1])
        total = reps.loss[:, :, 0]
        self.weights = reps.available.astype(np.float64) if weights is None else weights
        self.logl = np.log(np.where(self.weights > 0, total, np.nan))
        js = np.nanmean(reps.jstar[:, :, 0], axis=1)
        self.floor = floor
        self.log_floor = {"jstar": np.log(js), "zero": np.full(len(js), -math.inf), "free": None}[floor]
        # the estimate row from a grid of starts, every other row refitted from it (as for any table)
        self.theta, f = joint_rows(self.n, self.d, self.logl, self.weights, self.log_floor,
                                   floor_start=np.log(js))
        self.rmse_log = math.sqrt(f / float(self.weights[0].sum()))
        self.values = joint_params(self.theta, self.scale, self.log_floor)

    def predict(self, params, images) -> np.ndarray:
        """L̂ [rows, P] of every row's law at points (params, images) [P] or [rows, P]."""
        n, d = np.log(np.asarray(params) / self.scale[0]), np.log(np.asarray(images) / self.scale[1])
        return np.exp(joint_log_model(self.theta, n, d, self.log_floor))


def identified(reps) -> bool:
    """The law needs ≥ 5 snapshots over ≥ 2 sizes and ≥ 2 lengths."""
    snaps = reps.snapshots
    return len(snaps) >= 5 and snaps["params"].nunique() >= 2 and snaps["images_seen"].nunique() >= 2


def compute_optimal_table(study) -> pd.DataFrame:
    """compute_optimal.csv: the law with the floor fixed to the total J* and with a free floor, with 95% intervals
    (total and evaluation only) from the study's rows. ``study``: analysis.study_stats.StudyFits (its
    ``joint(floor)`` rows are shared with the verdict)."""
    reps = study.reps
    if not identified(reps):
        return pd.DataFrame([{"floor": f, "n": len(reps.snapshots),
                              "note": "needs ≥ 5 snapshots over ≥ 2 sizes and ≥ 2 lengths"} for f in FLOORS])
    rows = []
    allow = reps.n_replicates > 0
    for floor in FLOORS:
        jr = study.joint(floor)
        row, notes = {"floor": floor, "rmse_log": jr.rmse_log, "n": int(jr.weights[0].sum())}, []
        smallest = float(np.nanmin(np.exp(jr.logl[0])))
        for key in PARAMETERS:
            # a free floor lies between 0 and the smallest loss of its fit
            bounds = (0.0, smallest) if key == "E" and floor == "free" else BOUNDS[key]
            set_fields(row, key, jr.values[key], reps.kind, notes, allow=allow, bounds=bounds,
                       mark_clipped=key == "E" and floor == "free")
        if floor == "jstar":
            notes.append("E is J* (fixed, not fitted): its interval is J*'s evaluation noise")
        row["n_jackknife"] = int((reps.kind == "jackknife").sum())
        loo = jr.values["n_opt_exponent"][reps.kind == "jackknife"]
        row["n_opt_exponent_loo_min"] = float(np.nanmin(loo)) if np.isfinite(loo).any() else math.nan
        row["n_opt_exponent_loo_max"] = float(np.nanmax(loo)) if np.isfinite(loo).any() else math.nan
        if floor == "free" and row["E"] == 0:
            notes.append("free floor at 0: these snapshots do not identify a floor")
        at_bound = [k for k in ("a", "b") if not 1e-6 < row[k] < JOINT_MAX_EXPONENT - 1e-6]
        if at_bound:
            notes.append(f"{' and '.join(at_bound)} at the bound [0, {JOINT_MAX_EXPONENT:g}]: not identified "
                         "by these snapshots")
        row["note"] = "; ".join(notes)
        rows.append(row)
    return pd.DataFrame(rows)
