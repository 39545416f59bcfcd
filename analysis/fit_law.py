"""The command `python -m analysis.fit_law TABLE.csv …`: a scaling law fitted to any CSV table of (N, D, L), with
95% intervals from resampling whole runs and predictions at new (N, D) (docs/fit-your-own-table.md). Here: the table
read and its columns mapped onto ``fit_law``'s arguments (analysis.table_law, the fit itself; analysis.law_intervals,
its intervals), each bad input refused in one line naming the file, column, value or option; the fit printed and
written (parameters.csv, predictions.csv, draws.csv, fit.json, rolling_origin.csv).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.table_law import FORMULA, HUBER_DELTA, LAWS, LawFit, fit_law, jsonable, rolling_origin
from study.atomic import atomic_path


# ----------------------------------------------------------------------------------------------------------------
# the command
# ----------------------------------------------------------------------------------------------------------------
class TableError(ValueError):
    """Bad input to the command: one line, naming the file, column, value or option."""


def _read_table(path: str) -> pd.DataFrame:
    source = sys.stdin if path == "-" else Path(path)
    if path != "-" and not Path(path).is_file():
        raise TableError(f"table file not found: {path}")
    try:
        return pd.read_csv(source)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise TableError(f"cannot read {path} as CSV: {str(err).strip().splitlines()[0]}") from None


def _column(df: pd.DataFrame, name: str, option: str, source: str, *, positive=True) -> np.ndarray:
    """A numeric column, every value a finite number (> 0 with ``positive``, ≥ 0 without)."""
    if name not in df.columns:
        raise TableError(f"{source} has no column {name!r} ({option}); its columns: {', '.join(map(str, df.columns))}")
    v = pd.to_numeric(df[name], errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(v) | ((v <= 0) if positive else (v < 0))
    if bad.any():
        i = int(np.argmax(bad))
        raw = df[name].iloc[i]
        raise TableError(f"{source} column {name!r} ({option}): {int(bad.sum())} values are not "
                         f"{'positive' if positive else 'non-negative'} numbers (first on line {i + 2}: "
                         f"{'empty' if pd.isna(raw) else raw})")
    return v


def _predict_points(specs, law) -> list:
    out = []
    for s in specs or []:
        parts = s.split(",")
        want = 2 if law == "nd" else 1
        try:
            vals = [float(p) for p in parts]
        except ValueError:
            vals = []
        if len(vals) != want or not all(math.isfinite(v) and v > 0 for v in vals):
            raise TableError(f"--predict {s!r}: expected {'N,D' if want == 2 else 'N'} as positive numbers "
                             f"(e.g. {'70e9,1.4e12' if want == 2 else '70e9'})")
        out.append(vals + ([math.nan] if want == 1 else []))
    return out


def _floor_arg(spec: str, df: pd.DataFrame, source: str):
    if spec == "free":
        return "free"
    try:
        v = float(spec)
    except ValueError:
        return _column(df, spec, "--floor", source, positive=False)
    if not (math.isfinite(v) and v >= 0):
        raise TableError(f"--floor {spec!r}: a fixed floor must be a finite number ≥ 0")
    return v


def _huber_arg(spec: str):
    if spec in ("none", "auto"):
        return None if spec == "none" else spec
    try:
        v = float(spec)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number or 'none', got {spec!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number or 'none', got {spec!r}")
    return v


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m analysis.fit_law",
                                 description="Fit a scaling law to a CSV table of (N, D, L) — L = E + A/N^alpha + "
                                             "B/D^beta, or L = E + A/N^alpha — with 95% intervals from resampling "
                                             "whole runs, and predict L at new (N, D). See docs/fit-your-own-table.md.")
    ap.add_argument("table", help="CSV file ('-' = standard input)")
    ap.add_argument("--params", default="params", metavar="COL", help="column of N, parameters (default: params)")
    ap.add_argument("--tokens", default="tokens", metavar="COL",
                    help="column of D, tokens or images seen (default: tokens; not needed by --law n)")
    ap.add_argument("--loss", default="loss", metavar="COL", help="column of L (default: loss)")
    ap.add_argument("--run", metavar="COL", help="column naming each row's training run: runs are resampled whole")
    ap.add_argument("--rows", choices=("all", "final"), default="all",
                    help="with --run: fit every row of a run, or only its final one (most tokens); default all")
    ap.add_argument("--law", choices=LAWS, default="nd",
                    help="nd: E + A/N^alpha + B/D^beta (default); n: E + A/N^alpha")
    ap.add_argument("--floor", default="free", metavar="free|NUMBER|COL",
                    help="E: fitted (free, default), fixed to a number (0 = no floor), or a column's mean")
    ap.add_argument("--huber-delta", type=_huber_arg, default="auto", metavar="DELTA|none",
                    help=f"Huber delta on log residuals of --law nd (default {HUBER_DELTA:g}; none = least squares)")
    ap.add_argument("--starts", default="epoch", metavar="SPEC",
                    help="starts of --law nd: epoch (Epoch AI's grid, its 60 most promising; default), epoch:K, "
                         "epoch:all (all 5400), study (the study's grid)")
    ap.add_argument("--drop-highest", type=int, default=0, metavar="K",
                    help="drop the K highest-loss rows first (Epoch AI drop 5 of the Chinchilla points)")
    ap.add_argument("--n-bootstrap", type=int, default=1000, metavar="B", help="bootstrap resamples (default 1000)")
    ap.add_argument("--no-leave-one-out", action="store_true", help="skip the leave-one-unit-out refits")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--predict", action="append", metavar="N,D",
                    help="predict L at N,D (N alone for --law n); repeatable")
    ap.add_argument("--predict-file", metavar="CSV",
                    help="predict at every row of this CSV (same --params/--tokens columns; with the --loss column "
                         "too, each prediction is scored)")
    ap.add_argument("--rolling-origin", type=int, nargs="?", const=3, default=None, metavar="K",
                    help="also fit on the k smallest sizes (distinct N) and predict size k+1, for the last K such "
                         "splits (default 3; 0 = all)")
    ap.add_argument("--out", type=Path, metavar="DIR",
                    help="write parameters.csv, predictions.csv, draws.csv, fit.json (and rolling_origin.csv)")
    return ap


def _inputs(args, df: pd.DataFrame, source: str) -> dict:
    """fit_law's arguments from the table's columns."""
    kw = {"params": _column(df, args.params, "--params", source), "loss": _column(df, args.loss, "--loss", source)}
    if args.law == "nd" or args.tokens in df.columns:        # the law in N: tokens only order a run's rows
        kw["tokens"] = _column(df, args.tokens, "--tokens", source)
    if args.run is not None:
        if args.run not in df.columns:
            raise TableError(f"{source} has no column {args.run!r} (--run); its columns: "
                             f"{', '.join(map(str, df.columns))}")
        if df[args.run].isna().any():
            raise TableError(f"{source} column {args.run!r} (--run): {int(df[args.run].isna().sum())} rows name no "
                             f"run (first on line {int(np.argmax(df[args.run].isna().to_numpy())) + 2})")
        kw["runs"] = df[args.run].astype(str).to_numpy()
    kw["floor"] = _floor_arg(args.floor, df, source)
    return kw


def _prediction_inputs(args, law) -> tuple:
    pts = _predict_points(args.predict, law)
    actual = [math.nan] * len(pts)
    if args.predict_file:
        pf = _read_table(args.predict_file)
        n = _column(pf, args.params, "--params", args.predict_file)
        d = _column(pf, args.tokens, "--tokens", args.predict_file) if law == "nd" else np.full(n.size, np.nan)
        pts += np.column_stack([n, d]).tolist()
        actual += (_column(pf, args.loss, "--loss", args.predict_file).tolist() if args.loss in pf.columns
                   else [math.nan] * n.size)
    return (pts or None), np.array(actual)


def _format(v: float, at_bound: bool) -> str:
    return f"{v:.6g} (at bound)" if at_bound else f"{v:.6g}"


def summary_text(fit: LawFit) -> str:
    """The fit as a few lines for the terminal (the files hold full precision)."""
    by = f"{fit.n_units} {fit.unit}s" + (f" ({fit.rows} rows)" if fit.unit == "run" else "")
    h = "least squares" if fit.huber_delta is None else f"Huber delta {fit.huber_delta:g}"
    lines = [f"{FORMULA[fit.law]}   floor {fit.floor}; {fit.n_points} points, {h}, objective {fit.objective:.6g}",
             f"95% intervals: bootstrap over {by}, {int((fit.draws['kind'] == 'bootstrap').sum())} resamples"]
    lines += [f"note: {n}" for n in fit.notes]
    for r in fit.parameters.itertuples():
        marks = r.at_bound
        est = _format(r.estimate, "estimate at" in marks)
        ci = (f"   [{_format(r.ci_lo, 'ci_lo at' in marks)}, {_format(r.ci_hi, 'ci_hi at' in marks)}]"
              if math.isfinite(r.ci_lo) else "")
        lines.append(f"  {r.parameter:15s} {est}{ci}{'   (fixed)' if r.note == 'fixed' else ''}")
    for r in fit.predictions.itertuples():
        at = f"N={r.params:.6g}" + (f", D={r.tokens:.6g}" if math.isfinite(r.tokens) else "")
        obs = f"   observed {r.actual:.6g}" if math.isfinite(r.actual) else ""
        lines.append(f"  L({at}) = {r.predicted:.6g}   law [{r.ci_lo:.6g}, {r.ci_hi:.6g}]   "
                     f"new run [{r.pi_lo:.6g}, {r.pi_hi:.6g}]{obs}")
    return "\n".join(lines)


def write_outputs(fit: LawFit, out: Path, rolling: pd.DataFrame | None = None) -> list:
    """parameters.csv, predictions.csv, draws.csv, fit.json (+ rolling_origin.csv), each written whole or not at
    all; full precision."""
    out.mkdir(parents=True, exist_ok=True)
    files = {"parameters.csv": fit.parameters, "predictions.csv": fit.predictions, "draws.csv": fit.draws}
    if rolling is not None:
        files["rolling_origin.csv"] = rolling
    for name, table in files.items():
        with atomic_path(out / name) as tmp:
            table.to_csv(tmp, index=False)
    summary = fit.summary()
    if rolling is not None:
        summary["rolling_origin"] = jsonable(rolling.to_dict("records"))
    with atomic_path(out / "fit.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=1, allow_nan=False) + "\n")
    return sorted(files) + ["fit.json"]


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.n_bootstrap < 0:
            raise TableError(f"--n-bootstrap must be ≥ 0, got {args.n_bootstrap}")
        if args.rows == "final" and args.run is None:
            raise TableError("--rows final needs --run (which rows belong to one run)")
        df = _read_table(args.table)
        source = "standard input" if args.table == "-" else args.table
        kw = _inputs(args, df, source)
        pts, actual = _prediction_inputs(args, args.law)
        opts = {"law": args.law, "rows": args.rows, "huber_delta": args.huber_delta, "starts": args.starts,
                "n_bootstrap": args.n_bootstrap, "leave_one_out": not args.no_leave_one_out, "seed": args.seed,
                "drop_highest": args.drop_highest}
        fit = fit_law(**kw, **opts, predict=pts, actual=actual if pts else None)
        rolling = None
        if args.rolling_origin is not None:
            opts.pop("drop_highest"), opts.pop("rows")
            rolling = rolling_origin(**kw, rows=args.rows, drop_highest=args.drop_highest,
                                     last=args.rolling_origin or None, **opts)
    except ValueError as err:       # TableError, and fit_law's own checks of the values
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary_text(fit))
    if rolling is not None:
        cover = rolling["in_pi"].mean()
        print(f"rolling origin: {rolling['n_train_sizes'].nunique()} splits, {len(rolling)} held-out points, "
              f"mean |log error| {np.abs(rolling['log_error']).mean():.4g}, inside the new-run interval {cover:.0%}")
    if args.out is not None:
        names = write_outputs(fit, args.out, rolling)
        print(f"wrote {', '.join(names)} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
