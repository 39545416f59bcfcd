"""The study's tables and arrays read back with their checks: any CSV table against its checksum sidecar and
columns (`read_checked_csv`), any .npz of arrays against its sidecar and keys (`read_checked_npz`), the J* table that the evaluation, the optimal-loss schedule and the diagnosis read
(`read_jstar`), and the losses table the fits read (`read_losses`). A bad table is one IntegrityError naming the
file and the command that rebuilds it (study.integrity).
No torch: the statistics and the diagnosis read these tables too."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from study import integrity

JSTAR_COLUMNS = ("sigma", "optimal_loss", "stderr")
STATS = ("loss", "optimal_loss", "excess", "gap")  # the per-σ statistics of an evaluation CSV


def read_checked_csv(path, columns, what: str = "table") -> pd.DataFrame:
    """A study's CSV checked against its checksum sidecar, parsed, and holding `columns`: IntegrityError naming the
    file and its rebuild command otherwise (FileNotFoundError when it is missing)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    integrity.verify(path)
    try:
        df = pd.read_csv(path)
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as e:  # EmptyDataError is a ValueError
        raise integrity.invalid(path, f"unreadable CSV ({type(e).__name__}: {e})") from None
    missing = [c for c in columns if c not in df]
    if missing:
        raise integrity.invalid(path, f"lacks the columns {missing}")
    return df


def read_checked_npz(path, keys) -> dict:
    """The named arrays of a study's .npz (no pickle), checked against its checksum sidecar: IntegrityError naming
    the file and its rebuild command when it cannot be read or lacks a key."""
    integrity.verify(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in keys if k not in z.files]
            if missing:
                raise integrity.invalid(path, f"lacks the arrays {missing}")
            return {k: z[k] for k in keys}
    except integrity.IntegrityError:
        raise
    except Exception as e:  # zipfile.BadZipFile, a truncated member, a pickled object array, ...
        raise integrity.invalid(path, f"unreadable ({type(e).__name__}: {e})") from None


def read_jstar(path) -> pd.DataFrame:
    """A J* table (optimal_loss/jstar.csv or an estimator's CSV) as the study reads it: checked against its
    checksum sidecar and validated — columns sigma, optimal_loss, stderr; one estimator; σ finite, > 0, ascending
    and geometric (analysis.eval_set.sigma_grid's grid, so a row missing inside it is seen); finite J* and standard
    errors ≥ 0."""
    df = read_checked_csv(path, JSTAR_COLUMNS, "J* table")
    if "estimator" in df and df["estimator"].nunique() > 1:
        raise integrity.invalid(path, f"holds several estimators ({sorted(df['estimator'].unique())}); J* is one")
    values = {c: pd.to_numeric(df[c], errors="coerce").to_numpy(np.float64) for c in JSTAR_COLUMNS}
    for c, v in values.items():
        if not np.all(np.isfinite(v)):
            raise integrity.invalid(path, f"non-finite {c} in {int((~np.isfinite(v)).sum())} row(s)")
    sig = values["sigma"]
    if len(sig) < 2 or np.any(sig <= 0) or np.any(np.diff(sig) <= 0):
        raise integrity.invalid(path, f"needs >= 2 rows of ascending σ > 0, got {len(sig)} rows")
    steps = np.diff(np.log(sig))
    if not np.allclose(steps, steps.mean(), rtol=1e-6, atol=0):
        raise integrity.invalid(path, "its σ grid is not geometric (a row is missing or added)")
    if np.any(values["stderr"] < 0):
        raise integrity.invalid(path, "negative stderr")
    return df.assign(**values)


def check_finite_statistics(df: pd.DataFrame, path) -> None:
    """Every statistic and its standard error the table has is finite (a standard error may be missing where
    n = 1)."""
    for c in [c for c in ["params", "images_seen", "flops", "n", *STATS] if c in df]:
        v = pd.to_numeric(df[c], errors="coerce").to_numpy(np.float64)
        if not np.all(np.isfinite(v)):
            raise integrity.invalid(path, f"non-finite {c} in {int((~np.isfinite(v)).sum())} row(s)")
    n = df["n"].to_numpy(np.float64) if "n" in df else np.full(len(df), 2.0)
    for c in [f"{k}_stderr" for k in STATS if f"{k}_stderr" in df]:
        v = pd.to_numeric(df[c], errors="coerce").to_numpy(np.float64)
        if not np.all(np.isfinite(v) | (np.isnan(v) & (n <= 1))):
            raise integrity.invalid(path, f"non-finite {c} in a row with n > 1")


FIT_COLUMNS = ["model", "params", "images_seen", "flops", "sigma", "loss", "optimal_loss"]  # what the fits need


def read_losses(path) -> pd.DataFrame:
    """analysis/losses.csv (or a table with at least its FIT_COLUMNS), checked against its sidecar and validated:
    finite statistics and standard errors, and every snapshot with per-σ rows on one σ grid and one total row (what
    the fits read)."""
    df = read_checked_csv(path, FIT_COLUMNS, "losses table")
    if df.empty:
        raise integrity.invalid(path, "no rows")
    check_finite_statistics(df, path)
    grids = df[df["sigma"].notna()].groupby(["model", "images_seen"])["sigma"].apply(lambda v: tuple(sorted(v)))
    totals = df[df["sigma"].isna()].groupby(["model", "images_seen"]).size()
    snaps = df.groupby(["model", "images_seen"]).size().index
    if (len(grids) and (grids.nunique() > 1 or len(grids) != len(snaps))) or len(totals) != len(snaps) \
            or (totals != 1).any():  # (a table of totals alone has no σ grid)
        raise integrity.invalid(path, "every snapshot must have per-σ rows on one σ grid and one total row")
    return df
