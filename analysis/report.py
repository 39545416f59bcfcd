"""exponents.md: a study's verdict and fits as one readable page, from the analysis tables (nothing is computed here
that the tables do not hold).

Order: the verdict by forecasting, L − J* against L (ρ, extrapolation, the free offset against what a J* floor
implies), the total-loss fits, the compute-optimal law, the per-σ tables; a multi-family study gets its families
section first. Brackets are the total 95% interval (the headline); "eval. only" is the evaluation noise alone.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from analysis.forecast import LAW_LABELS
from analysis.study_stats import IDENTICAL_JSTAR, MIN_POINTS_FOR_INTERVAL, POOLED, PRACTICAL_FRACTION


def fmt(v, spec=".4g") -> str:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return str(v)
    return "—" if not math.isfinite(v) else format(v, spec)


def with_ci(row, key, spec=".4g", which="") -> str:
    """"estimate [lo, hi]" of the total interval (which="") or the evaluation-only one (which="eval")."""
    tag = f"_{which}_ci" if which else "_ci"
    lo, hi = row.get(f"{key}{tag}_lo", math.nan), row.get(f"{key}{tag}_hi", math.nan)
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return fmt(row.get(key), spec)
    return f"{fmt(row[key], spec)} [{fmt(lo, spec)}, {fmt(hi, spec)}]"


def floor_ci(row, key, at_bound, spec=".4g") -> str:
    """A floor or free offset with its interval, or "at bound" where the fit put it at 0 or at the smallest loss
    (never "0 [0, 0]"); an end clipped to the feasible set is noted in the table's note column."""
    if at_bound:
        v = float(row.get(key, math.nan))
        return "at bound (0)" if v <= 0 else f"at bound ({fmt(v, spec)} = the smallest loss)"
    return with_ci(row, key, spec)


def eval_ci(row, key, spec=".4g") -> str:
    lo, hi = row.get(f"{key}_eval_ci_lo", math.nan), row.get(f"{key}_eval_ci_hi", math.nan)
    return "—" if not (np.isfinite(lo) and np.isfinite(hi)) else f"[{fmt(lo, spec)}, {fmt(hi, spec)}]"


def md_table(header, rows) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(r) + " |" for r in rows])


def verdict_counts(verdict: pd.DataFrame, axis: str, column: str = "verdict_rho") -> dict:
    """The per-σ verdicts (on ρ, or ``column``) of one axis, counted (docs/results.md quotes these numbers)."""
    per = verdict[(verdict["axis"] == axis) & verdict["sigma"].notna()]
    return per[column].value_counts().to_dict()


# the four classes every per-σ count shows (zeros included): a difference below the practical threshold is no
# difference; "identical" is the one threshold of study_stats.IDENTICAL_JSTAR
_COUNT_CLASSES = {"better": ("better",), "no difference": ("no difference at 95%", "no practical difference"),
                  "worse": ("worse",), "identical (J* ≈ 0)": ("identical fits (J* ≈ 0)",), "no interval": ("no interval",)}


def _counts_sentence(counts: dict) -> str:
    out = [f"{sum(counts.get(v, 0) for v in verdicts)} {name}" for name, verdicts in _COUNT_CLASSES.items()
           if name != "no interval" or counts.get("no interval")]
    return " / ".join(out)


def _intervals_text(n_replicates: int, n_jackknife: int, seeds: bool) -> str:
    if not n_replicates:
        return "No intervals: this table was fitted without the per-triple errors."
    seed = ("; where a size has several seed runs, the runs are resampled too" if seeds else "")
    jk = (f" widened by leaving out each of the {n_jackknife} models in turn (the jackknife, which sees a model's "
          "seed and its misfit — the snapshots of one run are not independent evidence)" if n_jackknife else "")
    return (f"Brackets are total 95% intervals: {n_replicates} bootstrap replicates of the evaluation triples "
            f"(resampled within each σ, shared by all snapshots, the frontier re-chosen in each){seed},{jk}; "
            "they always contain every leave-one-model-out value. \"eval. only\" is the evaluation noise alone "
            "(basic bootstrap). ρ's intervals are built on Fisher's z and end at 1: every noise only lowers ρ, and with "
            "one run per size seed noise and misfit cannot be told apart. Fits with fewer than "
            f"{MIN_POINTS_FOR_INTERVAL} points get none.")


