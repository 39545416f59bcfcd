"""The study's figures over σ: J*(σ) of every estimator, the last snapshots' per-σ loss and gap, and the per-σ
exponents of the compute fits (analysis.plots draws them all)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window: before pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from analysis.plots_common import LABELS, MINUS, RAW, _last_snapshots, _model_colors, _model_label, _per_sigma, _save  # noqa: E402


def plot_jstar(estimators: pd.DataFrame, out, jstar: pd.DataFrame | None = None) -> Path:
    """J*(σ) of every estimator in estimators.csv (column `estimator`), ±1 s.e. bands; log-log."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    styles = {"full": ("k", "-"), "dol": ("C0", "--"), "cdol": ("C2", "-."), "snis": ("C3", ":")}
    est_col = "estimator" if "estimator" in estimators else None
    groups = estimators.groupby(est_col) if est_col else [("J*", estimators)]
    for name, g in groups:
        g = g.sort_values("sigma")
        color, ls = styles.get(str(name), (None, "-"))
        sig, y = g["sigma"].to_numpy(dtype=float), g["optimal_loss"].to_numpy(dtype=float)
        pos = y > 0  # J* is exactly 0 (or rounding noise) far below σ*: a log axis cannot show it
        ax.plot(sig[pos], y[pos], ls=ls, color=color, label=str(name))
        if "stderr" in g:
            se = g["stderr"].fillna(0).to_numpy(dtype=float)
            ax.fill_between(sig[pos], np.maximum(y - se, y / 10)[pos], (y + se)[pos], color=color, alpha=0.15,
                            lw=0)
    if jstar is not None and est_col is None:
        ax.plot(jstar["sigma"], jstar["optimal_loss"], "k-")
    # below σ* J* is 0 up to rounding (1e-30 and less): show six decades under the data variance, no deeper
    top = float(np.nanmax(estimators["optimal_loss"].to_numpy(dtype=float)))
    if np.isfinite(top) and top > 0:
        ax.set_ylim(top * 1e-6, top * 3)
    ax.set(xscale="log", yscale="log", xlabel="σ (VE)", ylabel="J*(σ)  (per-dim x0-loss)",
           title="Optimal loss of the training set")
    ax.legend(title="estimator")
    ax.grid(True, which="both", alpha=0.3)
    return _save(fig, out)


def plot_loss_per_sigma(losses: pd.DataFrame, out) -> Path:
    """Per-σ L of every model's last snapshot over J*(σ) on the same triples; log-log."""
    per = _last_snapshots(_per_sigma(losses)).sort_values("sigma")
    colors = _model_colors(losses)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for m, g in per.groupby("model"):
        ax.errorbar(g["sigma"], g["loss"], yerr=g["loss_stderr"], color=colors[m], marker="o", ms=3,
                    label=_model_label(losses, m), capsize=2)
    js = per.groupby("sigma")["optimal_loss"].mean()
    ax.plot(js.index, np.clip(js.to_numpy(), 1e-12, None), "k--", lw=2, label="J* (same triples)")
    ax.set(xscale="log", yscale="log", xlabel="σ (VE)", ylabel="x0-loss per dim",
           title="Per-σ loss of the last snapshots vs. the optimal loss")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    return _save(fig, out)


def plot_gap_per_sigma(losses: pd.DataFrame, out) -> Path:
    """Per-σ gap L − J* (paired, ±1 s.e.) and excess E‖Dθ − D*‖² of every model's last snapshot."""
    per = _last_snapshots(_per_sigma(losses)).sort_values("sigma")
    colors = _model_colors(losses)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for m, g in per.groupby("model"):
        gap = (g["loss"] - g["optimal_loss"]).to_numpy(dtype=float)
        se = g["gap_stderr"].to_numpy(dtype=float) if "gap_stderr" in g else None
        pos = gap > 0  # a log axis shows the positive part; negative gaps are within noise (see invariant.csv)
        axes[0].errorbar(g["sigma"][pos], gap[pos], yerr=None if se is None else se[pos], color=colors[m],
                         marker="o", ms=3, capsize=2, label=_model_label(losses, m))
        if "excess" in g:
            axes[1].errorbar(g["sigma"], g["excess"], yerr=g.get("excess_stderr"), color=colors[m], marker="s",
                             ms=3, capsize=2, label=_model_label(losses, m))
    axes[0].set(title="gap L − J* (same triples)", ylabel="per-dim x0-loss")
    axes[1].set(title="excess E‖Dθ − D*‖² (direct)")
    for ax in axes:
        ax.set(xscale="log", yscale="log", xlabel="σ (VE)")
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=8)
    return _save(fig, out)


def plot_exponents_per_sigma(exponents: pd.DataFrame, out, axis: str = "compute") -> Path:
    """Per-σ fitted exponent (top) and |ρ| (bottom) of the raw loss and of L − J*; the totals as lines."""
    fig, axes = plt.subplots(2, 1, figsize=(6.4, 6.4), sharex=True)
    for q, marker, color in ((RAW, "o", "C0"), (MINUS, "s", "C3")):
        e = exponents[(exponents["quantity"] == q) & (exponents["axis"] == axis)].copy()
        e["sigma"] = pd.to_numeric(e["sigma"], errors="coerce")
        per = e[e["sigma"].notna()].sort_values("sigma")
        tot = e[e["sigma"].isna()]
        if {"exponent_ci_lo", "exponent_ci_hi"} <= set(per) and per["exponent_ci_lo"].notna().any():
            yerr = np.abs(np.vstack([per["exponent"] - per["exponent_ci_lo"],
                                     per["exponent_ci_hi"] - per["exponent"]]))
        else:
            yerr = None
        axes[0].errorbar(per["sigma"], per["exponent"], yerr=yerr, marker=marker, color=color, capsize=2,
                         label=LABELS[q])
        axes[1].plot(per["sigma"], np.abs(per["rho"]), marker=marker, color=color, label=LABELS[q])
        if not tot.empty and np.isfinite(float(tot.iloc[0]["exponent"])):
            axes[0].axhline(float(tot.iloc[0]["exponent"]), color=color, ls=":", lw=1)
            axes[1].axhline(abs(float(tot.iloc[0]["rho"])), color=color, ls=":", lw=1)
    axes[0].set(xscale="log", ylabel=f"exponent ({axis})", title="Per-σ power-law fits (dotted: total)")
    axes[1].set(xscale="log", xlabel="σ (VE)", ylabel="|ρ| of the log-log fit", ylim=(0, 1.05))
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, out)
