"""What the study's figures share (analysis.plots_sigma, analysis.plots_scaling): the rows of losses.csv they draw,
one colour and label per model, the fitted laws of exponents.csv, the compute frontier, and the atomic save.

The helpers keep the leading underscore they had inside one plotting module: they are the plotting modules' own,
not an interface for the rest of the study.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window: before pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from analysis.frontier import lower_envelope  # noqa: E402
from study.atomic import atomic_path  # noqa: E402

# the two quantities the paper compares, as analysis.study_stats names them
RAW, MINUS = "raw", "minus_jstar"
LABELS = {RAW: "L", MINUS: "L − J*"}


def _per_sigma(losses: pd.DataFrame) -> pd.DataFrame:
    return losses[pd.to_numeric(losses["sigma"], errors="coerce").notna()].copy()


def _totals(losses: pd.DataFrame) -> pd.DataFrame:
    return losses[pd.to_numeric(losses["sigma"], errors="coerce").isna()].copy()


def _last_snapshots(df: pd.DataFrame) -> pd.DataFrame:
    """Rows of each model's last snapshot."""
    last = df.groupby("model")["images_seen"].transform("max")
    return df[df["images_seen"] == last]


def _model_colors(losses: pd.DataFrame) -> dict:
    """Model → colour along viridis, ordered by parameter count."""
    order = losses.groupby("model")["params"].first().sort_values().index.tolist()
    cmap = plt.get_cmap("viridis")
    return {m: cmap(i / max(len(order) - 1, 1)) for i, m in enumerate(order)}


def _model_label(losses: pd.DataFrame, model: str) -> str:
    params = float(losses.loc[losses["model"] == model, "params"].iloc[0])
    return f"{model} ({params / 1e6:.2g}M)"


def _fit_row(exponents: pd.DataFrame | None, quantity: str, sigma=None, axis: str = "compute"):
    """The exponents.csv row of (quantity, axis, σ) — σ None for the total — or None."""
    if exponents is None or exponents.empty:
        return None
    e = exponents[(exponents["quantity"] == quantity) & (exponents["axis"] == axis)]
    s = pd.to_numeric(e["sigma"], errors="coerce")
    e = e[s.isna()] if sigma is None else e[np.isclose(s, float(sigma), rtol=1e-9)]
    if e.empty or not np.isfinite(float(e.iloc[0].get("exponent", np.nan))):
        return None
    return e.iloc[0]


def _predict(row, x) -> np.ndarray:
    off = float(row["offset"]) if np.isfinite(float(row.get("offset", 0.0))) else 0.0
    return off + float(row["prefactor"]) * np.asarray(x, dtype=np.float64) ** float(row["exponent"])


def _quantity(df: pd.DataFrame, quantity: str) -> pd.Series:
    return df["loss"] if quantity == RAW else df["loss"] - df["optimal_loss"]


def _on_frontier(losses: pd.DataFrame, rows: pd.DataFrame) -> np.ndarray:
    """For each row, whether its snapshot is on the study's one compute frontier (chosen on the total L)."""
    tot = _totals(losses)
    env = tot.iloc[lower_envelope(tot["flops"].to_numpy(dtype=float), tot["loss"].to_numpy(dtype=float))]
    keys = set(zip(env["model"], env["images_seen"]))
    return np.array([(m, i) in keys for m, i in zip(rows["model"], rows["images_seen"])], dtype=bool)


def _save(fig, out) -> Path:
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return out
