"""Loss against the EMA length: each model's final snapshot rebuilt at a grid of σ_rel from its stored power-EMA
profiles (training/power_ema.py) and evaluated on the study's fixed evaluation triples.

Per model and σ_rel the table holds the total loss under the training weighting (analysis.evaluate's totals) on
all triples, and on two fixed halves of them: within every σ level of the evaluation set the even-numbered triples
form half A, the odd-numbered ones half B.  The best σ_rel is chosen on half A and its loss is reported on half B,
so the reported best loss carries no selection bias (choosing and reporting on the same triples would favour the
σ_rel whose evaluation noise happened to be low).  Every row carries the reconstruction's residual (relative L2 of
the profile fit over the training steps): a large one says the stored profiles cannot express that σ_rel.

    python -m analysis.ema_sweep evaluate --files SNAPSHOT_OR_PROFILE.pt … --dataset DATA.npz \
        --eval-set eval_set.npz --denoised eval_denoised.npy --sigma-rel 0.02 0.03 … --out sweep/<model>.csv
    python -m analysis.ema_sweep collect --sweeps sweep/*.csv --out ema_sweep.csv --figure ema_sweep.png \
        [--exponents ema_exponents.csv --markdown ema_sweep.md --fixed-sigma-rel 0.05]

ema_sweep.csv: model, params, snapshot (images seen), steps, sigma_rel, loss, stderr (all triples), loss_a,
stderr_a (half A), loss_b, stderr_b (half B), residual_rel_l2, best (the σ_rel chosen on half A: its loss_b is the
model's reported loss at its best EMA length).

ema_exponents.csv: the exponent of L and of L − J* against parameters over the models' final snapshots, at the
fixed σ_rel and at each model's best (both on half B), and their difference, each with a 95% basic-bootstrap
interval over the evaluation triples (resampled within each σ level and half, one index for every model: paired;
the best σ_rel is chosen again in every replicate). It answers whether measuring every size at its own best
averaging moves the exponent. Only the evaluation noise enters these intervals, not the seeds'.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from analysis.collect_losses import triples_path
from analysis.eval_set import load_eval_set, total_weights, variant_fns, weighted_totals
from analysis.evaluate import EvaluationInputs, load_denoised, load_rows, per_sigma_table
from analysis.plots_ema import plot_ema_sweep
from analysis.report import ema_exponents_table
from models.denoiser import Denoiser
from study import integrity
from study.atomic import atomic_path
from training.power_ema import read_power_record, read_profiles, reconstruct

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


def sweep_model(files, sigma_rels, dataset, eval_set, denoised, *, batch_size=512, device=None):
    """(one row per σ_rel: the final snapshot of a run rebuilt at that σ_rel (from all of `files`) and evaluated;
    its per-triple arrays: `loss` [σ_rel, triple], `optimal_loss`, `level` (1..K), `half`, `total_weight` [K])."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    final = final_snapshot(files)
    steps = int(read_power_record(final)["steps"])
    den = Denoiser.from_snapshot(final, device=device)
    ev = load_eval_set(eval_set)
    x_rows, label_rows, ev = load_rows(dataset, ev)
    den_star = load_denoised(denoised, (len(ev["index"]), int(np.prod(x_rows.shape[1:]))))
    inputs = EvaluationInputs(x_rows, ev, den_star, labels=label_rows, batch_size=batch_size)
    half = halves(ev["sigma"])
    records, rows, per_triple = read_profiles(files), [], []
    for s in sigma_rels:
        state, solution = reconstruct(files, float(s), steps, records=records)
        den.net.load_state_dict(state)
        errors = inputs.errors(lambda x, sig, lab: den(x, sig, lab), device=device, labelled=den.label_dim > 0)
        if not np.all(np.isfinite(errors["loss"])):
            raise ValueError(f"{final}: non-finite denoiser output at σ_rel {s}")
        per_triple.append(errors["loss"])
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
    grid, level = np.unique(ev["sigma"], return_inverse=True)
    density, weight = variant_fns(den.variant)
    arrays = {"loss": np.stack(per_triple), "optimal_loss": inputs.optimal_loss, "level": level + 1, "half": half,
              "total_weight": total_weights(grid, density, weight), "sigma_rel": np.asarray(sigma_rels, float),
              "params": np.int64(den.snapshot_info["params"])}
    return table[COLUMNS], arrays


