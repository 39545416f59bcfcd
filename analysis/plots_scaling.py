"""The study's figures against compute: total (or one σ's) L and L − J* with their fits and residuals, the families
side by side, and the figures of the scaling step's tables: the offset profile, the compute-optimal frontier and
the forecasts (analysis.plots draws them all)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window: before pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from analysis.forecast import LAW_LABELS, LAWS  # noqa: E402
from analysis.plots_common import (  # noqa: E402
    LABELS,
    MINUS,
    RAW,
    _fit_row,
    _model_colors,
    _model_label,
    _on_frontier,
    _per_sigma,
    _predict,
    _quantity,
    _save,
    _totals,
)
from analysis.study_stats import model_families  # noqa: E402


def plot_scaling(losses: pd.DataFrame, exponents: pd.DataFrame | None, out, sigma=None) -> Path:
    """The paper's comparison: total (σ None) or per-σ L against compute (left) and L − J* (right), every
    snapshot as a point, the compute frontier highlighted, and the fit of exponents.csv drawn over it."""
    df = _totals(losses) if sigma is None else _per_sigma(losses)
    if sigma is not None:
        df = df[np.isclose(df["sigma"].astype(float), float(sigma))]
    colors = _model_colors(losses)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, q in zip(axes, (RAW, MINUS)):
        y_all = _quantity(df, q).to_numpy(dtype=float)
        for m, g in df.groupby("model"):
            y = _quantity(g, q).to_numpy(dtype=float)
            ok = y > 0
            ax.plot(g["flops"][ok], y[ok], "o-", color=colors[m], ms=4, alpha=0.8, label=_model_label(losses, m))
        ok = np.isfinite(y_all) & (y_all > 0)
        on = ok & _on_frontier(losses, df)
        if on.any():
            ax.plot(df["flops"].to_numpy(dtype=float)[on], y_all[on], "kx", ms=7, mew=1.5,
                    label="compute frontier (of the total L)")
        row = _fit_row(exponents, q, sigma)
        if row is not None and ok.any():
            xs = np.geomspace(df["flops"].min(), df["flops"].max(), 100)
            ax.plot(xs, _predict(row, xs), "r-", lw=2,
                    label=f"fit: exponent {float(row['exponent']):.3g}, ρ = {float(row['rho']):.3f}")
        where = "total (training weighting)" if sigma is None else f"σ = {float(sigma):.3g}"
        ax.set(xscale="log", yscale="log", xlabel="training compute (FLOPs)", ylabel=LABELS[q],
               title=f"{LABELS[q]} vs compute — {where}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, out)


def plot_residuals(losses: pd.DataFrame, exponents: pd.DataFrame | None, out, sigma=None) -> Path:
    """ln y − ln ŷ of both compute fits of the total (or of one σ), every snapshot, against compute."""
    df = _totals(losses) if sigma is None else _per_sigma(losses)
    if sigma is not None:
        df = df[np.isclose(df["sigma"].astype(float), float(sigma))]
    colors = _model_colors(losses)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    for ax, q in zip(axes, (RAW, MINUS)):
        row = _fit_row(exponents, q, sigma)
        if row is None:
            ax.text(0.5, 0.5, "no fit", transform=ax.transAxes, ha="center")
        else:
            for m, g in df.groupby("model"):
                y = _quantity(g, q).to_numpy(dtype=float)
                ok = y > 0
                res = np.log(y[ok]) - np.log(_predict(row, g["flops"].to_numpy(dtype=float)[ok]))
                ax.plot(g["flops"].to_numpy()[ok], res, "o", color=colors[m], label=_model_label(losses, m))
        ax.axhline(0, color="k", lw=1)
        ax.set(xscale="log", xlabel="training compute (FLOPs)", title=f"residuals of the {LABELS[q]} fit")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("ln y − ln ŷ")
    axes[1].legend(fontsize=7)
    return _save(fig, out)


def plot_offset_profile(profile: pd.DataFrame, verdict: pd.DataFrame, out) -> Path:
    """ρ of log(L − c) (top) and the extrapolation error of the offset-c line (bottom) against the subtracted
    constant c, per axis, with bands from the replicates; J* and the free offset (with its interval) marked."""
    axes_names = list(profile["axis"].unique())
    fig, axes = plt.subplots(2, len(axes_names), figsize=(5.5 * len(axes_names), 6.4), squeeze=False,
                             sharex="col")
    for j, a in enumerate(axes_names):
        p = profile[(profile["axis"] == a) & (profile["marker"].fillna("") == "")].sort_values("c")
        marks = profile[(profile["axis"] == a) & (profile["marker"].fillna("") != "")]
        v = verdict[(verdict["axis"] == a) & verdict["sigma"].isna()]
        for i, (key, label) in enumerate((("rho", "ρ of log(L − c) vs log x"),
                                          ("extrapolation_error", "extrapolation error (largest model)"))):
            ax = axes[i, j]
            ax.plot(p["c"], p[key], "C0-", label=label)
            if p[f"{key}_ci_lo"].notna().any():
                ax.fill_between(p["c"], p[f"{key}_ci_lo"], p[f"{key}_ci_hi"], color="C0", alpha=0.2,
                                label="95% interval")
            for _, m in marks.iterrows():
                color = {"jstar": "C3", "free_offset": "C2", "implied_offset": "C1"}.get(m["marker"], "C7")
                name = {"jstar": "J*", "free_offset": "free offset",
                        "implied_offset": "offset a J* floor implies"}.get(m["marker"], m["marker"])
                ax.axvline(m["c"], color=color, ls="--", lw=1.5, label=f"{name} = {m['c']:.3g}")
            if not v.empty and np.isfinite(v.iloc[0]["free_offset_ci_lo"]):
                ax.axvspan(v.iloc[0]["free_offset_ci_lo"], v.iloc[0]["free_offset_ci_hi"], color="C2", alpha=0.1,
                           label="free-offset 95% interval")
            ax.set(ylabel=label, title=f"x = {a}" if i == 0 else None)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
        axes[1, j].set_xlabel("subtracted constant c (total loss)")
    return _save(fig, out)


def plot_compute_optimal(losses: pd.DataFrame, compute_optimal: pd.DataFrame, out) -> Path:
    """Iso-loss contours of the fitted L(N, D) = J* + A/N^a + B/D^b over (params, images), the snapshots, and the
    compute-optimal frontier (N_opt, D_opt for compute ∝ N·D)."""
    tot = _totals(losses)
    fig, ax = plt.subplots(figsize=(6.6, 5.2))
    row = compute_optimal[compute_optimal["floor"] == "jstar"]
    if row.empty or not np.isfinite(float(row.iloc[0].get("E", np.nan))):
        ax.text(0.5, 0.5, "no compute-optimal fit (too few snapshots)", transform=ax.transAxes, ha="center")
        return _save(fig, out)
    r = row.iloc[0]
    # minimise A/N^a + B/D^b at fixed K = N·D (compute ∝ N·D): N_opt = (aA/(bB))^(1/(a+b)) · K^(b/(a+b)), over the
    # compute range of the snapshots; the window shows the snapshots and that frontier
    nd = tot["params"] * tot["images_seen"]
    k = np.geomspace(nd.min(), nd.max(), 100)
    n_opt = (r["a"] * r["A"] / (r["b"] * r["B"])) ** (1 / (r["a"] + r["b"])) * k ** (r["b"] / (r["a"] + r["b"]))
    n_lo, n_hi = min(tot["params"].min(), n_opt.min()) / 2, max(tot["params"].max(), n_opt.max()) * 2
    d_lo = min(tot["images_seen"].min(), (k / n_opt).min()) / 2
    d_hi = max(tot["images_seen"].max(), (k / n_opt).max()) * 2
    N, D = np.meshgrid(np.geomspace(n_lo, n_hi, 200), np.geomspace(d_lo, d_hi, 200))
    L = r["E"] + r["A"] / N ** r["a"] + r["B"] / D ** r["b"]
    cs = ax.contour(N, D, L, levels=np.quantile(tot["loss"], np.linspace(0.05, 0.95, 8)), cmap="viridis")
    ax.clabel(cs, fontsize=7, fmt="%.3g")
    sc = ax.scatter(tot["params"], tot["images_seen"], c=tot["loss"], cmap="viridis", edgecolor="k", zorder=3)
    fig.colorbar(sc, ax=ax, label="total L (measured)")
    ax.plot(n_opt, k / n_opt, "r-", lw=2,
            label=f"compute-optimal over the studied compute: N ∝ C^{r['n_opt_exponent']:.2f}, "
                  f"D ∝ C^{r['d_opt_exponent']:.2f}")
    ax.set(xscale="log", yscale="log", xlim=(n_lo, n_hi), ylim=(d_lo, d_hi), xlabel="parameters N",
           ylabel="images seen D", title=f"L(N, D) = J* + A/N^{r['a']:.2f} + B/D^{r['b']:.2f}  (J* = {r['E']:.3g})")
    ax.legend(fontsize=7, loc="upper right")
    return _save(fig, out)


def plot_forecast(points: pd.DataFrame, forecast: pd.DataFrame, out) -> Path:
    """Every law's forecasts of the held-out sizes (forecast_points.csv, the estimate) against the measured total L:
    one panel per law, a point per held-out snapshot coloured by the held-out model (filled: on the frontier, the
    points every law is scored on), the diagonal, and the law's mean error over the splits with its interval."""
    laws = [law for law in LAWS if law in set(points["law"])]
    fig, axes = plt.subplots(2, 3, figsize=(12, 7.6), squeeze=False)
    if not laws:
        axes[0, 0].text(0.5, 0.5, "no forecast (too few model sizes)", transform=axes[0, 0].transAxes, ha="center")
    held = list(dict.fromkeys(points["held_out_model"]))
    cmap = plt.get_cmap("viridis")
    colors = {m: cmap(i / max(len(held) - 1, 1)) for i, m in enumerate(held)}
    lo = float(np.nanmin(points[["actual", "predicted"]].to_numpy())) if len(points) else 0.1
    hi = float(np.nanmax(points[["actual", "predicted"]].to_numpy())) if len(points) else 1.0
    for ax, law in zip(axes.ravel(), laws):
        p = points[points["law"] == law]
        for m in held:
            g = p[p["held_out_model"] == m]
            front = g["frontier"].astype(bool)
            ax.scatter(g.loc[front, "actual"], g.loc[front, "predicted"], color=colors[m], s=28, label=f"→ {m}")
            ax.scatter(g.loc[~front, "actual"], g.loc[~front, "predicted"], facecolors="none", edgecolors=colors[m],
                       s=28)
        ax.plot([lo / 1.05, hi * 1.05], [lo / 1.05, hi * 1.05], "k--", lw=1)
        title = LAW_LABELS[law]
        for points_set in ("frontier", "all"):
            r = forecast[(forecast["law"] == law) & (forecast["split"].astype(str) == "mean")
                         & (forecast["points"] == points_set)]
            if not r.empty and np.isfinite(float(r["error"].iloc[0])):
                r = r.iloc[0]
                ci = (f" [{r['error_ci_lo']:.3f}, {r['error_ci_hi']:.3f}]" if np.isfinite(r["error_ci_lo"]) else "")
                title += f"\nerror, {points_set}: {r['error']:.3f}{ci}"
        ax.set(xscale="log", yscale="log", xlabel="measured total L", ylabel="forecast L̂")
        ax.set_title(title, fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes.ravel()[max(len(laws), 1):]:
        ax.axis("off")
    fig.tight_layout()
    return _save(fig, out)


def plot_families(losses: pd.DataFrame, exponents: pd.DataFrame | None, out) -> Path:
    """Architecture families side by side: total L (left) and L − J* (right) against compute; each family's
    snapshots in its own colour map (darker = larger model), its own compute frontier and its own fit from
    exponents.csv's per-family rows (legend: exponent with its bootstrap 95% interval)."""
    df = _totals(losses)
    df = df.assign(_family=model_families(df))
    fams = sorted(df["_family"].unique())
    cmaps = ["Blues", "Oranges", "Greens", "Purples"]
    line_colors = ["tab:blue", "tab:orange", "tab:green", "tab:purple"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    for ax, q in zip(axes, (RAW, MINUS)):
        for i, fam in enumerate(fams):
            sub = df[df["_family"] == fam]
            order = sub.groupby("model")["params"].first().sort_values().index.tolist()
            cmap = plt.get_cmap(cmaps[i % len(cmaps)])
            for j, m in enumerate(order):
                g = sub[sub["model"] == m]
                y = _quantity(g, q).to_numpy(dtype=float)
                ok = y > 0
                ax.plot(g["flops"][ok], y[ok], "o-", color=cmap(0.35 + 0.6 * j / max(len(order) - 1, 1)), ms=3,
                        lw=0.8, alpha=0.8, label=_model_label(losses, m) if q == RAW else None)
            y_all = _quantity(sub, q).to_numpy(dtype=float)
            x_all = sub["flops"].to_numpy(dtype=float)
            ok = np.isfinite(y_all) & (y_all > 0)
            on = ok & _on_frontier(sub, sub)  # the family's own frontier, chosen on its total L
            ax.plot(x_all[on], y_all[on], "x", color=line_colors[i % 4], ms=7, mew=1.5)
            fam_fits = None
            if exponents is not None and "group" in exponents.columns:
                fam_fits = exponents[exponents["group"] == fam].drop(columns="group")
            row = _fit_row(fam_fits, q)
            if row is not None and ok.any():
                xs = np.geomspace(x_all[ok].min(), x_all[ok].max(), 100)
                lo, hi = float(row.get("exponent_ci_lo", np.nan)), float(row.get("exponent_ci_hi", np.nan))
                ci = f" [{lo:.3g}, {hi:.3g}]" if np.isfinite(lo) and np.isfinite(hi) else ""
                ax.plot(xs, _predict(row, xs), "-", color=line_colors[i % 4], lw=2.2,
                        label=f"{fam}: exponent {float(row['exponent']):.3g}{ci}")
        ax.set(xscale="log", yscale="log", xlabel="training compute (FLOPs)", ylabel=LABELS[q],
               title=f"{LABELS[q]} vs compute by family (× = frontier)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    return _save(fig, out)
