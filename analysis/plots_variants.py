"""The figures of the variant studies: the diagnosis's gap curves J_σ(θ) − J*_σ of every variant
(analysis.diagnose) and the weighting study's arms over seeds with their sample quality (analysis.weighting_study).
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only, never a window: before pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from analysis.weighting_arms import GROUP_KEYS  # noqa: E402
from models.loss_weighting import jstar_points  # noqa: E402
from study.atomic import atomic_path  # noqa: E402


def plot_diagnosis(long_df: pd.DataFrame, jstar_csv, path, sigma_star=None) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for (model, variant), t in long_df.groupby(["model", "variant"], sort=False):
        label = variant if model.replace("_", "-") == variant else f"{model} ({variant})"
        axes[0].errorbar(t["sigma"], t["excess"], yerr=t["excess_stderr"], marker="o", ms=3, capsize=2, label=label)
        ok = t["optimal_loss"] >= 0.01 * t["optimal_loss"].max()   # below, the ratio divides by ~0
        axes[1].plot(t["sigma"][ok], t["relative_excess"][ok], marker="o", ms=3, label=label)
    lo = 0.3 * float(long_df["excess"][long_df["excess"] > 0].min())
    if jstar_csv is not None:
        s, j = jstar_points(jstar_csv)
        axes[0].plot(s, j, "k--", lw=1, label="J*(σ)")
    axes[0].set_ylim(bottom=lo)
    for ax in axes:
        if sigma_star is not None:
            ax.axvline(sigma_star, color="grey", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("σ (VE)")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("excess J_σ(θ) − J*_σ  (per-dim x0-loss)")
    axes[1].set_ylabel("(J_σ(θ) − J*_σ)/J*_σ  (J* ≥ 1 % of Var)")
    axes[0].legend(fontsize=8)
    axes[0].set_title("gap to the optimal loss" + (" (dotted: σ*)" if sigma_star is not None else ""))
    axes[1].set_title("gap relative to J*")
    fig.tight_layout()
    save_fig(fig, path)


def save_fig(fig, path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def plot_comparison(models: pd.DataFrame, path, sigma_star=None) -> None:
    groups = list(models.groupby(GROUP_KEYS, sort=True))
    n = len(groups) + 1
    fig, axes = plt.subplots(1, n, figsize=(4.4 * n, 4.0), squeeze=False)
    axes = axes[0]
    per_sigma = models[models["sigma"].notna()]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    arm_color = {a: colors[i % len(colors)] for i, a in enumerate(dict.fromkeys(models["arm"]))}
    for ax, (key, g) in zip(axes, groups):
        for arm, ga in per_sigma[per_sigma["arm"].isin(g["arm"])].groupby("arm", sort=False):
            for _, t in ga.groupby("seed"):
                ax.plot(t["sigma"], t["excess"], lw=0.6, alpha=0.4, color=arm_color[arm])
            m = ga.groupby("sigma")["excess"].mean()
            ax.plot(m.index, m.values, marker="o", ms=2.5, lw=1.5, color=arm_color[arm], label=arm)
        if sigma_star is not None:
            ax.axvline(sigma_star, color="grey", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("σ (VE)")
        ax.set_ylabel("excess J_σ(θ) − J*_σ")
        arch, variant, logvar = key
        ax.set_title(f"{variant}, {arch}, logvar {'on' if logvar else 'off'} (thin: seeds)", fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    ax = axes[-1]
    totals = models[models["sigma"].isna()]
    names = list(dict.fromkeys(totals["arm"]))
    for x, arm in enumerate(names):
        v = totals[totals["arm"] == arm]["fd_classifier"]
        ax.scatter(np.full(len(v), x), v, color=arm_color[arm], zorder=3, s=12)
        ax.hlines(v.mean(), x - 0.3, x + 0.3, color=arm_color[arm])
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("FD to the training set (classifier features)")
    ax.set_title("sample quality (dots: seeds, bar: mean)", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_fig(fig, path)