def half_totals(a: dict, index=None) -> tuple[np.ndarray, np.ndarray]:
    """(totals [σ_rel, half] of the model's loss, totals [half] of J*) under the training weighting, from the
    per-triple arrays; `index` (a resampling of the triples, within each σ level and half) defaults to all."""
    index = np.arange(a["level"].size) if index is None else index
    level, half = a["level"][index] - 1, a["half"][index]
    k = a["total_weight"].size
    group = level * 2 + half
    counts = np.bincount(group, minlength=2 * k).reshape(k, 2)

    def totals(values):  # Σ_k c_k · mean over the triples of level k and half h
        sums = np.bincount(group, weights=values, minlength=2 * k).reshape(k, 2)
        return a["total_weight"] @ (sums / counts)

    return np.stack([totals(loss[index]) for loss in a["loss"]]), totals(a["optimal_loss"][index])


def log_slope(params, values) -> float:
    """Exponent of a pure power law through the points: the least-squares slope of log value on log params."""
    return float(np.polyfit(np.log(params), np.log(values), 1)[0])


def exponents_at(arrays: list[dict], fixed: int, index=None) -> dict:
    """Exponents of L and L − J* against parameters over the models' final snapshots, at the fixed σ_rel (grid
    index `fixed`) and at each model's best σ_rel (chosen on half A), both reported on half B."""
    params = np.array([int(a["params"]) for a in arrays], dtype=np.float64)
    fixed_b, best_b, jstar_b = [], [], None
    for a in arrays:
        model_totals, jstar = half_totals(a, index)
        fixed_b.append(model_totals[fixed, 1])
        best_b.append(model_totals[int(np.argmin(model_totals[:, 0])), 1])
        jstar_b = jstar[1]
    out = {}
    for name, values in (("fixed", np.array(fixed_b)), ("best", np.array(best_b))):
        out[("raw", name)] = log_slope(params, values)
        out[("minus_jstar", name)] = log_slope(params, values - jstar_b) if np.all(values > jstar_b) else np.nan
    return out


def resampled_index(a: dict, rng) -> np.ndarray:
    """One bootstrap replicate of the triples: resampled with replacement within each σ level and half, so both
    halves keep their triples apart and every level its count (one index for every model and σ_rel: paired)."""
    group = (a["level"] - 1) * 2 + a["half"]
    out = np.empty(group.size, dtype=np.int64)
    for g in np.unique(group):
        where = np.flatnonzero(group == g)
        out[where] = rng.choice(where, size=where.size, replace=True)
    return out


def exponent_table(arrays: list[dict], fixed_sigma_rel: float, n_replicates: int = 1000, seed: int = 0):
    """Rows quantity (raw = L, minus_jstar = L − J*) × ema (fixed, best, best − fixed): the exponent against
    parameters and its 95% basic-bootstrap interval over the evaluation triples."""
    first = arrays[0]
    for a in arrays[1:]:
        for key in ("level", "half", "optimal_loss", "sigma_rel"):
            if not np.array_equal(a[key], first[key]):
                raise ValueError(f"ema_sweep: the models' sweeps differ in {key}: one evaluation set and σ_rel "
                                 "grid for all")
    hits = np.flatnonzero(np.isclose(first["sigma_rel"], fixed_sigma_rel, rtol=1e-9, atol=0))
    if hits.size != 1:
        raise ValueError(f"ema_sweep: the fixed σ_rel {fixed_sigma_rel} is not on the grid {first['sigma_rel']}")
    estimate = exponents_at(arrays, int(hits[0]))
    rng = np.random.default_rng(seed)
    replicates = [exponents_at(arrays, int(hits[0]), resampled_index(first, rng)) for _ in range(n_replicates)]
    rows = []
    for quantity in ("raw", "minus_jstar"):
        for ema in ("fixed", "best", "best - fixed"):
            def value(d):
                if ema == "best - fixed":
                    return d[(quantity, "best")] - d[(quantity, "fixed")]
                return d[(quantity, ema)]
            theta, reps = value(estimate), np.array([value(r) for r in replicates])
            lo, hi = np.nanpercentile(reps, [2.5, 97.5]) if np.isfinite(reps).any() else (np.nan, np.nan)
            rows.append({"quantity": quantity, "ema": ema, "fixed_sigma_rel": fixed_sigma_rel, "exponent": theta,
                         "ci_lo": 2 * theta - hi, "ci_hi": 2 * theta - lo, "n_models": len(arrays)})
    return pd.DataFrame(rows)


