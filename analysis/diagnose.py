"""Diagnosis: every variant in one coordinate system — VE-x0 — and its per-σ distance from J*.

Every model's denoiser already outputs x̂0 in VE coordinates (models.denoiser), so the evaluation CSVs of
analysis/evaluate.py (one per snapshot, on the study's fixed (x0, σ, ε) triples) hold for each σ the model's
x0-loss L(σ), the optimal loss J*(σ) on the same triples, and the excess E‖Dθ − D*‖² = L − J* (estimated directly,
never negative).  This module turns them into

  diagnose          per variant: where the gap peaks (absolute, and relative to J*), the total excess under two
                    variant-independent weightings, a figure of the gap curves (analysis.plots_variants), a table,
                    and a markdown summary.
The schedule study (analysis/weighting_study.py) builds on the same per-σ tables and totals.

Totals.  The variants train under different σ-weightings, so their own "training" totals are not comparable.
Two common ones are reported: `excess_logsigma`, the mean of the excess over ln σ on the evaluation grid
(trapezoid rule; every e-fold of σ counts the same), and `excess_edm`, the excess under EDM's training weighting
(ln σ ~ N(−1.2, 1.2²), λ = 1/c_out², σ_data = 0.5) — the loss an EDM model would report.

CLI:
  python -m analysis.diagnose diagnose --eval M1.csv M2.csv … --meta models.json --jstar jstar.csv \
      --out diagnosis.csv --summary diagnosis_summary.csv --markdown diagnosis.md --figure gap.png
models.json maps model → {"variant": …, …} (written by the workflow from the config).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.collect_losses import read_eval_csv
from analysis.eval_set import total_weights, trapezoid_log_weights, variant_fns
from analysis.output_files import write_csv, write_text
from analysis.plots_variants import plot_diagnosis
from models.diffusion import get_variant
from models.loss_weighting import find_sigma_star, jstar_points

PER_SIGMA = ["sigma", "n", "loss", "loss_stderr", "optimal_loss", "excess", "excess_stderr", "gap", "gap_stderr"]


# --------------------------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------------------------

def read_eval(csv) -> pd.DataFrame:
    """The per-σ rows (ascending σ) of one evaluation CSV (analysis.collect_losses.read_eval_csv, checked)."""
    path = Path(csv)
    df = read_eval_csv(path)  # checked against its checksum and validated (one error naming a bad file)
    missing = set(PER_SIGMA) - set(df.columns)
    if missing:
        raise ValueError(f"{path}: missing columns {sorted(missing)}")
    rows = df[df["sigma"].notna()].sort_values("sigma").reset_index(drop=True)
    keep = [c for c in ("model", "images_seen", "flops", "params") if c in df.columns]
    return rows[keep + PER_SIGMA]


def read_meta(path_or_dict) -> dict:
    if isinstance(path_or_dict, dict):
        return path_or_dict
    path = Path(path_or_dict)
    if not path.exists():
        raise FileNotFoundError(f"model table not found: {path}")
    return json.loads(path.read_text())


def sigma_star_of(jstar_csv) -> float:
    """σ* of the study's J* curve, by the schedule's rule (models.loss_weighting.find_sigma_star, default settings)."""
    return find_sigma_star(*jstar_points(jstar_csv))


# --------------------------------------------------------------------------------------------------------------
# summaries of one gap curve
# --------------------------------------------------------------------------------------------------------------

def log_sigma_mean(sigma, values) -> float:
    """Trapezoid mean of `values` over ln σ on the (ascending) grid; the value itself for one σ."""
    q = trapezoid_log_weights(sigma)  # the study's one quadrature in ln σ
    return float(np.sum(q * np.asarray(values, np.float64)) / q.sum())


def edm_weighted(sigma, values, variant=None) -> float:
    """Σ_k c_k v_k under a variant's training density and weight (EDM's by default): the rule of
    analysis.eval_set.total_weights, whose trapezoid in ln σ and weights this reuses."""
    density, weight = variant_fns(variant if variant is not None else get_variant("edm"))
    s = np.asarray(sigma, np.float64)
    return float(np.sum(total_weights(s, density, weight) * np.asarray(values, np.float64)))


def local_peaks(sigma, values) -> list[tuple[float, float]]:
    """(σ, value) of every local maximum of a curve on its grid (end points count when higher than their one
    neighbour), highest first."""
    v = np.asarray(values, np.float64)
    s = np.asarray(sigma, np.float64)
    if v.size == 1:
        return [(float(s[0]), float(v[0]))]
    left = np.r_[-np.inf, v[:-1]]
    right = np.r_[v[1:], -np.inf]
    idx = np.nonzero((v > left) & (v >= right))[0]
    return sorted(((float(s[k]), float(v[k])) for k in idx), key=lambda p: -p[1])


def gap_summary(table: pd.DataFrame) -> dict:
    """Peak of the excess (absolute; every local peak; relative to J* where J* ≥ 1 % of its largest value — below
    that the ratio divides by ~0) and the two common totals, for one per-σ table."""
    s = table["sigma"].to_numpy(np.float64)
    ex = table["excess"].to_numpy(np.float64)
    j = table["optimal_loss"].to_numpy(np.float64)
    k = int(np.argmax(ex))
    ok = j >= 0.01 * j.max()
    rel = np.where(ok, ex / np.where(ok, j, 1.0), -np.inf)
    kr = int(np.argmax(rel))
    peaks = local_peaks(s, ex)
    return {"peak_sigma": float(s[k]), "peak_excess": float(ex[k]), "peak_excess_stderr":
            float(table["excess_stderr"].iloc[k]),
            "local_peaks": "; ".join(f"{ps:.3g} ({pv:.3g})" for ps, pv in peaks),
            "peak_relative_sigma": float(s[kr]), "peak_relative_excess": float(rel[kr]),
            "excess_logsigma": log_sigma_mean(s, ex), "excess_edm": edm_weighted(s, ex),
            "loss_logsigma": log_sigma_mean(s, table["loss"]), "optimal_loss_logsigma": log_sigma_mean(s, j)}


# --------------------------------------------------------------------------------------------------------------
# the diagnosis study
# --------------------------------------------------------------------------------------------------------------

def diagnose(eval_csvs, meta, jstar_csv=None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per-σ long table, one summary row per model) for the diagnosis study."""
    meta = read_meta(meta)
    long, summary = [], []
    for csv in eval_csvs:
        t = read_eval(csv)
        model = str(t["model"].iloc[0]) if "model" in t.columns else Path(csv).parent.name
        info = meta.get(model, {})
        t = t.assign(model=model, variant=info.get("variant", "?"),
                     relative_excess=t["excess"] / t["optimal_loss"].clip(lower=1e-300))
        long.append(t)
        summary.append({"model": model, "variant": info.get("variant", "?"),
                        "images_seen": int(t["images_seen"].iloc[0]) if "images_seen" in t else None,
                        "flops": float(t["flops"].iloc[0]) if "flops" in t else None, **gap_summary(t)})
    long_df = pd.concat(long, ignore_index=True)
    cols = ["model", "variant"] + [c for c in long_df.columns if c not in ("model", "variant")]
    summ = pd.DataFrame(summary)
    if jstar_csv is not None:
        summ["sigma_star"] = sigma_star_of(jstar_csv)
    return long_df[cols], summ


