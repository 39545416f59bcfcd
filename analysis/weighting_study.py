"""Schedule study: the optimal-loss schedule against each variant's own ("baseline") schedule, arm by arm, over seeds.

An *arm* is one training recipe run with several seeds: (arch, variant, logvar, schedule, schedule settings).  Its
name is the model name without the trailing `_s<seed>` (`edm_ol_s2` → arm `edm_ol`).  For every arm and measure —
the per-σ gap J_σ(θ) − J*_σ on the evaluation grid, its totals (`excess`: mean over ln σ; `excess_edm`: under
EDM's training weighting; analysis.diagnose.gap_summary) and the classifier-feature Fréchet distance `fd_classifier`
of Heun samples (analysis.sample_quality) — the table holds the mean and sd over seeds and, for every arm that is
not a baseline, the *paired* difference arm − baseline: the baseline is the one arm with schedule `baseline` and the
same (arch, variant, logvar), paired by seed (same seed = same initialisation and data order), with a 95 %
t-interval over the pairs (mean ± t_{0.975, n−1}·sd/√n; needs ≥ 2 pairs).

CLI (the workflow's schedule_comparison rule):
  python -m analysis.weighting_study --eval M1.csv … --scores S1.json … --meta models.json --jstar jstar.csv \
      --models schedule_models.csv --out schedule_comparison.csv --markdown schedule_comparison.md --figure F.png
models.json maps model → {variant, schedule, seed, arch, logvar, schedule_kwargs} (written by the workflow).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from analysis.diagnose import gap_summary, read_eval, read_meta, sigma_star_of
from analysis.output_files import write_csv, write_text
from analysis.plots_variants import plot_comparison
from analysis.weighting_arms import ARM_KEYS, GROUP_KEYS, arm_of

TOTALS = ["excess", "excess_edm", "fd_classifier"]  # the per-model totals; per σ: "excess"


# --------------------------------------------------------------------------------------------------------------
# per model
# --------------------------------------------------------------------------------------------------------------

def model_rows(eval_csvs, score_jsons, meta) -> pd.DataFrame:
    """One row per (model, σ) with the excess, plus one totals row per model (σ = NaN) with the three totals."""
    meta = read_meta(meta)
    scores = {}
    for js in score_jsons:
        d = json.loads(Path(js).read_text())
        scores[str(d.get("model") or Path(js).stem)] = d
    rows = []
    for csv in eval_csvs:
        t = read_eval(csv)
        model = str(t["model"].iloc[0]) if "model" in t.columns else Path(csv).parent.name
        info = meta.get(model)
        if info is None:
            raise ValueError(f"model {model!r} of {csv} is not in the model table")
        if model not in scores:
            raise ValueError(f"model {model!r} has no sample-quality JSON among --scores")
        kw = info.get("schedule_kwargs") or {}
        base = {"model": model, "arm": arm_of(model), "arch": info.get("arch", "?"), "variant": info["variant"],
                "logvar": bool(info.get("logvar", True)), "schedule": info["schedule"],
                "schedule_kwargs": json.dumps(kw, sort_keys=True) if kw else "", "seed": int(info["seed"])}
        for r in t.itertuples():
            rows.append({**base, "sigma": r.sigma, "loss": r.loss, "optimal_loss": r.optimal_loss,
                         "excess": r.excess, "excess_stderr": r.excess_stderr})
        g = gap_summary(t)
        sc = scores[model]
        rows.append({**base, "sigma": math.nan, "loss": g["loss_logsigma"], "optimal_loss": g["optimal_loss_logsigma"],
                     "excess": g["excess_logsigma"], "excess_edm": g["excess_edm"], "peak_sigma": g["peak_sigma"],
                     "fd_classifier": sc.get("fd_classifier", math.nan),
                     "fd_split_floor": sc.get("fd_classifier_split_floor", math.nan),
                     "fid_inception": sc.get("fid_inception", math.nan)})
    df = pd.DataFrame(rows)
    dup = df[df["sigma"].isna()].duplicated(["arm", "seed"])
    if dup.any():
        bad = df[df["sigma"].isna()][dup][["arm", "seed"]].to_dict("records")
        raise ValueError(f"two models share an arm and a seed: {bad} (name the seeds _s0, _s1, …)")
    return df


# --------------------------------------------------------------------------------------------------------------
# over seeds
# --------------------------------------------------------------------------------------------------------------

def t_interval(values, level: float = 0.95) -> tuple[float, float, float, float]:
    """(mean, sd, lo, hi) of `values`: the t-interval mean ± t_{(1+level)/2, n−1}·sd/√n; sd and the interval are
    NaN for fewer than two values."""
    x = np.asarray(values, np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return math.nan, math.nan, math.nan, math.nan
    m = float(x.mean())
    if x.size < 2:
        return m, math.nan, math.nan, math.nan
    sd = float(x.std(ddof=1))
    h = float(stats.t.ppf(0.5 + level / 2, x.size - 1)) * sd / math.sqrt(x.size)
    return m, sd, m - h, m + h


def _measure_long(models: pd.DataFrame) -> pd.DataFrame:
    """models → long rows (ARM_KEYS…, seed, measure, sigma, value): the per-σ excess and the totals."""
    per_sigma = models[models["sigma"].notna()].assign(measure="excess", value=lambda d: d["excess"])
    totals = models[models["sigma"].isna()]
    parts = [per_sigma[ARM_KEYS + ["seed", "measure", "sigma", "value"]]]
    for k in TOTALS:
        parts.append(totals.assign(measure=k, value=totals[k])[ARM_KEYS + ["seed", "measure", "sigma", "value"]])
    return pd.concat(parts, ignore_index=True)


def compare_arms(models: pd.DataFrame, level: float = 0.95) -> pd.DataFrame:
    """One row per (arm, measure, σ): seeds, mean, sd over seeds; for non-baseline arms the paired difference
    arm − baseline (`pairs`, `diff`, `diff_lo`, `diff_hi`, `rel_diff` = diff / baseline mean over the same seeds).
    σ is NaN for the totals."""
    long = _measure_long(models)
    long["sigma_key"] = long["sigma"].fillna(-1.0)
    arms = long[ARM_KEYS].drop_duplicates()
    baselines = {}
    for key, g in arms[arms["schedule"] == "baseline"].groupby(GROUP_KEYS):
        if len(g) > 1:
            raise ValueError(f"more than one baseline arm for {dict(zip(GROUP_KEYS, key))}: {sorted(g['arm'])}")
        baselines[key] = g["arm"].iloc[0]
    out = []
    for (arm, measure, sk), g in long.groupby(["arm", "measure", "sigma_key"], sort=False):
        first = g.iloc[0]
        mean, sd, _, _ = t_interval(g["value"], level)
        rec = {**{k: first[k] for k in ARM_KEYS}, "measure": measure, "sigma": first["sigma"],
               "seeds": int(g["value"].notna().sum()), "mean": mean, "sd": sd}
        base = baselines.get(tuple(first[k] for k in GROUP_KEYS))
        if first["schedule"] != "baseline" and base is not None:
            b = long[(long["arm"] == base) & (long["measure"] == measure) & (long["sigma_key"] == sk)]
            paired = g.set_index("seed")["value"].to_frame("arm").join(b.set_index("seed")["value"].rename("base"),
                                                                       how="inner").dropna()
            d, _, lo, hi = t_interval(paired["arm"] - paired["base"], level)
            rec.update(baseline=base, pairs=len(paired), diff=d, diff_lo=lo, diff_hi=hi,
                       rel_diff=d / paired["base"].mean() if len(paired) else math.nan)
        out.append(rec)
    res = pd.DataFrame(out)
    for c in ("baseline", "pairs", "diff", "diff_lo", "diff_hi", "rel_diff"):
        if c not in res:
            res[c] = math.nan
    return res


# --------------------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------------------

def _ms(m, s, digits=4):
    return f"{m:.{digits}g} ± {s:.2g}" if np.isfinite(s) else f"{m:.{digits}g}"


def _diff(r):
    if not np.isfinite(r["diff"]):
        return "—"
    ci = f" [{r['diff_lo']:+.3g}, {r['diff_hi']:+.3g}]" if np.isfinite(r["diff_lo"]) else ""
    return f"{r['diff']:+.3g}{ci} ({r['rel_diff']:+.0%})"


def _setting(r):
    kw = json.loads(r["schedule_kwargs"]) if r["schedule_kwargs"] else {}
    kw.pop("warmup_samples", None)   # the same for every optimal-loss arm of a study
    return ", ".join(f"{k}={v}" for k, v in sorted(kw.items())) or ("default" if r["schedule"] != "baseline" else "")


def comparison_markdown(comp: pd.DataFrame, level: float = 0.95) -> str:
    pct = f"{level:.0%}"
    lines = ["# Baseline vs optimal-loss schedule (equal compute per arch)", "",
             "excess = mean over ln σ of J_σ(θ) − J*_σ on the evaluation grid; excess (EDM wt.) = the same under "
             "EDM's training weighting; FD = Fréchet distance of Heun samples to the training set in the feature "
             f"space of the study's digit classifier.  mean ± sd over seeds; Δ = arm − its baseline (same arch, "
             f"variant and logvar), paired by seed, with a {pct} t-interval over the pairs and the relative change. "
             "Negative Δ = closer to J* / better samples.", "",
             "| arm | arch | variant | logvar | schedule | setting | seeds | excess | Δ excess | excess (EDM wt.) "
             "| Δ excess (EDM wt.) | FD | Δ FD |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    tot = comp[comp["sigma"].isna()]
    for arm, g in tot.groupby("arm", sort=False):
        by = {r["measure"]: r for _, r in g.iterrows()}
        r0 = by["excess"]
        cells = []
        for k in TOTALS:
            cells += [_ms(by[k]["mean"], by[k]["sd"]), _diff(by[k])]
        lines.append(f"| {arm} | {r0['arch']} | {r0['variant']} | {'on' if r0['logvar'] else 'off'} | "
                     f"{r0['schedule']} | {_setting(r0)} | {int(r0['seeds'])} | " + " | ".join(cells) + " |")
    per = comp[comp["sigma"].notna() & comp["diff"].notna()]
    if not per.empty:
        lines += ["", f"Per-σ gap: Δ excess = arm − its baseline, paired by seed ({pct} t-interval; relative to "
                  "the baseline's mean excess at that σ):", ""]
        arms = list(dict.fromkeys(per["arm"]))
        lines += ["| σ | " + " | ".join(arms) + " |", "|---|" + "---|" * len(arms)]
        for s in sorted(per["sigma"].unique()):
            cells = []
            for a in arms:
                r = per[(per["arm"] == a) & (per["sigma"] == s)]
                cells.append(_diff(r.iloc[0]) if len(r) else "")
            lines.append(f"| {s:.3g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m analysis.weighting_study", description=__doc__.split("\n\n")[0])
    ap.add_argument("--eval", nargs="+", required=True, help="evaluation CSVs (one per model, final snapshot)")
    ap.add_argument("--scores", nargs="+", required=True, help="sample-quality JSONs (one per model)")
    ap.add_argument("--meta", required=True, help="models.json (model → variant, schedule, seed, arch, logvar, …)")
    ap.add_argument("--jstar", default=None, help="optimal_loss/jstar.csv (σ* for the figure)")
    ap.add_argument("--models", required=True, help="out: per-model per-σ rows and totals")
    ap.add_argument("--out", required=True, help="out: per-arm means, sds and paired differences")
    ap.add_argument("--markdown", required=True)
    ap.add_argument("--figure", required=True)
    args = ap.parse_args(argv)
    models = model_rows(args.eval, args.scores, args.meta)
    comp = compare_arms(models)
    write_csv(models, args.models)
    write_csv(comp, args.out)
    md = comparison_markdown(comp)
    write_text(md, args.markdown)
    plot_comparison(models, args.figure, sigma_star_of(args.jstar) if args.jstar else None)
    print(md)


if __name__ == "__main__":
    main()
