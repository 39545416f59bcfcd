"""The EMA sweep's figure: each model's final-snapshot loss against the EMA length σ_rel reconstructed post hoc
(analysis.ema_sweep writes the table it draws).  matplotlib is imported when the figure is drawn: the sweep's CLI
draws it only when asked for --figure."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from study.atomic import atomic_path


def plot_ema_sweep(table: pd.DataFrame, out) -> Path:
    """Loss against σ_rel per model (all triples, ±1 s.e.), the σ_rel chosen on half A marked."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for model, rows in table.groupby("model", sort=False):
        line = ax.errorbar(rows["sigma_rel"], rows["loss"], yerr=rows["stderr"], marker="o", ms=3, capsize=2,
                           label=f"{model} ({int(rows['params'].iloc[0]):,} params)")
        best = rows[rows["best"].astype(bool)]
        ax.plot(best["sigma_rel"], best["loss"], "*", ms=12, color=line[0].get_color())
    ax.set_xscale("log")
    ticks = [t for t in (0.02, 0.05, 0.1, 0.2) if table["sigma_rel"].min() <= t <= table["sigma_rel"].max()]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("EMA length σ_rel (reconstructed post hoc)")
    ax.set_ylabel("total loss L (training weighting)")
    ax.set_title("Final snapshots against the EMA length (★ chosen on half A)")
    ax.legend(fontsize=7)
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    plt.close(fig)
    return out