def diagnosis_markdown(summary: pd.DataFrame) -> str:
    lines = ["# Diagnosis: per-σ gap J_σ(θ) − J*_σ of each variant (VE-x0 coordinates, equal compute)", ""]
    if "sigma_star" in summary:
        lines += [f"σ* of the J* curve (J* reaches 1 % of the data variance): {summary['sigma_star'].iloc[0]:.3g}",
                  ""]
    lines += ["| model | variant | peak σ (excess) | peak excess | local peaks σ (excess) | peak σ (excess/J*, "
              "J* ≥ 1 % Var) | peak excess/J* | excess, mean over ln σ | excess, EDM weighting |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in summary.itertuples():
        lines.append(f"| {r.model} | {r.variant} | {r.peak_sigma:.3g} | {r.peak_excess:.4g} ± "
                     f"{r.peak_excess_stderr:.2g} | {r.local_peaks} | {r.peak_relative_sigma:.3g} | {r.peak_relative_excess:.3g} | "
                     f"{r.excess_logsigma:.4g} | {r.excess_edm:.4g} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------

def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m analysis.diagnose", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("diagnose",):
        p = sub.add_parser(name)
        p.add_argument("--eval", nargs="+", required=True, help="evaluation CSVs (one per model, final snapshot)")
        p.add_argument("--meta", required=True, help="models.json: model → {variant, schedule, seed}")
        p.add_argument("--jstar", default=None, help="optimal_loss/jstar.csv (for σ* and the J* curve)")
        p.add_argument("--out", required=True)
        p.add_argument("--summary", required=True)
        p.add_argument("--markdown", required=True)
        p.add_argument("--figure", required=True)
    args = ap.parse_args(argv)
    s_star = sigma_star_of(args.jstar) if args.jstar else None
    long_df, summ = diagnose(args.eval, args.meta, args.jstar)
    write_csv(long_df, args.out)
    write_csv(summ, args.summary)
    write_text(diagnosis_markdown(summ), args.markdown)
    plot_diagnosis(long_df, args.jstar, args.figure, s_star)
    print(diagnosis_markdown(summ))


if __name__ == "__main__":
    main()