def _forecast_section(forecast: dict) -> list[str]:
    table, info = forecast["forecast.csv"], forecast["information.csv"]
    parts = ["## The verdict by forecasting", "",
             "Rolling origin: fit every law on the smaller sizes, predict every snapshot of the next larger one; "
             "error = mean |ln L̂ − ln L| over the held-out points (≈ relative error), then the mean over the "
             "splits. The laws in compute C describe the frontier, so all six are scored on the held-out snapshots "
             "that extend it; the joint laws also on every held-out snapshot.", ""]
    parts += [f"- {s}" for s in forecast["verdict"]] + [""]
    if "error" in table and table["error"].notna().any():
        split_ids = [s for s in table["split"].unique() if s != "mean"]
        held = {s: table[table["split"] == s]["held_out_model"].iloc[0] for s in split_ids}
        rows = []
        for (law, points), g in table.groupby(["law", "points"], sort=False):
            mean = g[g["split"] == "mean"].iloc[0]
            per = [fmt(g[g["split"] == s]["error"].iloc[0], ".3g") for s in split_ids]
            rows.append([law, LAW_LABELS[law], points, with_ci(mean, "error", ".3g"), eval_ci(mean, "error", ".3g")]
                        + per)
        parts += [md_table(["law", "form", "points", "mean error", "eval. only"]
                           + [f"→ {held[s]}" for s in split_ids], rows), ""]
    pairs = forecast.get("forecast_pairs.csv")
    if pairs is not None and not pairs.empty:
        parts += ["Paired differences of the mean errors (law a − law b; negative: a forecasts better):", ""]
        rows = [[p["law_a"], p["law_b"], p["points"], str(p.get("n_points", "")), with_ci(p, "difference", ".2g"),
                 eval_ci(p, "difference", ".2g"), p["verdict"]] for _, p in pairs.iterrows()]
        parts += [md_table(["law a", "law b", "points", "held-out points", "difference", "eval. only", "verdict"],
                           rows), ""]
    if not info.empty:
        parts += ["Information criterion: each law fitted on all the data, the misfit modelled as a model effect "
                  "plus a snapshot effect (their sds by maximum likelihood), AICc compared within each data set:", ""]
        rows = [[r["law"], r["data"], str(int(r["n"])), fmt(r["delta_aicc"], ".3g"), fmt(r["rms_log_residual"], ".3g"),
                 fmt(r["sd_model"], ".3g"), fmt(r["sd_snapshot"], ".3g")] for _, r in info.iterrows()]
        parts += [md_table(["law", "data", "n", "ΔAICc", "rms log residual", "sd model", "sd snapshot"], rows), ""]
    return parts


def _verdict_sentence(v) -> str:
    what = "the total loss" if not np.isfinite(v["sigma"]) else f"σ = {fmt(v['sigma'])}"
    rho = {"better": "fits a power law better than L (higher ρ)", "worse": "fits a power law worse than L",
           "no difference at 95%": "fits a power law as well as L (no difference in ρ at 95%)",
           "no practical difference": "differs from L in ρ by less than the practical threshold",
           "identical fits (J* ≈ 0)": "is L (J* ≈ 0)", "no interval": "cannot be compared with L (no interval)"}
    ext = {"better": "extrapolates to the largest model better", "worse": "extrapolates to the largest model worse",
           "no difference at 95%": "extrapolates no better or worse (at 95%)",
           "no practical difference": "extrapolates within the practical threshold of L",
           "identical fits (J* ≈ 0)": "extrapolates as L does", "no interval": "has no extrapolation interval"}
    floor = {"consistent": "the free offset is consistent with the offset a J* floor implies on these points",
             "above": "the free offset lies above the offset a J* floor implies on these points — the data want a "
                      "higher floor than J*",
             "below": "the free offset lies below the offset a J* floor implies on these points",
             "no interval": "the free offset has no interval to compare",
             "free offset at a bound": "the free offset sits at a bound (0 or the smallest loss): the data do not "
                                       "place a floor",
             "total only": ""}[v["free_offset_vs_jstar_law"]]
    s = (f"For {what} against {v['axis']}, L − J* {rho[v['verdict_rho']]}: Δρ = {with_ci(v, 'delta_rho', '.3g')} "
         f"(practical threshold {fmt(v['rho_threshold'], '.2g')}); it {ext[v['verdict_extrap']]}: "
         f"Δ(extrapolation error) = {with_ci(v, 'delta_extrap', '.3g')}.")
    if floor:
        free = floor_ci(v, "free_offset", bool(v.get("free_offset_at_bound", False)))
        s += (f" {floor[0].upper() + floor[1:]}: free offset {free}, implied "
              f"{with_ci(v, 'implied_offset')}, J* = {fmt(v['optimal_loss'])}.")
    return s


