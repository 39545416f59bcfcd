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

The figures are drawn in analysis.plots_sigma (over σ) and analysis.plots_scaling (against compute, and the scaling
step's tables); the diagnosis and weighting-study figures in analysis.plots_variants.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from analysis.plots_scaling import (
    plot_compute_optimal,
    plot_families,
    plot_forecast,
    plot_offset_profile,
    plot_residuals,
    plot_scaling,
)
from analysis.plots_sigma import plot_exponents_per_sigma, plot_gap_per_sigma, plot_jstar, plot_loss_per_sigma
from analysis.study_stats import pooled_fits
from study.integrity import IntegrityError, verify

FIGURES = ("jstar", "loss_per_sigma", "gap_per_sigma", "scaling", "exponents_per_sigma", "residuals")
STUDY_FIGURES = FIGURES + ("offset_profile", "compute_optimal", "forecast")  # from the scaling step's tables


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
