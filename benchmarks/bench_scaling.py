"""The statistics step (`python -m analysis.scaling`) of this tree against another git revision, side by side —
not a test.

Both run as the `scaling` rule runs them (a subprocess: interpreter start, imports, every table written), on the
same losses.csv / per_triple.npz, alternating old and new `--repeat` times so that a busy machine slows both alike.
The other revision's tree is taken with `git archive` into a temporary folder. It prints the wall
times and compares the tables the two wrote: exponents.md line by line (the printed precision) and every CSV they
both wrote, column by column (largest relative difference).

    python benchmarks/bench_scaling.py --losses results/default/analysis/losses.csv \
        --per-triple results/default/analysis/per_triple.npz --ref main [--repeat 2] [--n-replicates 1000]
"""

from __future__ import annotations

import argparse
import difflib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent


def checkout(ref: str, dest: Path) -> Path:
    """The tree of ``ref`` under dest (what `python -m analysis.scaling` imports, wherever that revision kept it)."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def run(tree: Path, args: argparse.Namespace, out: Path) -> float:
    cmd = [sys.executable, "-m", "analysis.scaling", "--losses", str(args.losses), "--per-triple",
           str(args.per_triple), "--out-dir", str(out), "--n-replicates", str(args.n_replicates)]
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=tree, check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(tree)})
    return time.perf_counter() - t0


def compare(old: Path, new: Path) -> None:
    a, b = (old / "exponents.md").read_text().splitlines(), (new / "exponents.md").read_text().splitlines()
    diff = list(difflib.unified_diff(a, b, "old/exponents.md", "new/exponents.md", lineterm="", n=0))
    print(f"exponents.md: {'identical' if not diff else f'{len(diff)} diff lines'}")
    for line in diff[:60]:
        print("  " + line)
    for csv in sorted(p.name for p in old.glob("*.csv") if (new / p.name).is_file()):
        x, y = pd.read_csv(old / csv), pd.read_csv(new / csv)
        common = [c for c in x.columns if c in y.columns and pd.api.types.is_numeric_dtype(x[c])]
        if len(x) != len(y):
            print(f"{csv}: {len(x)} rows before, {len(y)} after")
            continue
        worst = {}
        for c in common:
            u, v = x[c].to_numpy(float), y[c].to_numpy(float)
            same_nan = np.isnan(u) == np.isnan(v)
            ok = ~np.isnan(u) & ~np.isnan(v)
            rel = np.abs(u[ok] - v[ok]) / np.maximum(np.abs(u[ok]), 1e-300) if ok.any() else np.zeros(1)
            if not same_nan.all() or rel.max() > 0:
                worst[c] = (float(rel.max()), int((~same_nan).sum()))
        only = sorted(set(x.columns) ^ set(y.columns))
        top = sorted(worst.items(), key=lambda kv: -kv[1][0])[:4]
        print(f"{csv}: largest relative difference "
              + (", ".join(f"{c} {r:.1e}" + (f" ({n} NaN differ)" if n else "") for c, (r, n) in top) or "0")
              + (f"; columns in one only: {only}" if only else ""))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--losses", type=Path, required=True)
    ap.add_argument("--per-triple", type=Path, required=True)
    ap.add_argument("--ref", default="main", help="the git revision to compare with")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--n-replicates", type=int, default=1000)
    args = ap.parse_args(argv)
    args.losses, args.per_triple = args.losses.resolve(), args.per_triple.resolve()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "old").mkdir()
        old_tree = checkout(args.ref, (tmp / "old").resolve())
        times = {"old": [], "new": []}
        for _ in range(args.repeat):
            for tag, tree in (("old", old_tree), ("new", ROOT)):
                times[tag].append(run(tree, args, tmp / f"out_{tag}"))
        for tag in ("old", "new"):
            print(f"{tag} ({args.ref if tag == 'old' else 'this tree'}): " + ", ".join(f"{t:.1f}" for t in times[tag])
                  + f" s (best {min(times[tag]):.1f} s)")
        print(f"ratio old/new (best of each): {min(times['old']) / min(times['new']):.1f}")
        compare(tmp / "out_old", tmp / "out_new")
    return 0


if __name__ == "__main__":
    sys.exit(main())
