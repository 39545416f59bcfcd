"""Every figure of a study (matplotlib, Agg backend): one function per figure, and a CLI the report rule calls.

    python -m analysis.plots all --losses losses.csv --exponents exponents.csv --jstar jstar.csv \
        --estimators estimators.csv --outdir results/<study>/figures

Inputs are the study's tables (docs/internals.md): losses.csv (analysis.evaluate collect: one row per model,
snapshot and σ, plus totals with σ empty), exponents.csv (analysis.study_stats: quantity × axis × σ),
jstar.csv / estimators.csv (analysis.optimal_loss). The figures:
  jstar.png                J*(σ) with every estimator
  loss_per_sigma.png       per-σ L of every model (last snapshot) over J* on the same triples
  gap_per_sigma.png        per-σ L − J* and the excess E‖Dθ − D*‖²
  scaling.png              total L and L − J* against compute with their fits, side by side (the paper's comparison)
  exponents_per_sigma.png  per-σ compute exponent and |ρ| of both fits
  residuals.png            residuals of both compute fits of the total
  offset_profile.png       ρ and extrapolation error against the subtracted constant c, J* and free offset marked
  compute_optimal.png      iso-loss contours of L(N, D) = J* + A/N^a + B/D^b and the compute-optimal frontier
  forecast.png             every law's forecasts of the held-out sizes against the measured losses
and, for a study whose models come from several architecture families (exponents.csv then has a `group` column;
the figures above use its pooled fits):
  families.png             total L and L − J* against compute, each family with its own frontier and fit
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from analysis.forecast import LAW_LABELS, LAWS  # noqa: E402
from analysis.frontier import lower_envelope  # noqa: E402
from analysis.study_stats import model_families, pooled_fits  # noqa: E402
from study.atomic import atomic_path  # noqa: E402
from study.integrity import IntegrityError, verify  # noqa: E402

FIGURES = ("jstar", "loss_per_sigma", "gap_per_sigma", "scaling", "exponents_per_sigma", "residuals")
STUDY_FIGURES = FIGURES + ("offset_profile", "compute_optimal", "forecast")  # from the scaling step's tables
# the two quantities the paper compares, as analysis.study_stats names them
RAW, MINUS = "raw", "minus_jstar"
LABELS = {RAW: "L", MINUS: "L − J*"}


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------------------------
# the figures
# ---------------------------------------------------------------------------------------------------------------

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


def plot_all(losses, exponents, jstar, estimators, outdir, profile=None, verdict=None,
             compute_optimal=None, forecast=None, forecast_points=None) -> list[Path]:
    """Every figure into outdir (FIGURES names + .png). Arguments are tables or CSV paths; the offset profile, the
    compute-optimal and the forecast figures are drawn when their tables are given."""
    read = lambda t: pd.read_csv(t) if not isinstance(t, pd.DataFrame) and t is not None else t  # noqa: E731
    losses, exponents, jstar, estimators, profile, verdict, compute_optimal, forecast, forecast_points = map(
        read, (losses, exponents, jstar, estimators, profile, verdict, compute_optimal, forecast, forecast_points))
    exponents = pooled_fits(exponents)  # per-family rows belong to families.png
    outdir = Path(outdir)
    outs = [
        plot_jstar(estimators if estimators is not None else jstar, outdir / "jstar.png", jstar),
        plot_loss_per_sigma(losses, outdir / "loss_per_sigma.png"),
        plot_gap_per_sigma(losses, outdir / "gap_per_sigma.png"),
        plot_scaling(losses, exponents, outdir / "scaling.png"),
        plot_exponents_per_sigma(exponents, outdir / "exponents_per_sigma.png"),
        plot_residuals(losses, exponents, outdir / "residuals.png"),
    ]
    if profile is not None and verdict is not None:
        outs.append(plot_offset_profile(profile, verdict, outdir / "offset_profile.png"))
    if compute_optimal is not None:
        outs.append(plot_compute_optimal(losses, compute_optimal, outdir / "compute_optimal.png"))
    if forecast is not None and forecast_points is not None:
        outs.append(plot_forecast(forecast_points, forecast, outdir / "forecast.png"))
    return outs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m analysis.plots", description=__doc__.split("\n")[0])
    ap.add_argument("figure", choices=("all",) + STUDY_FIGURES + ("families",))
    ap.add_argument("--losses", help="analysis/losses.csv")
    ap.add_argument("--exponents", help="analysis/exponents.csv")
    ap.add_argument("--jstar", help="optimal_loss/jstar.csv")
    ap.add_argument("--estimators", help="optimal_loss/estimators.csv")
    ap.add_argument("--profile", help="analysis/offset_profile.csv (with --verdict: offset_profile.png)")
    ap.add_argument("--verdict", help="analysis/verdict.csv")
    ap.add_argument("--compute-optimal", help="analysis/compute_optimal.csv (compute_optimal.png)")
    ap.add_argument("--forecast", help="analysis/forecast.csv (with --forecast-points: forecast.png)")
    ap.add_argument("--forecast-points", help="analysis/forecast_points.csv")
    ap.add_argument("--outdir", default=None, help="for `all`: folder of the figures")
    ap.add_argument("--out", default=None, help="for one figure: its PNG path")
    ap.add_argument("--sigma", type=float, default=None, help="scaling/residuals at this σ instead of the total")
    a = ap.parse_args(argv)
    needs = {"all": ("losses", "exponents", "estimators"), "jstar": ("estimators",),
             "loss_per_sigma": ("losses",), "gap_per_sigma": ("losses",), "scaling": ("losses", "exponents"),
             "exponents_per_sigma": ("exponents",), "residuals": ("losses", "exponents"),
             "families": ("losses", "exponents"), "offset_profile": ("profile", "verdict"),
             "compute_optimal": ("losses", "compute_optimal"),
             "forecast": ("forecast", "forecast_points")}[a.figure]
    for key in needs:
        path = getattr(a, key)
        if path is None:
            ap.error(f"{a.figure}: --{key} is required")
        if not Path(path).is_file():
            ap.error(f"--{key}: file not found: {path}")
    try:  # the study's intermediates (losses.csv, jstar.csv, estimators.csv) against their checksums
        for key in ("losses", "exponents", "jstar", "estimators", "profile", "verdict", "compute_optimal"):
            if getattr(a, key, None):
                verify(getattr(a, key))
    except IntegrityError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.figure == "all":
        outs = plot_all(a.losses, a.exponents, a.jstar, a.estimators, a.outdir or ".", a.profile, a.verdict,
                        a.compute_optimal, a.forecast, a.forecast_points)
    else:
        out = a.out or f"{a.figure}.png"
        t = {k: pd.read_csv(getattr(a, k)) if getattr(a, k) else None
             for k in ("losses", "exponents", "jstar", "estimators", "profile", "verdict", "compute_optimal",
                       "forecast", "forecast_points")}
        grouped, t["exponents"] = t["exponents"], pooled_fits(t["exponents"])
        fn = {"jstar": lambda: plot_jstar(t["estimators"], out, t["jstar"]),
              "loss_per_sigma": lambda: plot_loss_per_sigma(t["losses"], out),
              "gap_per_sigma": lambda: plot_gap_per_sigma(t["losses"], out),
              "scaling": lambda: plot_scaling(t["losses"], t["exponents"], out, a.sigma),
              "exponents_per_sigma": lambda: plot_exponents_per_sigma(t["exponents"], out),
              "residuals": lambda: plot_residuals(t["losses"], t["exponents"], out, a.sigma),
              "families": lambda: plot_families(t["losses"], grouped, out),
              "offset_profile": lambda: plot_offset_profile(t["profile"], t["verdict"], out),
              "compute_optimal": lambda: plot_compute_optimal(t["losses"], t["compute_optimal"], out),
              "forecast": lambda: plot_forecast(t["forecast_points"], t["forecast"], out)}[a.figure]
        outs = [fn()]
    for p in outs:
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
