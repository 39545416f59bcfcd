"""Where a study's time and memory went: Snakemake's benchmark file of every job, one line per rule.

    python benchmarks/study_timing.py results/default            # print the table
    python benchmarks/study_timing.py results/default --csv results/default/benchmarks.csv

Every rule of the workflow writes a benchmark file (`benchmark:` directive) under results/<study>/benchmarks/:
<rule>.tsv, or <rule>/<wildcards>.tsv for a rule with wildcards. Per rule the table gives the number of jobs, the
total and the largest wall time, the CPU time and the largest resident memory (the sum over the job's processes at
the moment it peaked). The footer gives the span from the first job's start to the last job's end (a study run in
one go: its wall time without Snakemake's own start-up; after partial reruns, the span of the jobs' latest runs).

Snakemake samples CPU time and memory while a job runs (every 0.5 s for about its first 15 s, then every 30 s), so
the CPU time of a job misses what it spent after its last sample and that of short-lived child processes (a
checksum stamp after the main command); wall time (`s`) is exact. A `run:` rule runs inside Snakemake's own
process, whose CPU time and memory its benchmark would report: its file is named <rule>….in-snakemake.tsv and the
table leaves those two empty. The `benchmarks` rule writes this table to
results/<study>/benchmarks.csv at the end of every run of the default target, and `snakemake --report` shows it.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from study.atomic import atomic_path  # noqa: E402

COLUMNS = ["rule", "jobs", "wall_s", "wall_s_max", "cpu_s", "max_rss_mb"]


IN_SNAKEMAKE = ".in-snakemake"  # benchmark files of `run:` rules (workflow/rules/benchmarks.smk)


def read_benchmarks(study_dir) -> pd.DataFrame:
    """One row per job: rule, job (its wildcards, or empty), s (wall), cpu_time, max_rss (MB), end (the file's
    modification time: when Snakemake wrote it, at the job's end). A job that ran inside Snakemake's own process
    (file name ….in-snakemake.tsv) has no CPU time or memory of its own: NaN."""
    root = Path(study_dir) / "benchmarks"
    rows = []
    for path in sorted(root.rglob("*.tsv")) if root.is_dir() else []:
        name = str(path.relative_to(root).with_suffix(""))
        in_snakemake = name.endswith(IN_SNAKEMAKE)
        name = name[: -len(IN_SNAKEMAKE)] if in_snakemake else name
        rule, _, job = name.partition("/")
        try:
            table = pd.read_csv(path, sep="\t")
        except (ValueError, pd.errors.ParserError) as e:  # a file being written, or not Snakemake's
            raise ValueError(f"{path}: not a Snakemake benchmark file ({type(e).__name__}: {e})") from None
        if "s" not in table or table.empty:
            raise ValueError(f"{path}: not a Snakemake benchmark file (no `s` column)")
        last = table.iloc[-1]  # a `repeat(...)` benchmark has one line per repetition: the last run
        own = not in_snakemake
        rows.append({"rule": rule, "job": job, "s": float(last["s"]),
                     "cpu_time": _number(last.get("cpu_time")) if own else math.nan,
                     "max_rss": _number(last.get("max_rss")) if own else math.nan, "end": path.stat().st_mtime})
    return pd.DataFrame(rows, columns=["rule", "job", "s", "cpu_time", "max_rss", "end"])


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):  # "NA": a job faster than Snakemake's first sample
        return math.nan


def per_rule(jobs: pd.DataFrame) -> pd.DataFrame:
    """The table: one row per rule (ordered by total wall time, largest first) and a total row."""
    if jobs.empty:
        return pd.DataFrame(columns=COLUMNS)
    grouped = jobs.groupby("rule")
    table = pd.DataFrame({"jobs": grouped.size(), "wall_s": grouped["s"].sum(), "wall_s_max": grouped["s"].max(),
                          "cpu_s": grouped["cpu_time"].sum(min_count=1), "max_rss_mb": grouped["max_rss"].max()})
    table = table.sort_values("wall_s", ascending=False).reset_index()
    total = {"rule": "total", "jobs": int(table["jobs"].sum()), "wall_s": table["wall_s"].sum(),
             "wall_s_max": table["wall_s_max"].max(), "cpu_s": table["cpu_s"].sum(min_count=1),
             "max_rss_mb": table["max_rss_mb"].max()}
    return pd.concat([table, pd.DataFrame([total])], ignore_index=True)[COLUMNS].round(
        {"wall_s": 1, "wall_s_max": 1, "cpu_s": 1, "max_rss_mb": 0})


def span_seconds(jobs: pd.DataFrame) -> float:
    """From the first job's start (its end minus its wall time) to the last job's end."""
    if jobs.empty:
        return math.nan
    return float(jobs["end"].max() - (jobs["end"] - jobs["s"]).min())


def format_table(table: pd.DataFrame, jobs: pd.DataFrame, study_dir) -> str:
    lines = [f"{'rule':24} {'jobs':>5} {'wall s':>9} {'max wall s':>10} {'CPU s':>9} {'max RSS MB':>10}",
             "-" * 72]
    for _, r in table.iterrows():
        if r["rule"] == "total":
            lines.append("-" * 72)
        lines.append(f"{r['rule']:24} {int(r['jobs']):5d} {r['wall_s']:9.1f} {r['wall_s_max']:10.1f} "
                     f"{_show(r['cpu_s'], 9, 1)} {_show(r['max_rss_mb'], 10, 0)}")
    span = span_seconds(jobs)
    if math.isfinite(span):
        lines.append(f"first job start → last job end: {span:.0f} s ({int(span // 60)} min {span % 60:.0f} s) "
                     f"for {study_dir}")
    lines.append("CPU s as sampled by Snakemake (it misses a job's last seconds after its final sample); wall s "
                 "is exact; — : a rule run inside Snakemake's process")
    return "\n".join(lines)


def _show(value, width: int, digits: int) -> str:
    return f"{value:{width}.{digits}f}" if math.isfinite(value) else f"{'—':>{width}}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("study_dir", help="a study folder, e.g. results/default")
    p.add_argument("--csv", default=None, help="also write the table here")
    args = p.parse_args(argv)
    try:
        jobs = read_benchmarks(args.study_dir)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if jobs.empty:
        print(f"error: no benchmark files under {Path(args.study_dir) / 'benchmarks'} (run the study first)",
              file=sys.stderr)
        return 2
    table = per_rule(jobs)
    if args.csv:
        with atomic_path(args.csv) as tmp:
            table.to_csv(tmp, index=False)
    print(format_table(table, jobs, args.study_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