def study_markdown(table: pd.DataFrame, verdict: pd.DataFrame, compute_optimal: pd.DataFrame | None = None,
                   forecast: dict | None = None, n_replicates: int = 0, n_jackknife: int = 0,
                   seeds: bool = False, opening: list | None = None, frontier_note: str = "",
                   ema: str | None = None, ema_exponents: pd.DataFrame | None = None) -> str:
    """exponents.md: the EMA its fits stand at, the forecast verdict, then L − J* against L, the total-loss fits
    (with an EMA sweep's exponents at the best and at a fixed EMA length), the compute-optimal law, and the per-σ
    tables."""
    parts = ["# Scaling exponents and the verdict on L − J*", ""] + ema_opening(ema) + list(opening or []) + [
             "Fits of log(y − c) = log A + k·log x by least squares (c = 0 for L, c = J* for L − J*, c = 0 for the "
             "directly measured excess E‖Dθ − D*‖²; the free offset fits c by relative least squares). "
             "compute: x = training FLOPs on the study's one frontier (snapshots whose total L beats every cheaper "
             "one), the same points for every σ; params: each model's final snapshot. " + frontier_note + "ρ = |Pearson r| of the "
             "log-log line. Extrapolation error: fit without the largest model, predict its points, mean "
             "|error| / L. " + _intervals_text(n_replicates, n_jackknife, seeds), ""]
    if forecast is not None:
        parts += _forecast_section(forecast)
    tot = verdict[verdict["sigma"].isna()]
    if not tot.empty:
        parts += ["## L − J* against L (total loss, training weighting)", ""]
        parts += [f"- {_verdict_sentence(v)}" for _, v in tot.iterrows()]
        parts += ["", "A difference counts when its interval excludes 0 and it removes at least "
                  f"{PRACTICAL_FRACTION:.0%} of L's own lack of fit (1 − ρ of L) or extrapolation error; where J* is "
                  f"below {IDENTICAL_JSTAR:g} of the smallest fitted loss the two fits are the same to rounding. "
                  "A steeper exponent after subtracting J* is not a finding by itself: d ln(L − J*)/d ln x = "
                  "L/(L − J*) · d ln L/d ln x (here the fitted exponents differ by a factor "
                  + ", ".join(f"{fmt(f, '.3g')} on {a}" for a, f in _steepening(table)) + "). The free offset is "
                  "compared with the offset a J* floor implies on the same points (the joint law with floor J*, fitted "
                  "to every snapshot and seen through the same free-offset fit): at a finite number of images the "
                  "asymptote in N is J* + B·D^−b, not J*. offset_profile.csv (figure offset_profile.png) shows ρ and "
                  "the extrapolation error for every subtracted constant.", ""]
    total = table[table["sigma"].isna()]
    if not total.empty:
        parts += ["## Total-loss fits", ""]
        rows = [[r["quantity"], r["axis"], with_ci(r, "exponent"), eval_ci(r, "exponent"), floor_ci(r, "offset", "at its bound" in str(r["note"])),
                 with_ci(r, "rho"), fmt(r["r2"]), with_ci(r, "extrapolation_error", ".3g"), str(int(r["n"])),
                 str(r["note"]) if isinstance(r["note"], str) else ""]
                for _, r in total.iterrows()]
        parts += [md_table(["quantity", "axis", "exponent", "eval. only", "offset", "ρ", "R²", "extrapolation error",
                            "n", "note"], rows), ""]
    if ema_exponents is not None:
        parts += ema_sweep_section(ema_exponents)
    if compute_optimal is not None and "E" in compute_optimal:
        parts += ["## Compute-optimal law L(N, D) = E + A/N^a + B/D^b (every snapshot; N params, D images)", "",
                  "N_opt ∝ C^(b/(a+b)), D_opt ∝ C^(a/(a+b)) for compute C ∝ N·D. floor = jstar fixes E to the "
                  "total J*; floor = free fits it. \"leave one out\": the N_opt exponent with each model left out.",
                  ""]
        rows = [[r["floor"], _joint_floor_text(r), with_ci(r, "a", ".3g"), with_ci(r, "b", ".3g"),
                 with_ci(r, "n_opt_exponent", ".3g"), eval_ci(r, "n_opt_exponent", ".3g"),
                 f"{fmt(r.get('n_opt_exponent_loo_min'), '.3g')} … {fmt(r.get('n_opt_exponent_loo_max'), '.3g')}",
                 with_ci(r, "d_opt_exponent", ".3g"), fmt(r.get("rmse_log"))]
                for _, r in compute_optimal.iterrows()]
        parts += [md_table(["floor", "E", "a", "b", "N_opt exponent", "eval. only", "leave one out", "D_opt exponent",
                            "rms log residual"], rows), ""]
    per = verdict[verdict["sigma"].notna()]
    for axis in per["axis"].unique():
        sub = per[per["axis"] == axis]
        parts += [f"## Per σ, x = {axis}", "",
                  "L − J* against L, paired, per σ: ρ " + _counts_sentence(verdict_counts(verdict, axis))
                  + "; extrapolation " + _counts_sentence(verdict_counts(verdict, axis, "verdict_extrap"))
                  + f" (identical: J* below {IDENTICAL_JSTAR:g} of the smallest fitted loss).", ""]
        rows = [[fmt(v["sigma"]), fmt(v["optimal_loss"]), fmt(v["rho_raw"]), fmt(v["rho_minus_jstar"]),
                 with_ci(v, "delta_rho", ".3g"), v["verdict_rho"], with_ci(v, "delta_extrap", ".3g"),
                 v["verdict_extrap"], floor_ci(v, "free_offset", bool(v.get("free_offset_at_bound", False)))]
                for _, v in sub.iterrows()]
        parts += [md_table(["σ", "J*", "ρ L", "ρ L − J*", "Δρ", "verdict", "Δ extrapolation", "verdict",
                            "free offset"], rows), ""]
    return "\n".join(parts)