def collect(paths) -> pd.DataFrame:
    frames = [pd.read_csv(p) for p in paths]
    for p, f in zip(paths, frames):
        missing = [c for c in COLUMNS if c not in f]
        if missing or int(f["best"].sum()) != 1:
            raise ValueError(f"{p}: not an ema_sweep table (missing {missing} or not one best row)")
    return pd.concat(frames, ignore_index=True).sort_values(["params", "model", "sigma_rel"]).reset_index(drop=True)


def markdown(table: pd.DataFrame, exponents: pd.DataFrame | None, fixed_sigma_rel: float) -> str:
    """ema_sweep.md: each model's best EMA length and the exponents at the best and at the fixed length."""
    lines = ["# Loss against the EMA length", "",
             f"Final snapshots rebuilt post hoc at {table['sigma_rel'].nunique()} σ_rel values; the best is chosen "
             "on half A of the evaluation triples, every loss below is measured on half B. The study's other "
             f"tables (exponents.csv) stand at the snapshots' own EMA; under power profiles that is the first "
             f"stored σ_rel. Fixed length here: σ_rel {fixed_sigma_rel:g}.", "",
             "| model | params | best σ_rel | L at best (B) | L at fixed (B) | reconstruction residual |",
             "|---|---:|---:|---:|---:|---:|"]
    for model, rows in table.groupby("model", sort=False):
        best = rows[rows["best"].astype(bool)].iloc[0]
        fixed = rows[np.isclose(rows["sigma_rel"], fixed_sigma_rel)]
        at_fixed = f"{fixed['loss_b'].iloc[0]:.5g}" if len(fixed) else "–"
        lines.append(f"| {model} | {int(best['params']):,} | {best['sigma_rel']:g} | {best['loss_b']:.5g} ± "
                     f"{best['stderr_b']:.2g} | {at_fixed} | {best['residual_rel_l2']:.2g} |")
    if exponents is not None:
        lines += ["", "Exponents against parameters over the final snapshots (pure power law; 95% intervals: basic "
                  "bootstrap of the evaluation triples, paired):", ""] + ema_exponents_table(exponents, fixed_sigma_rel)
    return "\n".join(lines) + "\n"


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
    co.add_argument("--exponents", default=None, help="ema_exponents.csv (needs each sweep's .npz and 2+ models)")
    co.add_argument("--markdown", default=None, help="ema_sweep.md")
    co.add_argument("--fixed-sigma-rel", type=float, default=0.05, help="the fixed length compared with the best")
    co.add_argument("--n-replicates", type=int, default=1000)
    co.add_argument("--seed", type=int, default=0)
    integrity.add_stamp_options(co)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "evaluate":
            table, arrays = sweep_model(args.files, args.sigma_rel, args.dataset, args.eval_set, args.denoised,
                                        batch_size=args.batch_size, device=args.device)
            with atomic_path(triples_path(args.out)) as tmp, open(tmp, "wb") as f:
                np.savez(f, **arrays)  # first: the CSV (the rule's output) marks the job complete
            _atomic_csv(table, args.out)
            best = table[table["best"]].iloc[0]
            print(f"{best['model']}: best σ_rel {best['sigma_rel']:g} (chosen on half A), loss on half B "
                  f"{best['loss_b']:.5g} ± {best['stderr_b']:.2g} -> {args.out}")
        else:
            table = collect(args.sweeps)
            exponents = None
            if args.exponents:
                arrays = [dict(np.load(triples_path(p), allow_pickle=False)) for p in args.sweeps]
                if len(arrays) >= 2:
                    exponents = exponent_table(arrays, args.fixed_sigma_rel, args.n_replicates, args.seed)
                else:
                    exponents = pd.DataFrame(columns=["quantity", "ema", "fixed_sigma_rel", "exponent", "ci_lo",
                                                      "ci_hi", "n_models"])
                _atomic_csv(exponents, args.exponents)
            if args.markdown:
                with atomic_path(Path(args.markdown)) as tmp:
                    tmp.write_text(markdown(table, exponents if exponents is not None and len(exponents) else None,
                                            args.fixed_sigma_rel))
            _atomic_csv(table, args.out)
            plot_ema_sweep(table, args.figure)
            print(f"{table['model'].nunique()} models × {table['sigma_rel'].nunique()} σ_rel -> {args.out}")
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    integrity.stamp_outputs(args, args.out)  # collect's table (evaluate has no stamp options)
    return 0


if __name__ == "__main__":
    sys.exit(main())
