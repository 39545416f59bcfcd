"""A study's statistics step and its CLI: every table of the analysis folder from losses.csv and per_triple.npz; and
the single-fit interface (defined in analysis.single_fits; the fitters themselves are below).

Modules of the statistics, each the one owner of its piece:
    analysis.power_laws      the power-law fitters (fixed and free offset), every row at once
    analysis.joint_law       the joint law L(N, D) and its solvers, every row at once
    analysis.joint_fits      the joint law's starts and its refits of many rows from one optimum
    analysis.single_fits     one data set, one fit: fit_power_law, fit_chinchilla, fit_compute_optimal
    analysis.frontier        which snapshots a fit uses (the compute frontier, final snapshots)
    analysis.resample        the study's rows: evaluation triples, seed runs, models left out
    analysis.intervals       rows → intervals (evaluation noise only, and the total)
    analysis.study_stats     exponents.csv, verdict.csv, offset_profile.csv, family_differences.csv
    analysis.compute_optimal compute_optimal.csv
    analysis.forecast        forecast.csv, forecast_pairs.csv, forecast_points.csv, information.csv
    analysis.report          exponents.md

Public interface:
- ``fit_power_law(x, y, *, offset=0.0 | "free")`` → y = offset + prefactor·x^exponent (defined in analysis.single_fits)
- ``fit_chinchilla(params, tokens, loss, *, drop_highest=0)`` → L = E + A/N^α + B/D^β (defined in analysis.single_fits)
- ``fit_table`` (point estimates from losses.csv alone) and ``study_outputs`` (the whole analysis folder) for the
  study DAG.

CLI::

    python -m analysis.scaling --losses losses.csv --per-triple per_triple.npz --out-dir analysis/ \
        [--models models.json] [--n-replicates 1000] [--ema-exponents ema_exponents.csv]
    python -m analysis.scaling chinchilla --csv FILE --drop-highest 5 [--n-bootstrap 0]   (any table, runs, predictions:
        python -m analysis.fit_law, docs/fit-your-own-table.md)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import pandas as pd

from analysis import floor_profile, forecast, report, study_stats
from analysis.compute_optimal import compute_optimal_table
from analysis.resample import check_same_numbers, load_per_triple, replicates, replicates_from_losses
from analysis.single_fits import fit_chinchilla, fit_power_law  # fit_power_law: this module's documented interface
from analysis.study_stats import POOLED, model_families, pooled_fits
from study.atomic import atomic_path
from study.integrity import IntegrityError
from study.tables import read_losses

__all__ = ["fit_power_law", "fit_chinchilla", "fit_table", "study_outputs", "main"]

LOSSES_COLUMNS = ("model", "params", "images_seen", "flops", "sigma", "loss", "optimal_loss")
STUDY_OUTPUTS = ("exponents.csv", "exponents.md", "verdict.csv", "offset_profile.csv", "compute_optimal.csv",
                 "forecast.csv", "forecast_pairs.csv", "forecast_points.csv", "information.csv", "floor_profile.csv",
                 "joint_floor.csv")


def _check_losses(df: pd.DataFrame) -> None:
    missing = [c for c in LOSSES_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"losses table is missing columns {missing}; has {list(df.columns)}")
    sig = pd.to_numeric(df["sigma"], errors="coerce")
    if "weighting" in df.columns and df.loc[sig.isna(), "weighting"].nunique() > 1:
        # totals under different weightings are different quantities; fitting them together would mix them
        raise ValueError(f"total rows (sigma empty) come in several weightings "
                         f"{sorted(df.loc[sig.isna(), 'weighting'].unique())}; keep one before fitting")


def fit_table(df: pd.DataFrame, *, quantities=None, axes=None, sizes: dict | None = None) -> pd.DataFrame:
    """The study's fit table (analysis.study_stats.study_table) from a tidy losses table alone: point estimates,
    no intervals (those need the per-triple errors; see ``study_outputs``)."""
    _check_losses(df)
    return study_stats.study_table(replicates_from_losses(df, sizes), quantities=quantities or study_stats.QUANTITIES,
                                   axes=axes or study_stats.AXES)


def seed_sizes(models: dict | None) -> dict | None:
    """run → size from models.json (each run's `size`: the model-table entry its seed runs expand from)."""
    if not models:
        return None
    return {run: meta.get("size", run) for run, meta in models.items()}


def ema_labels(models: dict | None) -> dict | None:
    """run → the EMA its snapshots are evaluated at, in words (models.json's `ema`), where models.json says."""
    labels = {run: meta["ema"] for run, meta in (models or {}).items() if meta.get("ema")}
    return labels or None


def study_ema(runs, labels: dict | None) -> str:
    """The EMA a set of runs' fits stand at: one label, or each label with its runs where they differ; "unknown"
    without models.json's labels."""
    by_label = {}
    for run in dict.fromkeys(runs):
        by_label.setdefault((labels or {}).get(run, "unknown"), []).append(str(run))
    if len(by_label) == 1:
        return next(iter(by_label))
    return "; ".join(f"{label} ({', '.join(rs)})" for label, rs in by_label.items())


EMA_EXPONENTS_COLUMNS = ("quantity", "ema", "fixed_sigma_rel", "exponent", "ci_lo", "ci_hi")


def read_ema_exponents(path) -> pd.DataFrame:
    """ema_exponents.csv (analysis.ema_sweep), checked: its columns, and every (quantity, ema) row exponents.md
    shows unless it is empty (fewer than two models)."""
    table = pd.read_csv(path)
    missing = [c for c in EMA_EXPONENTS_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"{path}: not an ema_exponents table (missing columns {missing})")
    have = set(zip(table["quantity"], table["ema"]))
    absent = [(q, e) for q, _ in report.EMA_EXPONENT_ROWS for e in report.EMA_EXPONENT_COLUMNS if (q, e) not in have]
    if len(table) and absent:
        raise ValueError(f"{path}: no row for (quantity, ema) {absent}; `snakemake --forcerun ema_sweep` rebuilds it")
    return table


def with_ema_column(exponents: pd.DataFrame, family_of: dict, labels: dict | None) -> pd.DataFrame:
    """exponents.csv with its last column `ema`: the EMA of the runs each row's fit stands on (a family's rows:
    that family's runs)."""
    out = exponents.assign(ema=study_ema(family_of, labels))
    for group in out["group"].unique() if "group" in out else []:
        if group != POOLED:
            runs = [run for run, family in family_of.items() if family == group]
            out.loc[out["group"] == group, "ema"] = study_ema(runs, labels)
    return out


def study_outputs(losses: pd.DataFrame, per_triple: dict | None, out_dir, *, n_replicates: int = 1000,
                  seed: int = 0, sizes: dict | None = None, frontier: str = "all", ema: dict | None = None,
                  ema_exponents: pd.DataFrame | None = None) -> dict:
    """Every table of a study's analysis folder (STUDY_OUTPUTS). With ``per_triple`` (analysis.resample) the
    intervals come from ``n_replicates`` resamples of the evaluation triples (and of the seed runs, where ``sizes``
    groups several runs into one size) and from leaving each model out; without it there are none.

    exponents.csv's last column `ema` and exponents.md's opening say at which EMA the fits stand (``ema``: run →
    label, models.json's; "unknown" without it). ``ema_exponents`` (an EMA sweep's ema_exponents.csv) adds its
    exponents at each model's best and at a fixed EMA length to exponents.md.

    A study whose models come from several architecture families also gets each family's own fits (exponents.csv
    then starts with a `group` column: POOLED, then one group per family, each with its own frontier) and
    family_differences.csv: the difference of the families' exponents, paired on the same replicates."""
    _check_losses(losses)
    reps = (replicates(per_triple, n_replicates, seed, sizes=sizes) if per_triple is not None
            else replicates_from_losses(losses, sizes))
    fits = study_stats.StudyFits(reps, frontier)
    tables = {"exponents.csv": study_stats.study_table(fits), "verdict.csv": study_stats.verdict_table(fits),
              "offset_profile.csv": study_stats.offset_profile(fits),
              "compute_optimal.csv": compute_optimal_table(fits)}
    fc = forecast.forecast_tables(fits)
    tables.update({k: v for k, v in fc.items() if k.endswith(".csv")})
    tables["floor_profile.csv"] = floor_profile.floor_profile_table(fits)
    tables["joint_floor.csv"] = floor_profile.joint_floor_table(reps)
    family_of = dict(zip(losses["model"], model_families(losses)))
    families = reps.snapshots["model"].map(family_of).fillna(POOLED).to_numpy()
    by_family = {}
    if len(set(families)) > 1:
        by_family = {f: study_stats.StudyFits(reps.subset(families == f)) for f in sorted(set(families))}
        tables["exponents.csv"] = pd.concat(
            [tables["exponents.csv"].assign(group=POOLED)]
            + [study_stats.study_table(f).assign(group=g) for g, f in by_family.items()], ignore_index=True)
        tables["exponents.csv"] = tables["exponents.csv"][["group"] + study_stats.TABLE_COLUMNS]
        tables["family_differences.csv"] = study_stats.family_difference_table(by_family)
    tables["exponents.csv"] = with_ema_column(tables["exponents.csv"], family_of, ema)
    md = report.study_markdown(pooled_fits(tables["exponents.csv"]), tables["verdict.csv"],
                               tables["compute_optimal.csv"], fc, reps.n_replicates,
                               int((reps.kind == "jackknife").sum()), bool((reps.kind == "seed").any()),
                               opening=floor_profile.floor_markdown(tables["floor_profile.csv"],
                                                                    tables["joint_floor.csv"]),
                               frontier_note=study_stats.frontier_note(reps, frontier),
                               ema=study_ema(losses["model"], ema), ema_exponents=ema_exponents)
    if by_family:
        md = report.families_markdown(tables["exponents.csv"], tables["family_differences.csv"]) + "\n" + md
    out_dir = Path(out_dir)
    for name, table in tables.items():
        with atomic_path(out_dir / name) as tmp:
            table.to_csv(tmp, index=False)
    with atomic_path(out_dir / "exponents.md") as tmp:
        tmp.write_text(md)
    return {**tables, "exponents.md": md}


def _main_table(argv) -> int:
    ap = argparse.ArgumentParser(prog="python -m analysis.scaling",
                                 description="A study's fits, verdict, forecasts and compute-optimal law → the "
                                             "analysis folder (subcommand `chinchilla` fits L(N, D) to a CSV "
                                             "instead).")
    ap.add_argument("--losses", required=True, type=Path, help="tidy losses.csv from the evaluate step")
    ap.add_argument("--per-triple", type=Path, default=None,
                    help="per_triple.npz from the evaluate step (intervals; without it: point estimates only)")
    ap.add_argument("--models", type=Path, default=None,
                    help="models.json (run → {size, …}): the seed runs of a size are averaged and resampled")
    ap.add_argument("--out-dir", required=True, type=Path, help="writes " + ", ".join(STUDY_OUTPUTS))
    ap.add_argument("--n-replicates", type=int, default=1000, help="bootstrap replicates of the evaluation set")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--frontier", choices=study_stats.FRONTIERS, default="all",
                    help="the compute frontier's candidates: every snapshot (all) or each run's final one (final)")
    ap.add_argument("--ema-exponents", type=Path, default=None,
                    help="ema_exponents.csv of an EMA sweep (analysis.ema_sweep): exponents.md sets its exponents "
                         "at each model's best EMA length beside a fixed one's")
    args = ap.parse_args(argv)
    for name in ("losses", "per_triple", "models", "ema_exponents"):
        path = getattr(args, name)
        if path is not None and not path.is_file():
            ap.error(f"--{name.replace('_', '-')} file not found: {path}")
    if args.n_replicates < 0:
        ap.error(f"--n-replicates must be ≥ 0, got {args.n_replicates}")
    try:  # both checked against their checksums and validated: no NaN or missing row reaches a fit
        losses = read_losses(args.losses)
        per_triple = load_per_triple(args.per_triple) if args.per_triple is not None else None
        if per_triple is not None:  # the figures plot losses.csv, the statistics resample per_triple.npz
            check_same_numbers(losses, per_triple, args.losses, args.per_triple)
        ema_exponents = read_ema_exponents(args.ema_exponents) if args.ema_exponents is not None else None
    except (IntegrityError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sizes = labels = None
    if args.models is not None:
        try:
            table = json.loads(args.models.read_text())
            if not (isinstance(table, dict) and all(isinstance(v, dict) for v in table.values())):
                raise ValueError("expected an object run → {size, …}")
        except ValueError as err:
            ap.error(f"--models {args.models} is not a model table ({err}); the workflow rebuilds it with "
                     "`snakemake --forcerun models_table`")
        sizes, labels = seed_sizes(table), ema_labels(table)
    out = study_outputs(losses, per_triple, args.out_dir, n_replicates=args.n_replicates, seed=args.seed,
                        sizes=sizes, frontier=args.frontier, ema=labels, ema_exponents=ema_exponents)
    print(f"wrote {len(out['exponents.csv'])} fits, the verdict, the forecasts, the offset profile and the "
          f"compute-optimal law to {args.out_dir}")
    return 0


def _main_chinchilla(argv) -> int:
    ap = argparse.ArgumentParser(prog="python -m analysis.scaling chinchilla",
                                 description="Fit L = E + A/N^α + B/D^β (Hoffmann et al. approach 3).")
    ap.add_argument("--csv", required=True, type=Path, help="CSV with columns params, tokens, loss")
    ap.add_argument("--drop-highest", type=int, default=0,
                    help="drop this many highest-loss points first (Epoch AI drop 5)")
    ap.add_argument("--n-bootstrap", type=int, default=0, help="bootstrap resamples of the points for intervals")
    ap.add_argument("--huber-delta", type=float, default=1e-3, help="Huber delta on log residuals (default 1e-3)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--top-k", type=int, default=60, help="grid starts optimised (0 = all 5400)")
    args = ap.parse_args(argv)
    if not args.csv.is_file():
        ap.error(f"--csv file not found: {args.csv}")
    df = pd.read_csv(args.csv)
    missing = [c for c in ("params", "tokens", "loss") if c not in df.columns]
    if missing:
        ap.error(f"{args.csv} is missing columns {missing}")
    f = fit_chinchilla(df["params"], df["tokens"], df["loss"], drop_highest=args.drop_highest,
                       n_bootstrap=args.n_bootstrap, seed=args.seed, top_k=args.top_k or None,
                       huber_delta=args.huber_delta)
    print(f"L = E + A/N^alpha + B/D^beta   ({f['n']} points, Huber loss {f['huber_loss']:.6g})")
    for k in ("E", "A", "B", "alpha", "beta"):
        lo, hi = f[f"{k}_ci"]
        ci = f"   95% CI [{'0 (at bound)' if lo == 0 else f'{lo:.4g}'}, {hi:.4g}]" if math.isfinite(lo) else ""
        print(f"  {k:5s} = {f[k]:.4g}{ci}")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "chinchilla":
        return _main_chinchilla(argv[1:])
    return _main_table(argv)


if __name__ == "__main__":
    sys.exit(main())