def ema_opening(ema: str | None) -> list[str]:
    """exponents.md's line on the EMA every fit stands at (models.json's `ema` of the study's runs)."""
    if not ema:
        return []
    return [f"EMA: every fit below stands at the snapshots' own EMA weights — {ema}.", ""]


EMA_EXPONENT_ROWS = (("raw", "L"), ("minus_jstar", "L − J*"))
EMA_EXPONENT_COLUMNS = ("fixed", "best", "best - fixed")


def ema_exponents_table(exponents: pd.DataFrame, fixed_sigma_rel: float) -> list[str]:
    """The exponents of ema_exponents.csv (analysis.ema_sweep) as table lines: L and L − J* at the fixed σ_rel, at
    each model's best, and the difference, each with its 95% interval."""
    lines = [f"| quantity | at σ_rel {fixed_sigma_rel:g} | at each model's best | best − fixed |",
             "|---|---|---|---|"]
    for quantity, label in EMA_EXPONENT_ROWS:
        cells = []
        for ema in EMA_EXPONENT_COLUMNS:
            r = exponents[(exponents["quantity"] == quantity) & (exponents["ema"] == ema)].iloc[0]
            cells.append(f"{r['exponent']:.4f} [{r['ci_lo']:.4f}, {r['ci_hi']:.4f}]")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def ema_sweep_section(exponents: pd.DataFrame) -> list[str]:
    """exponents.md's section from ema_exponents.csv: the exponents against parameters at each model's best EMA
    length and at a fixed one, side by side (an empty table: fewer than two models, none to fit)."""
    parts = ["## Exponents at each model's best EMA length (ema_exponents.csv)", ""]
    if exponents.empty:
        return parts + ["Fewer than two models: no exponents against parameters from the EMA sweep.", ""]
    fixed = float(exponents["fixed_sigma_rel"].iloc[0])
    return parts + [
        "Each model's final snapshot rebuilt post hoc at a grid of EMA lengths σ_rel; its best length chosen on one "
        "half of the evaluation triples, every loss here measured on the other half. Pure power laws against "
        f"parameters over the final snapshots, at σ_rel {fixed:g} for every model and at each model's best; 95% "
        "intervals: basic bootstrap of the evaluation triples, paired (evaluation noise only, no jackknife), so "
        "these are not the fits above. An interval of best − fixed that excludes 0 says the fixed EMA length "
        "tilts the exponent (ema_sweep.md: each model's best length).", ""] + ema_exponents_table(
            exponents, fixed) + [""]


