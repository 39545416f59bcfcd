"""Per-σ loss and excess of a checkpoint on the study's fixed evaluation set (docs/science.md, "Same footing").

Every snapshot and the optimal denoiser D* are evaluated on exactly the triples of the study's evaluation set
(analysis.eval_set), so for every σ of the grid

    L(σ)      = mean ‖Dθ(x) − x0‖² / D        the model's x0-loss (VE coordinates, per-dimension mean)
    J*(σ)     = mean ‖D*(x) − x0‖² / D        the optimal loss on the same triples
    excess(σ) = mean ‖Dθ(x) − D*(x)‖² / D     E‖Dθ − x0‖² = E‖D* − x0‖² + E‖Dθ − D*‖² because D* is the
                                              conditional mean: a direct, never-negative estimate of L − J*
    gap(σ)    = mean (‖Dθ − x0‖² − ‖D* − x0‖²) / D   = L − J*, with a paired standard error

with x = x0 + σ·ε. Standard errors are the sample standard deviation over the triples of that σ over √n. Each
snapshot also gets one total row under its training weighting (analysis.eval_set's quadrature), and its per-triple
errors for the study's bootstrap; analysis.collect_losses gathers every snapshot's files into losses.csv.

Every file this module reads (the evaluation set, D*, the dataset rows) is checked where it is read: against its
checksum sidecar (study.integrity) and against what it must hold; a bad file stops the reader with one line naming
it.

CLI (what the workflow rules call; every step also runs by hand):
    python -m analysis.evaluate make-set --dataset DATA.npz --num-sigmas 12 --sigma-min 0.002 --sigma-max 80 \
        --samples-per-sigma 256 --seed 1234 --out eval_set.npz
    python -m analysis.evaluate snapshot --snapshot S1.pt [S2.pt …] --dataset DATA.npz --eval-set eval_set.npz \
        --denoised eval_denoised.npy --out EVAL1.csv [EVAL2.csv …] [--per-triple]
    python -m analysis.evaluate collect --eval A.csv B.csv … [--jstar jstar.csv] --out losses.csv \
        --invariant invariant.csv
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from analysis.collect_losses import LOSS_COLUMNS, collect, collect_per_triple, triples_path, warn_invariant
from analysis.eval_set import (
    eval_noise,
    load_eval_set,
    make_eval_set,
    npz_num_items,
    save_eval_set,
    sigma_grid,
    total_weights,
    variant_fns,
    weighted_totals,
)
from analysis.resample import save_per_triple
from models.denoiser import Denoiser
from study import integrity
from study.atomic import atomic_path
from study.tables import STATS
from training.dataset import check_rows_finite, open_dataset

# ---------------------------------------------------------------------------------------------------------------
# the evaluation's inputs: D* and the dataset rows of the evaluation set
# ---------------------------------------------------------------------------------------------------------------

def load_denoised(path, shape: tuple[int, int] | None = None) -> np.ndarray:
    """D* of every evaluation triple (optimal_loss/eval_denoised.npy), memory-mapped, checked against its sidecar,
    its shape [M, D] (when `shape` is given) and finite values, one chunk of rows at a time."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"D* file not found: {path}")
    integrity.verify(path)
    try:
        den = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as e:
        raise integrity.invalid(path, f"unreadable ({type(e).__name__}: {e})") from None
    if den.ndim != 2 or (shape is not None and tuple(den.shape) != tuple(shape)):
        want = f"[{shape[0]}, {shape[1]}] (evaluation triples × data dims)" if shape is not None else "2-D"
        raise integrity.invalid(path, f"D* has shape {list(den.shape)}, expected {want} — was it made for this "
                                      "evaluation set and dataset?")
    step = max(1, (64 << 20) // max(1, den.shape[1] * den.itemsize))
    for lo in range(0, den.shape[0], step):
        block = np.asarray(den[lo:lo + step])
        if not np.all(np.isfinite(block)):
            row = lo + int(np.flatnonzero(~np.isfinite(block).all(axis=1))[0])
            raise integrity.invalid(path, f"non-finite D* at triple {row}")
    return den


def load_rows(dataset, eval_set: dict):
    """Only the dataset rows the evaluation set uses, as float32 (training.dataset.open_dataset's rows: a dataset file is
    memory-mapped and only these rows are read and converted), their labels (or None), and a copy of the evaluation
    set whose `index` points into those rows."""
    index = np.asarray(eval_set["index"], dtype=np.int64)
    rows, inverse = np.unique(index, return_inverse=True)
    data = open_dataset(dataset)
    if rows.size and (rows[0] < 0 or rows[-1] >= len(data)):
        raise ValueError(f"evaluation set indexes items [{rows[0]}, {rows[-1]}] but {dataset} has {len(data)} "
                         "items — was it made for this dataset?")
    x = data.rows(rows)
    check_rows_finite(data, rows, x)  # one line naming the file, not a NaN loss
    labels = None if data.labels is None else data.labels[torch.from_numpy(rows)]
    return x, labels, {**eval_set, "index": inverse.reshape(-1).astype(np.int64)}


# ---------------------------------------------------------------------------------------------------------------
# evaluating a denoiser on the triples
# ---------------------------------------------------------------------------------------------------------------

class EvaluationInputs:
    """The evaluation set made ready for the denoisers of one job: per batch of triples the noisy input
    x = x0 + σ·ε (float32), σ and the labels, and per triple ‖D* − x0‖²/D — built once and shared by every snapshot
    the job evaluates (`errors`).

    x_data [N,C,H,W] (the rows the evaluation set indexes); denoised = D* of every triple [M, D]
    (optimal_loss/eval_denoised.npy, read batch by batch)."""

    def __init__(self, x_data, eval_set: dict, denoised, *, labels=None, batch_size: int = 512):
        x_data = torch.as_tensor(x_data)
        self.shape = tuple(x_data.shape[1:])
        self.dim = int(np.prod(self.shape))
        index, sigma, seeds = eval_set["index"], eval_set["sigma"], eval_set["noise_seed"]
        self.m = m = len(index)
        if denoised.shape[0] != m or int(np.prod(denoised.shape[1:])) != self.dim:
            raise ValueError(f"D* array has shape {list(denoised.shape)}; the evaluation set needs [{m}, {self.dim}] "
                             f"(M triples × data dims {list(self.shape)}) — was it made for this eval set and "
                             "dataset?")
        if m and (int(index.min()) < 0 or int(index.max()) >= x_data.shape[0]):
            raise ValueError(f"evaluation set indexes [{int(index.min())}, {int(index.max())}] but the dataset has "
                             f"{x_data.shape[0]} items — was it made for this dataset?")
        self.denoised = denoised
        self.batches = []
        self.optimal_loss = np.empty(m, dtype=np.float64)
        for lo in range(0, m, int(batch_size)):
            hi = min(lo + int(batch_size), m)
            x0 = x_data[torch.as_tensor(index[lo:hi])].to(torch.float32)
            s = torch.as_tensor(sigma[lo:hi], dtype=torch.float32)
            x = x0 + s.view(-1, *([1] * len(self.shape))) * eval_noise(self.shape, seeds[lo:hi])
            lab = None if labels is None else torch.as_tensor(labels)[torch.as_tensor(index[lo:hi])]
            self.batches.append((lo, hi, x, s, lab, x0))
            self.optimal_loss[lo:hi] = ((self._dstar(lo, hi) - self._x0_64(x0)) ** 2).mean(1).numpy()

    def _x0_64(self, x0):
        return x0.to(torch.float64).reshape(x0.shape[0], self.dim)

    def _dstar(self, lo, hi):
        return torch.from_numpy(np.array(self.denoised[lo:hi], dtype=np.float64)).reshape(hi - lo, self.dim)

    def errors(self, denoise, *, device=None, labelled: bool = True) -> dict:
        """Squared errors per triple (float64 [M] each, per-dimension means): `loss` ‖Dθ − x0‖²/D, `optimal_loss`
        ‖D* − x0‖²/D, `excess` ‖Dθ − D*‖²/D, `gap` = loss − optimal_loss.  denoise(x [B,C,H,W] float32, sigma [B]
        float32, labels [B] int64 or None) -> [B,C,H,W]; `labelled` False passes labels None (an unconditional
        net)."""
        out = {"loss": np.empty(self.m, dtype=np.float64), "optimal_loss": self.optimal_loss.copy(),
               "excess": np.empty(self.m, dtype=np.float64)}
        for lo, hi, x, s, lab, x0 in self.batches:
            lab = lab if labelled else None
            if device is not None:
                x, s = x.to(device), s.to(device)
                lab = None if lab is None else lab.to(device)
            with torch.inference_mode():
                d = denoise(x, s, lab).detach().to("cpu", torch.float64).reshape(hi - lo, self.dim)
            x0_64, dstar = self._x0_64(x0), self._dstar(lo, hi)
            out["loss"][lo:hi] = ((d - x0_64) ** 2).mean(1).numpy()
            out["excess"][lo:hi] = ((d - dstar) ** 2).mean(1).numpy()
        out["gap"] = out["loss"] - out["optimal_loss"]
        return out


def per_sigma_table(errors: dict, sigma) -> pd.DataFrame:
    """Mean and standard error of each statistic for every σ of the evaluation set (rows in ascending σ)."""
    sigma = np.asarray(sigma, dtype=np.float64)
    rows = []
    for s in np.unique(sigma):
        sel = sigma == s
        n = int(sel.sum())
        row = {"sigma": float(s), "n": n}
        for k in STATS:
            v = errors[k][sel]
            row[k] = float(v.mean())
            row[f"{k}_stderr"] = float(v.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
        rows.append(row)
    return pd.DataFrame(rows)

def evaluate_snapshots(snapshots, dataset, eval_set, denoised, *, batch_size: int = 512, device=None):
    """Evaluate several snapshot files on one evaluation set, reading the evaluation set, the dataset rows, D* and
    the noisy inputs once (EvaluationInputs): yields, per snapshot in order, its per-σ rows and one total row
    (sigma NaN, weighting "training") with the snapshot's model, arch, params, images_seen and flops on every
    row, and its per-triple arrays (`triple_arrays`) that the study's bootstrap resamples."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    ev = load_eval_set(eval_set) if not isinstance(eval_set, dict) else eval_set
    x_rows, label_rows, ev = load_rows(dataset, ev)
    if not isinstance(denoised, np.ndarray):
        denoised = load_denoised(denoised, (len(ev["index"]), int(np.prod(x_rows.shape[1:]))))
    inputs = EvaluationInputs(x_rows, ev, denoised, labels=label_rows, batch_size=batch_size)
    for snapshot in snapshots:
        yield _evaluate_one(snapshot, dataset, inputs, ev, label_rows is not None, device)


def _evaluate_one(snapshot, dataset, inputs: EvaluationInputs, ev: dict, has_labels: bool, device):
    den = Denoiser.from_snapshot(snapshot, device=device)
    info = dict(den.snapshot_info)
    if den.label_dim > 0 and not has_labels:
        raise ValueError(f"{snapshot}: the network is class-conditional but dataset {dataset} has no labels")

    def denoise(x, s, lab):
        return den(x, s, lab)

    errors = inputs.errors(denoise, device=device, labelled=den.label_dim > 0)
    bad = ~np.isfinite(errors["loss"])
    if bad.any():  # a diverged model: no NaN may reach a table or a fit
        raise ValueError(f"{snapshot}: the denoiser's output is not finite at {int(bad.sum())} of {bad.size} "
                         f"evaluation triples (σ = {np.unique(ev['sigma'][bad])[:3].tolist()} ...): its training "
                         "diverged; retrain the model (e.g. a lower training.lr)")
    table = per_sigma_table(errors, ev["sigma"])
    table["weighting"] = "none"
    density, weight = variant_fns(den.variant)
    weights = total_weights(table["sigma"].to_numpy(dtype=np.float64), density, weight)
    total = {"sigma": math.nan, "weighting": "training", **weighted_totals(table, density, weight)}
    df = pd.concat([table, pd.DataFrame([total])], ignore_index=True)
    df.insert(0, "model", info.get("model"))
    df.insert(1, "arch", den.snapshot_arch.get("name"))
    df.insert(2, "params", int(info.get("params")))
    df.insert(3, "images_seen", int(info.get("images_seen")))
    df.insert(4, "flops", float(info.get("flops")))
    return df[LOSS_COLUMNS], triple_arrays(errors, ev["sigma"], weights)


def triple_arrays(errors: dict, sigma, weights) -> dict:
    """One snapshot's per-triple errors with the σ level (1..K, ascending) of each triple and its total's weights."""
    grid, level = np.unique(np.asarray(sigma, dtype=np.float64), return_inverse=True)
    return {"sigma": grid, "level": level.astype(np.int64) + 1, "loss": errors["loss"],
            "excess": errors["excess"], "optimal_loss": errors["optimal_loss"],
            "total_weight": np.asarray(weights, dtype=np.float64)}


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------

def _atomic_csv(df: pd.DataFrame, path) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def _parser() -> argparse.ArgumentParser:
    """The CLI's three subcommands (make-set, snapshot, collect), each able to stamp its own outputs."""
    ap = argparse.ArgumentParser(prog="python -m analysis.evaluate", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    mk = sub.add_parser("make-set", help="draw the fixed (index, σ, noise seed) evaluation triples")
    src = mk.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", help="dataset .npz (its N is read from the header)")
    src.add_argument("--n-data", type=int, help="number of training items N")
    mk.add_argument("--num-sigmas", type=int, default=12)
    mk.add_argument("--sigma-min", type=float, default=0.002)
    mk.add_argument("--sigma-max", type=float, default=80.0)
    mk.add_argument("--samples-per-sigma", type=int, default=256)
    mk.add_argument("--seed", type=int, default=1234)
    mk.add_argument("--out", required=True)

    sn = sub.add_parser("snapshot", help="per-σ loss, excess and J* of snapshots on the evaluation set (several: "
                                         "the evaluation set, the data rows and D* read once)")
    sn.add_argument("--snapshot", required=True, nargs="+", help="snapshot files; one --out each, in order")
    sn.add_argument("--dataset", required=True)
    sn.add_argument("--eval-set", required=True)
    sn.add_argument("--denoised", required=True, help="D* on the evaluation set (optimal_loss/eval_denoised.npy)")
    sn.add_argument("--out", required=True, nargs="+", help="the evaluation CSV of each --snapshot")
    sn.add_argument("--batch-size", type=int, default=512)
    sn.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    sn.add_argument("--per-triple", action="store_true",
                    help="also write the per-triple errors beside --out (same name, .npz) for the study's bootstrap")

    co = sub.add_parser("collect", help="all snapshot CSVs -> losses.csv, with the L >= J* invariant check")
    co.add_argument("--eval", nargs="+", required=True, help="per-snapshot CSVs")
    co.add_argument("--jstar", default=None, help="optimal_loss/jstar.csv (adds jstar_grid)")
    co.add_argument("--out", required=True, help="losses.csv")
    co.add_argument("--invariant", required=True, help="per-σ invariant check CSV")
    co.add_argument("--per-triple", default=None,
                    help="write the study's per-triple arrays here (needs each CSV's .npz from `snapshot --per-triple`)")
    for p in (mk, sn, co):
        integrity.add_stamp_options(p)
    return ap


def main(argv=None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)

    try:
        if args.cmd == "make-set":
            n = args.n_data if args.n_data is not None else npz_num_items(args.dataset)
            grid = sigma_grid(args.num_sigmas, args.sigma_min, args.sigma_max)
            ev = make_eval_set(n, grid, args.samples_per_sigma, args.seed)
            save_eval_set(ev, args.out)
            print(f"evaluation set: {len(ev['index'])} triples ({args.num_sigmas} σ in "
                  f"[{args.sigma_min:g}, {args.sigma_max:g}] × {args.samples_per_sigma}) over N={n} -> {args.out}")
        elif args.cmd == "snapshot":
            if len(args.out) != len(args.snapshot):
                ap.error(f"snapshot: {len(args.snapshot)} --snapshot files but {len(args.out)} --out files "
                         "(one each, in order)")
            results = evaluate_snapshots(args.snapshot, args.dataset, args.eval_set, args.denoised,
                                         batch_size=args.batch_size, device=args.device)
            for snapshot, out, (df, triples) in zip(args.snapshot, args.out, results):
                if args.per_triple:  # written first: the CSV (the rule's declared output) marks the job complete
                    with atomic_path(triples_path(out)) as tmp:
                        with open(tmp, "wb") as f:
                            np.savez(f, **triples)
                _atomic_csv(df, out)
                tot = df[df["sigma"].isna()].iloc[0]
                print(f"{snapshot}: total L={tot['loss']:.5g} J*={tot['optimal_loss']:.5g} "
                      f"excess={tot['excess']:.5g} -> {out}", flush=True)
        else:
            losses, inv = collect(args.eval, args.jstar)
            if args.per_triple:
                save_per_triple(args.per_triple, collect_per_triple(losses, args.eval))
            _atomic_csv(losses, args.out)
            _atomic_csv(inv, args.invariant)
            n_bad = warn_invariant(inv)
            print(f"{len(losses)} rows ({losses['model'].nunique()} models) -> {args.out}; "
                  f"invariant violations: {n_bad} -> {args.invariant}")
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.cmd == "snapshot":
        integrity.stamp_outputs(args, *args.out, *(triples_path(o) for o in args.out if args.per_triple))
    else:  # make-set: --out; collect: --out, --invariant and --per-triple
        integrity.stamp_outputs(args, args.out, getattr(args, "invariant", None), getattr(args, "per_triple", None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
