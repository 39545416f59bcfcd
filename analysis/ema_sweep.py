"""Loss against the EMA length: each model's final snapshot rebuilt at a grid of σ_rel from its stored power-EMA
profiles (models/power_ema.py) and evaluated on the study's fixed evaluation triples.

Per model and σ_rel the table holds the total loss under the training weighting (analysis.evaluate's totals) on
all triples, and on two fixed halves of them: within every σ level of the evaluation set the even-numbered triples
form half A, the odd-numbered ones half B.  The best σ_rel is chosen on half A and its loss is reported on half B,
so the reported best loss carries no selection bias (choosing and reporting on the same triples would favour the
σ_rel whose evaluation noise happened to be low).  Every row carries the reconstruction's residual (relative L2 of
the profile fit over the training steps): a large one says the stored profiles cannot express that σ_rel.

    python -m analysis.ema_sweep evaluate --files SNAPSHOT_OR_PROFILE.pt … --dataset DATA.npz \
        --eval-set eval_set.npz --denoised eval_denoised.npy --sigma-rel 0.02 0.03 … --out sweep/<model>.csv
    python -m analysis.ema_sweep collect --sweeps sweep/*.csv --out ema_sweep.csv --figure ema_sweep.png

ema_sweep.csv: model, params, snapshot (images seen), steps, sigma_rel, loss, stderr (all triples), loss_a,
stderr_a (half A), loss_b, stderr_b (half B), residual_rel_l2, best (the σ_rel chosen on half A: its loss_b is the
model's reported loss at its best EMA length).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from analysis.evaluate import (EvaluationInputs, load_denoised, load_eval_set, load_rows, per_sigma_table,
                               variant_fns, weighted_totals)
from models.atomic import atomic_path
from models.denoiser import Denoiser
from models.power_ema import read_power_record, read_profiles, reconstruct

# about even in log σ_rel over EDM2's figures' range, with its stored 0.05 and 0.10 on it (the schema's default)
DEFAULT_GRID = (0.02, 0.025, 0.03, 0.04, 0.05, 0.065, 0.08, 0.10, 0.125, 0.16, 0.2, 0.25)
COLUMNS = ["model", "params", "snapshot", "steps", "sigma_rel", "loss", "stderr", "loss_a", "stderr_a", "loss_b",
           "stderr_b", "residual_rel_l2", "best"]


def halves(sigma) -> np.ndarray:
    """Half of each triple (0 = A, 1 = B): alternate triples within each σ level, in the evaluation set's order."""
    sigma = np.asarray(sigma, dtype=np.float64)
    half = np.empty(sigma.size, dtype=np.int64)
    for s in np.unique(sigma):
        where = np.flatnonzero(sigma == s)
        half[where] = np.arange(where.size) % 2
    return half


def weighted_total(errors: dict, sigma, variant, select=None) -> tuple[float, float]:
    """(total loss under the training weighting, its standard error) over the triples `select` (default all)."""
    sel = np.ones(len(sigma), dtype=bool) if select is None else select
    table = per_sigma_table({k: v[sel] for k, v in errors.items()}, np.asarray(sigma)[sel])
    density, weight = variant_fns(variant)
    total = weighted_totals(table, density, weight)
    return total["loss"], total["loss_stderr"]


def final_snapshot(files) -> Path:
    """The snapshot (not a profile-only file) with the most steps among `files`."""
    snaps = [Path(f) for f in files if Path(f).name.startswith("snapshot-")]
    if not snaps:
        raise ValueError("ema_sweep: no snapshot among the files")
    return max(snaps, key=lambda f: int(read_power_record(f)["steps"]))


