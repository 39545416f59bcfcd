"""The snapshots' evaluation files collected into the study's losses table: each snapshot's evaluation CSV and
per-triple arrays (their columns and checked readers), losses.csv with the invariant L ≥ J*, and per_triple.npz.

Every file this module reads back (the per-snapshot CSVs and per-triple files, jstar.csv) is checked where it is
read: against its checksum sidecar (study.integrity; the workflow stamps every file a job writes) and against what
the file must hold (columns, one row per σ of one grid, a total row, finite values). A bad file stops the reader
with one line naming it and the command that rebuilds it; no NaN and no missing row reaches a fit.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.eval_set import _read_npz
from study import integrity
from study.tables import check_finite_statistics, read_checked_csv, read_jstar

INVARIANT_SIGMAS = 3.0  # L(σ) ≥ J*(σ) − 3 s.e. is the checked invariant
# the columns of every evaluation CSV (analysis.evaluate writes one per snapshot): the snapshot, σ, the statistics
LOSS_COLUMNS = ["model", "arch", "params", "images_seen", "flops", "sigma", "weighting", "n",
                "loss", "loss_stderr", "optimal_loss", "optimal_loss_stderr", "excess", "excess_stderr",
                "gap", "gap_stderr"]


# ---------------------------------------------------------------------------------------------------------------
# one snapshot's evaluation files
# ---------------------------------------------------------------------------------------------------------------

def triples_path(table_csv) -> Path:
    """Where a table's per-triple arrays go: beside its CSV, same stem (an evaluation's `snapshot --per-triple`,
    an EMA sweep's)."""
    return Path(table_csv).with_suffix(".npz")


TRIPLE_KEYS = ("sigma", "level", "loss", "excess", "optimal_loss", "total_weight")


def read_eval_csv(path) -> pd.DataFrame:
    """One snapshot's evaluation CSV, checked against its sidecar and validated: the LOSS_COLUMNS, one model and
    snapshot, per-σ rows (weighting `none`) at distinct ascending σ > 0 followed by one total row (σ empty,
    weighting `training`), finite statistics (a standard error may be missing only where n = 1)."""
    df = read_checked_csv(path, LOSS_COLUMNS, "evaluation CSV")
    per, total = df[df["sigma"].notna()], df[df["sigma"].isna()]
    if len(total) != 1 or not df["sigma"].iloc[-1:].isna().all() or per.empty:
        raise integrity.invalid(path, f"{len(per)} per-σ rows and {len(total)} total rows; expected per-σ rows "
                                      "and one total row, last")
    sig = per["sigma"].to_numpy(np.float64)
    if not (np.all(np.isfinite(sig) & (sig > 0)) and np.all(np.diff(sig) > 0)):
        raise integrity.invalid(path, "σ values must be finite, > 0, distinct and ascending")
    if df["model"].nunique(dropna=False) != 1 or df["images_seen"].nunique(dropna=False) != 1:
        raise integrity.invalid(path, "rows of several snapshots (model, images_seen)")
    if set(per["weighting"]) != {"none"} or set(total["weighting"]) != {"training"}:
        raise integrity.invalid(path, "weighting must be `none` on per-σ rows and `training` on the total")
    check_finite_statistics(df, path)
    return df