def _joint_floor_text(r) -> str:
    """E of the compute-optimal law: J* with its evaluation noise (fixed, not fitted), or the free floor (at bound
    when the data drive it to 0)."""
    if r["floor"] == "jstar":
        return f"J* = {fmt(r['E'])} (J*'s evaluation noise {eval_ci(r, 'E')})"
    return floor_ci(r, "E", not r["E"] > 0)


def _steepening(table: pd.DataFrame):
    """Exponent of L − J* over exponent of L for the total, per axis (≈ the mean L/(L − J*) of the points)."""
    out = []
    for axis in table["axis"].unique():
        raw = table[(table["axis"] == axis) & (table["quantity"] == "raw") & table["sigma"].isna()]
        mj = table[(table["axis"] == axis) & (table["quantity"] == "minus_jstar") & table["sigma"].isna()]
        if raw.empty or mj.empty or not np.isfinite(raw["exponent"].iloc[0]):
            continue
        out.append((axis, mj["exponent"].iloc[0] / raw["exponent"].iloc[0]))
    return out


def families_markdown(grouped_table: pd.DataFrame, differences: pd.DataFrame) -> str:
    """The families section of exponents.md: each family's total-loss exponents and their paired differences."""
    fams = [g for g in grouped_table["group"].unique() if g != POOLED]
    total = grouped_table[grouped_table["sigma"].isna() & grouped_table["group"].isin(fams)
                          & grouped_table["quantity"].isin(["raw", "minus_jstar", "excess"])]
    rows = [[r["group"], r["quantity"], r["axis"], with_ci(r, "exponent"), eval_ci(r, "exponent"), with_ci(r, "rho"),
             str(int(r["n"])), str(r["note"]) if isinstance(r["note"], str) else ""] for _, r in total.iterrows()]
    diff_rows = [[f"{d['family_a']} − {d['family_b']}", d["quantity"], d["axis"], with_ci(d, "difference", ".3g"),
                  eval_ci(d, "difference", ".3g"), d["verdict"]] for _, d in differences.iterrows()]
    return "\n".join([
        "# Architecture families", "",
        f"Families: {', '.join(fams)}. Each family is fitted on its own models (its own compute frontier, chosen "
        "on its total L); differences are paired on the same replicates of the evaluation set, and their total "
        "interval adds leaving out each model of either family.", "",
        md_table(["family", "quantity", "axis", "exponent", "eval. only", "ρ", "n", "note"], rows), "",
        "## Differences of exponents (total loss)", "",
        md_table(["families", "quantity", "axis", "difference", "eval. only", "verdict"], diff_rows), ""])
