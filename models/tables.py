"""The study's CSV tables read back with their checks: any table against its checksum sidecar and columns
(`read_checked_csv`), and the J* table that the evaluation, the optimal-loss schedule and the diagnosis read
(`read_jstar`). A bad table is one IntegrityError naming the file and the command that rebuilds it (models.integrity).
No torch: the statistics and the diagnosis read these tables too."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from models import integrity

JSTAR_COLUMNS = ("sigma", "optimal_loss", "stderr")


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


def read_jstar(path) -> pd.DataFrame:
    """A J* table (optimal_loss/jstar.csv or an estimator's CSV) as the study reads it: checked against its
    checksum sidecar and validated — columns sigma, optimal_loss, stderr; one estimator; σ finite, > 0, ascending
    and geometric (analysis.evaluate.sigma_grid's grid, so a row missing inside it is seen); finite J* and standard
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