def read_triples(path, per_sigma: pd.DataFrame | None = None) -> dict:
    """One snapshot's per-triple arrays (the .npz beside its CSV), checked against its sidecar and validated:
    shapes, levels 1..K, finite values; with the CSV's per-σ rows, the same σ grid and the same per-σ means."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"per-triple errors not found: {path} (written by `analysis.evaluate snapshot "
                                f"--per-triple`)")
    a = _read_npz(path, TRIPLE_KEYS)
    k, m = a["sigma"].size, a["loss"].size
    shapes = {"sigma": (k,), "level": (m,), "loss": (m,), "excess": (m,), "optimal_loss": (m,),
              "total_weight": (k,)}
    bad = [f"{key} {list(a[key].shape)}" for key, shape in shapes.items() if a[key].shape != shape]
    if bad or not np.issubdtype(a["level"].dtype, np.integer):
        raise integrity.invalid(path, f"array shapes do not fit together ({', '.join(bad) or 'level not integer'})")
    if m and (a["level"].min() < 1 or a["level"].max() > k):
        raise integrity.invalid(path, f"level must index the σ grid 1..{k}")
    for key in ("sigma", "loss", "excess", "optimal_loss", "total_weight"):
        if not np.all(np.isfinite(a[key])):
            raise integrity.invalid(path, f"non-finite {key}")
    if per_sigma is not None:
        sig = per_sigma["sigma"].to_numpy(np.float64)
        if sig.shape != a["sigma"].shape or not np.allclose(sig, a["sigma"], rtol=1e-12, atol=0):
            raise integrity.invalid(path, "its σ grid differs from its evaluation CSV's")
        counts = np.bincount(a["level"], minlength=k + 1)[1:]
        for key in ("loss", "optimal_loss", "excess"):
            means = np.bincount(a["level"], weights=a[key], minlength=k + 1)[1:] / np.maximum(counts, 1)
            if not np.allclose(means, per_sigma[key].to_numpy(np.float64), rtol=1e-9, atol=1e-300):
                raise integrity.invalid(path, f"its per-σ means of {key} differ from its evaluation CSV's")
    return a


def collect_per_triple(losses: pd.DataFrame, eval_csvs) -> dict:
    """The study's per-triple arrays (analysis.resample's per_triple.npz) from every snapshot's .npz beside its
    CSV, in the snapshot order of ``losses``. All snapshots must share the evaluation set."""
    by_key = {}
    for p in eval_csvs:
        csv = read_eval_csv(p)
        head = csv.iloc[0]
        by_key[(str(head["model"]), int(head["images_seen"]))] = read_triples(triples_path(p),
                                                                              csv[csv["sigma"].notna()])
    snaps = losses[losses["sigma"].isna()][["model", "params", "images_seen", "flops"]].reset_index(drop=True)
    first = next(iter(by_key.values()))
    rows = []
    for _, r in snaps.iterrows():
        a = by_key[(str(r["model"]), int(r["images_seen"]))]
        for k in ("sigma", "level", "optimal_loss"):
            if a[k].shape != first[k].shape or not np.array_equal(a[k], first[k]):
                raise ValueError(f"snapshot {r['model']}@{int(r['images_seen'])} was evaluated on another "
                                 f"evaluation set ({k} differs); re-evaluate every snapshot on one set")
        rows.append(a)
    return {"sigma": first["sigma"], "level": first["level"], "optimal_loss": first["optimal_loss"],
            "loss": np.stack([a["loss"] for a in rows]), "excess": np.stack([a["excess"] for a in rows]),
            "total_weight": np.stack([a["total_weight"] for a in rows]),
            "model": snaps["model"].astype(str).to_numpy(), "params": snaps["params"].to_numpy(np.int64),
            "images_seen": snaps["images_seen"].to_numpy(np.int64), "flops": snaps["flops"].to_numpy(np.float64)}


# ---------------------------------------------------------------------------------------------------------------
# collecting every snapshot's CSV into losses.csv, with the invariant check
# ---------------------------------------------------------------------------------------------------------------

def interp_log_sigma(sigma_grid_, values, sigma) -> np.ndarray:
    """Linear interpolation in ln σ; NaN outside the grid (no extrapolation)."""
    sg = np.asarray(sigma_grid_, dtype=np.float64)
    order = np.argsort(sg)
    u, v = np.log(sg[order]), np.asarray(values, dtype=np.float64)[order]
    s = np.asarray(sigma, dtype=np.float64)
    out = np.full(s.shape, np.nan)
    ok = np.isfinite(s) & (s > 0)
    us = np.log(np.where(ok, s, 1.0))
    inside = ok & (us >= u[0] - 1e-12) & (us <= u[-1] + 1e-12)
    out[inside] = np.interp(us[inside], u, v)
    return out


def _z(diff: pd.Series, se: pd.Series) -> pd.Series:
    """diff / se; with se = 0 (identical values), +inf or −inf by the sign of diff (0 counts as ≥ 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        z = diff / se.where(se > 0)
    zero = se == 0
    return z.where(~zero, np.where(diff >= 0, np.inf, -np.inf))


def check_invariant(df: pd.DataFrame, k: float = INVARIANT_SIGMAS) -> pd.DataFrame:
    """Adds `invariant_z` and `invariant_ok` to the per-σ rows (NaN / True on totals).

    Two checks, both must hold: (a) on the same triples, the paired gap L − J* ≥ −k·s.e.(gap) (a significantly
    negative gap means D* is not the posterior mean of these x_t: wrong σ, labels or data); (b) where the grid
    J*(σ) of optimal_loss/jstar.csv covers that σ (`jstar_grid`, with `jstar_covered` True when given), L ≥
    J*_grid − k·sqrt(s.e.(L)² + s.e.(J*_grid)²). invariant_z is the smaller of the two z-scores. A row whose
    check cannot be made because a value it needs is not finite (L, its gap or their standard errors, or J*_grid
    where the grid covers σ) has invariant_z NaN and invariant_ok False: nothing unchecked passes."""
    df = df.copy()
    per = df["sigma"].notna()
    needed = [df[c] for c in ("loss", "loss_stderr", "gap", "gap_stderr")]
    z = _z(df["gap"], df["gap_stderr"])
    if "jstar_grid" in df:
        covered = df["jstar_covered"].astype(bool) if "jstar_covered" in df else df["jstar_grid"].notna()
        js_se = df["jstar_grid_stderr"].fillna(0.0) if "jstar_grid_stderr" in df else 0.0
        z_grid = _z(df["loss"] - df["jstar_grid"], np.sqrt(df["loss_stderr"] ** 2 + js_se ** 2))
        z = pd.concat([z, z_grid.where(covered)], axis=1).min(axis=1, skipna=True)
        needed.append(df["jstar_grid"].where(covered, 0.0))
    finite = np.logical_and.reduce([np.isfinite(pd.to_numeric(c, errors="coerce").to_numpy(np.float64))
                                    for c in needed])
    df["invariant_z"] = np.where(per & finite, z, np.nan)
    df["invariant_ok"] = ~(per & (~finite | (df["invariant_z"] < -k)))
    return df


def collect(eval_csvs, jstar_csv=None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Concatenate per-snapshot CSVs into the study's losses table (sorted by params, images seen, σ; totals
    last), add `jstar_grid` (+ stderr) from jstar.csv, and run the invariant check. Returns (losses, invariant)
    where `invariant` holds every per-σ row's check (model, images_seen, sigma, loss, optimal_loss, z, ok)."""
    frames, seen, grid = [], {}, None
    for p in eval_csvs:
        one = read_eval_csv(p)
        key = (str(one["model"].iloc[0]), int(one["images_seen"].iloc[0]))
        if key in seen:
            raise ValueError(f"{p} and {seen[key]} both hold snapshot {key[0]}@{key[1]}")
        seen[key] = p
        sig = one["sigma"].dropna().to_numpy(np.float64)
        if grid is None:
            grid = (p, sig)
        elif sig.shape != grid[1].shape or not np.allclose(sig, grid[1], rtol=1e-12, atol=0):
            raise integrity.invalid(p, f"its σ grid ({sig.size} σ) differs from {grid[0]}'s ({grid[1].size} σ): "
                                       "every snapshot must be evaluated on one evaluation set")
        frames.append(one)
    if not frames:
        raise ValueError("collect: no evaluation CSVs given")
    df = pd.concat(frames, ignore_index=True)
    if jstar_csv is not None:
        js = read_jstar(jstar_csv)
        df["jstar_grid"] = interp_log_sigma(js["sigma"], js["optimal_loss"], df["sigma"])
        df["jstar_grid_stderr"] = interp_log_sigma(js["sigma"], js["stderr"], df["sigma"])
        df["jstar_covered"] = np.isfinite(interp_log_sigma(js["sigma"], np.zeros(len(js)), df["sigma"]))
    df = check_invariant(df).drop(columns=["jstar_covered"], errors="ignore")
    df["_total"] = df["sigma"].isna()
    df = df.sort_values(["params", "model", "images_seen", "_total", "sigma"]).drop(columns="_total")
    df = df.reset_index(drop=True)
    per = df[df["sigma"].notna()]
    cols = ["model", "params", "images_seen", "sigma", "loss", "loss_stderr", "optimal_loss", "gap",
            "gap_stderr"] + [c for c in ("jstar_grid",) if c in df] + ["invariant_z", "invariant_ok"]
    return df, per[cols].reset_index(drop=True)


def warn_invariant(invariant: pd.DataFrame, stream=None) -> int:
    """Print a loud warning listing every violation (and every row that could not be checked); returns their
    number."""
    stream = stream or sys.stderr
    bad = invariant[~invariant["invariant_ok"].astype(bool)]
    if len(bad):
        unchecked = int(bad["invariant_z"].isna().sum())
        print("!" * 100, file=stream)
        print(f"WARNING: INVARIANT VIOLATED in {len(bad)} of {len(invariant)} (model, snapshot, σ) rows: "
              f"L(σ) < J*(σ) − {INVARIANT_SIGMAS:g} standard errors"
              + (f", or ({unchecked} rows) a value the check needs is not finite" if unchecked else "")
              + ". Check that D* (optimal_loss) and the models use the same data, σ and labels.", file=stream)
        for _, r in bad.iterrows():
            print(f"  model {r['model']} images_seen {int(r['images_seen'])} σ={r['sigma']:.4g}: "
                  f"L={r['loss']:.6g} J*={r['optimal_loss']:.6g} z={r['invariant_z']:.2f}", file=stream)
        print("!" * 100, file=stream)
    return int(len(bad))
