"""Bias of the subset estimators of J* (DOL, cDOL, SNIS) against the exact one, as L and C vary.

Every subset estimator is biased at finite L (DOL and cDOL low at intermediate σ).  On the bundled digits (N = 1797,
D = 64) and a clustered synthetic set it computes the exact J*(σ) and each estimator on the same sources, noise
and subsets (common random numbers: the estimator differences are paired, so they show bias, not Monte-Carlo
noise), and writes to --out:
  estimator_bias.csv          one row per (dataset, estimator, L, C, σ): J*, estimate, stderr, relative error
  estimator_bias_summary.csv  one row per (dataset, estimator, L, C): worst and mean relative error over the σ
                              where J* > 1% of the data variance
  (cdol-nn is our bias-reduced variant, see analysis/optimal_loss.py)
  estimator_bias.png          the paper's Fig. 1c analogue: J*(σ) by estimator, relative error vs σ by C, and
                              the worst relative error vs L

The relative error is (estimate − exact)/exact with the exact estimator's A − B form on the same samples as the
reference (the same form as the subset estimators, so the shared noise cancels).

    python benchmarks/estimator_bias.py --out results/estimator_bias [--n-samples-factor 2] [--quick]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window: before pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from analysis.optimal_loss import estimate_optimal_loss  # noqa: E402
from training.dataset import load_dataset  # noqa: E402


def clustered_set(n=2000, dim=16, k=20, spread=0.25, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.uniform(-1, 1, (k, dim))
    return (centres[rng.integers(0, k, n)] + spread * rng.standard_normal((n, dim))).astype(np.float32)


def load_sets(quick: bool):
    digits = load_dataset("digits").x.reshape(1797, -1).numpy()
    sets = {"digits": digits}
    if not quick:
        sets["clustered"] = clustered_set()
    return sets


def configurations(n: int, quick: bool):
    """(estimator, L, C) triples: L ∈ N/64, N/16, N/4; for cDOL, C ∈ {N/L (stratified), 4N/L (default), 16N/L};
    cdol-nn (ours: the source's K nearest neighbours exact, stratified C, delta-method variance correction)."""
    fracs = (16, 4) if quick else (64, 16, 4)
    out = []
    for f in fracs:
        L = max(4, n // f)
        out.append(("dol", L, 1.0))
        out.append(("snis", L, None))
        for mult in (1.0, 4.0, 16.0):
            out.append(("cdol", L, mult * n / L))
        out.append(("cdol-nn", L, None))
    return out


def run(out: Path, m_factor: float, quick: bool, seed: int) -> pd.DataFrame:
    rows = []
    sigmas = np.geomspace(0.01, 20.0, 10 if quick else 16)
    for name, x in load_sets(quick).items():
        n = len(x)
        m = int(m_factor * n)
        t0 = time.time()
        full = estimate_optimal_loss(x, sigmas, estimator="full", n_samples=m, seed=seed)
        var = float(x.astype(np.float64).var(axis=0).mean())
        print(f"{name}: N={n} D={x.shape[1]} M={m}  exact J* in {time.time() - t0:.1f}s")
        for est, L, C in configurations(n, quick):
            t0 = time.time()
            df = estimate_optimal_loss(x, sigmas, estimator=est, subset_size=L, C=C, n_samples=m, seed=seed)
            print(f"  {est:5s} L={L:5d} C={'' if C is None else f'{C:8.1f}':8s} {time.time() - t0:5.1f}s")
            for i, s in enumerate(sigmas):
                ref = full["a_minus_b"].iloc[i]
                rows.append({"dataset": name, "estimator": est, "L": L, "C": np.nan if C is None else C,
                             "C_over_N_per_L": np.nan if C is None else C * L / n, "sigma": s,
                             "exact": full["optimal_loss"].iloc[i], "exact_ab": ref,
                             "exact_stderr": full["stderr"].iloc[i], "estimate": df["optimal_loss"].iloc[i],
                             "stderr": df["stderr"].iloc[i], "variance": var,
                             "rel_error": (df["optimal_loss"].iloc[i] - ref) / full["optimal_loss"].iloc[i]
                             if full["optimal_loss"].iloc[i] > 0 else np.nan})
    table = pd.DataFrame(rows)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "estimator_bias.csv", index=False)
    return table


def summarise(table: pd.DataFrame) -> pd.DataFrame:
    live = table[table["exact"] > 0.01 * table["variance"]]
    g = live.groupby(["dataset", "estimator", "L", "C_over_N_per_L"], dropna=False)
    summ = g.apply(lambda d: pd.Series({
        "max_abs_rel_error": d["rel_error"].abs().max(),
        "sigma_at_max": d["sigma"].iloc[int(np.argmax(d["rel_error"].abs().to_numpy()))],
        "mean_rel_error": d["rel_error"].mean(),
        "n_sigmas": len(d)}), include_groups=False).reset_index()
    return summ.sort_values(["dataset", "L", "estimator", "C_over_N_per_L"])


def figure(table: pd.DataFrame, summ: pd.DataFrame, path: Path):
    sets = list(table["dataset"].unique())
    fig, axes = plt.subplots(len(sets), 3, figsize=(15, 4.2 * len(sets)), squeeze=False)
    for r, name in enumerate(sets):
        t = table[table["dataset"] == name]
        Ls = sorted(t["L"].unique())
        L_mid = Ls[len(Ls) // 2]
        ax = axes[r, 0]
        base = t[(t["estimator"] == "dol") & (t["L"] == L_mid)]
        ax.plot(base["sigma"], base["exact"], "k-", lw=2, label="exact (full)")
        for est, mult, style in (("dol", 1.0, "C1--"), ("cdol", 4.0, "C0-"), ("snis", None, "C2:")):
            d = t[(t["estimator"] == est) & (t["L"] == L_mid)]
            if mult is not None and est == "cdol":
                d = d[np.isclose(d["C_over_N_per_L"], mult)]
            ax.plot(d["sigma"], d["estimate"].clip(lower=1e-8), style, label=f"{est} (L={L_mid})")
        ax.set(xscale="log", yscale="log", xlabel="σ", ylabel="J*(σ) per dim", title=f"{name}: estimators",
               ylim=(max(1e-6, base["exact"][base["exact"] > 0].min() / 3), None))
        ax.legend(fontsize=8)
        ax = axes[r, 1]
        for est, mult, style in (("dol", 1.0, "C1--"), ("cdol", 1.0, "C3-."), ("cdol", 4.0, "C0-"),
                                 ("cdol", 16.0, "C4-"), ("snis", None, "C2:"), ("cdol-nn", None, "k-")):
            d = t[(t["estimator"] == est) & (t["L"] == L_mid)]
            if est == "cdol":
                d = d[np.isclose(d["C_over_N_per_L"], mult)]
            d = d[d["exact"] > 0.01 * d["variance"]]
            lab = est if est != "cdol" else f"cdol C={mult:g}N/L"
            ax.plot(d["sigma"], d["rel_error"], style, label=lab)
        ax.axhline(0, color="k", lw=0.8)
        ax.set(xscale="log", xlabel="σ", ylabel="(estimate − exact)/exact", title=f"{name}: bias at L={L_mid}")
        ax.legend(fontsize=8)
        ax = axes[r, 2]
        s = summ[summ["dataset"] == name]
        for (est, mult), style in ((("dol", 1.0), "C1o--"), (("cdol", 1.0), "C3s-."), (("cdol", 4.0), "C0o-"),
                                   (("cdol", 16.0), "C4^-"), (("snis", None), "C2v:"), (("cdol-nn", None), "ks-")):
            d = s[s["estimator"] == est]
            if est == "cdol":
                d = d[np.isclose(d["C_over_N_per_L"], mult)]
            lab = est if est != "cdol" else f"cdol C={mult:g}N/L"
            ax.plot(d["L"], d["max_abs_rel_error"], style, label=lab)
        ax.set(xscale="log", yscale="log", xlabel="subset size L", ylabel="max |relative error| over σ",
               title=f"{name}: worst error vs L")
        ax.set_xticks(Ls, [str(v) for v in Ls], minor=False)
        ax.set_xticks([], minor=True)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="results/estimator_bias", help="output folder")
    p.add_argument("--n-samples-factor", type=float, default=2.0, help="M = factor × N (the paper: 2–3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="digits only, fewer σ and L (a minute)")
    p.add_argument("--replot", action="store_true", help="redo summary + figure from --out's estimator_bias.csv")
    a = p.parse_args(argv)
    out = Path(a.out)
    table = pd.read_csv(out / "estimator_bias.csv") if a.replot else run(out, a.n_samples_factor, a.quick, a.seed)
    summ = summarise(table)
    summ.to_csv(out / "estimator_bias_summary.csv", index=False)
    figure(table, summ, out / "estimator_bias.png")
    with pd.option_context("display.width", 160, "display.max_rows", 200):
        print(summ.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"wrote {out / 'estimator_bias.csv'}, {out / 'estimator_bias_summary.csv'}, {out / 'estimator_bias.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