def sweep_model(files, sigma_rels, dataset, eval_set, denoised, *, batch_size=512, device=None) -> pd.DataFrame:
    """One row per σ_rel: the final snapshot of a run rebuilt at that σ_rel (from all of `files`) and evaluated."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    final = final_snapshot(files)
    steps = int(read_power_record(final)["steps"])
    den = Denoiser.from_snapshot(final, device=device)
    ev = load_eval_set(eval_set)
    x_rows, label_rows, ev = load_rows(dataset, ev)
    den_star = load_denoised(denoised, (len(ev["index"]), int(np.prod(x_rows.shape[1:]))))
    inputs = EvaluationInputs(x_rows, ev, den_star, labels=label_rows, batch_size=batch_size)
    half = halves(ev["sigma"])
    records, rows = read_profiles(files), []
    for s in sigma_rels:
        state, solution = reconstruct(files, float(s), steps, records=records)
        den.net.load_state_dict(state)
        errors = inputs.errors(lambda x, sig, lab: den(x, sig, lab), device=device, labelled=den.label_dim > 0)
        if not np.all(np.isfinite(errors["loss"])):
            raise ValueError(f"{final}: non-finite denoiser output at σ_rel {s}")
        loss, se = weighted_total(errors, ev["sigma"], den.variant)
        loss_a, se_a = weighted_total(errors, ev["sigma"], den.variant, half == 0)
        loss_b, se_b = weighted_total(errors, ev["sigma"], den.variant, half == 1)
        rows.append({"model": den.snapshot_info["model"], "params": int(den.snapshot_info["params"]),
                     "snapshot": int(den.snapshot_info["images_seen"]), "steps": steps, "sigma_rel": float(s),
                     "loss": loss, "stderr": se, "loss_a": loss_a, "stderr_a": se_a, "loss_b": loss_b,
                     "stderr_b": se_b, "residual_rel_l2": solution.residual_rel_l2})
    table = pd.DataFrame(rows)
    table["best"] = False
    table.loc[table["loss_a"].idxmin(), "best"] = True
    return table[COLUMNS]


def collect(paths) -> pd.DataFrame:
    frames = [pd.read_csv(p) for p in paths]
    for p, f in zip(paths, frames):
        missing = [c for c in COLUMNS if c not in f]
        if missing or int(f["best"].sum()) != 1:
            raise ValueError(f"{p}: not an ema_sweep table (missing {missing} or not one best row)")
    return pd.concat(frames, ignore_index=True).sort_values(["params", "model", "sigma_rel"]).reset_index(drop=True)


def plot(table: pd.DataFrame, out) -> Path:
    """Loss against σ_rel per model (all triples, ±1 s.e.), the σ_rel chosen on half A marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for model, rows in table.groupby("model", sort=False):
        line = ax.errorbar(rows["sigma_rel"], rows["loss"], yerr=rows["stderr"], marker="o", ms=3, capsize=2,
                           label=f"{model} ({int(rows['params'].iloc[0]):,} params)")
        best = rows[rows["best"].astype(bool)]
        ax.plot(best["sigma_rel"], best["loss"], "*", ms=12, color=line[0].get_color())
    ax.set_xscale("log")
    ax.set_xlabel("EMA length σ_rel (reconstructed post hoc)")
    ax.set_ylabel("total loss L (training weighting)")
    ax.set_title("Final snapshots against the EMA length (★ chosen on half A)")
    ax.legend(fontsize=7)
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    plt.close(fig)
    return out


def _atomic_csv(df: pd.DataFrame, path) -> None:
    with atomic_path(Path(path)) as tmp:
        df.to_csv(tmp, index=False)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m analysis.ema_sweep", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    ev = sub.add_parser("evaluate", help="one model's final snapshot at every σ_rel of the grid")
    ev.add_argument("--files", nargs="+", required=True, help="the run's snapshots and profile files")
    ev.add_argument("--dataset", required=True)
    ev.add_argument("--eval-set", required=True)
    ev.add_argument("--denoised", required=True)
    ev.add_argument("--sigma-rel", nargs="+", type=float, default=list(DEFAULT_GRID))
    ev.add_argument("--batch-size", type=int, default=512)
    ev.add_argument("--device", default=None)
    ev.add_argument("--out", required=True)
    co = sub.add_parser("collect", help="every model's sweep -> ema_sweep.csv and its figure")
    co.add_argument("--sweeps", nargs="+", required=True)
    co.add_argument("--out", required=True)
    co.add_argument("--figure", required=True)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "evaluate":
            table = sweep_model(args.files, args.sigma_rel, args.dataset, args.eval_set, args.denoised,
                                batch_size=args.batch_size, device=args.device)
            _atomic_csv(table, args.out)
            best = table[table["best"]].iloc[0]
            print(f"{best['model']}: best σ_rel {best['sigma_rel']:g} (chosen on half A), loss on half B "
                  f"{best['loss_b']:.5g} ± {best['stderr_b']:.2g} -> {args.out}")
        else:
            table = collect(args.sweeps)
            _atomic_csv(table, args.out)
            plot(table, args.figure)
            print(f"{table['model'].nunique()} models × {table['sigma_rel'].nunique()} σ_rel -> {args.out}")
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
