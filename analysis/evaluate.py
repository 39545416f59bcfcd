"""Per-σ loss and excess of a checkpoint on the study's fixed evaluation set (docs/science.md, "Same footing").

A study fixes one evaluation set of (x0 index, σ, ε-seed) triples drawn from the training set. Every snapshot and
the optimal denoiser D* are evaluated on exactly those triples, so for every σ of the grid

    L(σ)      = mean ‖Dθ(x) − x0‖² / D        the model's x0-loss (VE coordinates, per-dimension mean)
    J*(σ)     = mean ‖D*(x) − x0‖² / D        the optimal loss on the same triples
    excess(σ) = mean ‖Dθ(x) − D*(x)‖² / D     E‖Dθ − x0‖² = E‖D* − x0‖² + E‖Dθ − D*‖² because D* is the
                                              conditional mean: a direct, never-negative estimate of L − J*
    gap(σ)    = mean (‖Dθ − x0‖² − ‖D* − x0‖²) / D   = L − J*, with a paired standard error

with x = x0 + σ·ε. Standard errors are the sample standard deviation over the triples of that σ over √n.

Totals under the study's training weighting. The variant trains on E_σ[λ(σ)·‖D − x0‖²/D] with ln σ drawn from the
density p (`Variant.sigma_density`) and λ = `Variant.loss_weight`. On the evaluation grid u_k = ln σ_k the total is
the quadrature

    total = Σ_k a_k λ_k L_k / Σ_k a_k,     a_k = q_k · p(u_k),

where q_k are the trapezoid weights of the grid in u = ln σ (for the usual geometric grid: Δu·[½, 1, …, 1, ½]; a
single σ gets weight 1). Dividing by Σ a_k makes it the training loss conditioned on σ lying in the grid's range
(a constant factor in p cancels, and so does the probability mass outside [σ_min, σ_max]). L, J*, excess and gap
get the same weights, so total L − total J* = total gap exactly. The σ's are independent samples, so the total's
standard error is sqrt(Σ_k (a_k λ_k / Σ a)² s.e._k²).

Every file this module reads back (the evaluation set, D*, the per-snapshot CSVs and per-triple files, jstar.csv,
losses.csv) is checked where it is read: against its checksum sidecar (study.integrity; the workflow stamps every
file a job writes) and against what the file must hold (columns, one row per σ of one grid, a total row, finite
values). A bad file stops the reader with one line naming it and the command that rebuilds it; no NaN and no
missing row reaches a fit.

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

from analysis.resample import save_per_triple
from models.denoiser import Denoiser
from study import integrity
from study.atomic import atomic_path
from study.tables import STATS, check_finite_statistics, read_checked_csv, read_checked_npz, read_jstar
from training.dataset import check_rows_finite, open_dataset

# the per-σ statistics and their column names in every CSV this module writes
INVARIANT_SIGMAS = 3.0  # L(σ) ≥ J*(σ) − 3 s.e. is the checked invariant
LOSS_COLUMNS = ["model", "arch", "params", "images_seen", "flops", "sigma", "weighting", "n",
                "loss", "loss_stderr", "optimal_loss", "optimal_loss_stderr", "excess", "excess_stderr",
                "gap", "gap_stderr"]


# ---------------------------------------------------------------------------------------------------------------
# the evaluation set
# ---------------------------------------------------------------------------------------------------------------

def sigma_grid(num_sigmas: int, sigma_min: float, sigma_max: float) -> np.ndarray:
    """`num_sigmas` noise levels evenly spaced in ln σ from sigma_min to sigma_max (float64): the σ grid of the
    evaluation set and of the J* table alike. One level sits at the geometric midpoint √(sigma_min·sigma_max), the
    centre of the range on the log scale every grid is spaced on."""
    num_sigmas = int(num_sigmas)
    if num_sigmas < 1:
        raise ValueError(f"num_sigmas must be >= 1, got {num_sigmas}")
    if not (0 < sigma_min <= sigma_max < math.inf):
        raise ValueError(f"σ range must satisfy 0 < sigma_min <= sigma_max < inf, got [{sigma_min}, {sigma_max}]")
    if num_sigmas == 1:
        return np.array([math.sqrt(sigma_min * sigma_max)])
    return np.geomspace(sigma_min, sigma_max, num_sigmas)


def make_eval_set(n_data: int, sigmas, samples_per_sigma: int, seed: int) -> dict:
    """The fixed (x0 index, σ, ε-seed) triples: `samples_per_sigma` per σ, ordered σ by σ.

    Indices of one σ are distinct (a random subset) while samples_per_sigma <= n_data, else drawn with
    replacement. Noise seeds are distinct consecutive integers from a seeded random base, so every triple has its
    own ε (see `eval_noise`). Returns {index int64 [M], sigma float64 [M], noise_seed int64 [M]}; a pure function
    of the arguments."""
    n_data, k = int(n_data), int(samples_per_sigma)
    if n_data < 1:
        raise ValueError(f"make_eval_set: n_data must be >= 1, got {n_data}")
    if k < 1:
        raise ValueError(f"make_eval_set: samples_per_sigma must be >= 1, got {k}")
    sigmas = np.atleast_1d(np.asarray(sigmas, dtype=np.float64))
    if sigmas.ndim != 1 or sigmas.size == 0:
        raise ValueError(f"make_eval_set: sigmas must be a non-empty 1-D list, got shape {sigmas.shape}")
    if not np.all(np.isfinite(sigmas) & (sigmas > 0)):
        raise ValueError(f"make_eval_set: every σ must be finite and > 0, got {sigmas.tolist()}")
    rng = np.random.default_rng(int(seed))
    index = []
    for _ in sigmas:
        if k <= n_data:
            index.append(rng.permutation(n_data)[:k])
        else:
            index.append(rng.integers(0, n_data, size=k))
    m = k * sigmas.size
    base = int(rng.integers(0, 2**40))
    return {"index": np.concatenate(index).astype(np.int64),
            "sigma": np.repeat(sigmas, k),
            "noise_seed": (base + np.arange(m)).astype(np.int64)}


def eval_noise(shape, seeds):
    """ε for each triple: torch.randn(shape, generator=torch.Generator().manual_seed(seed)), stacked
    [len(seeds), *shape] float32 — each triple's noise depends on its own seed only (docs/internals.md)."""
    shape = tuple(int(s) for s in shape)
    seeds = np.atleast_1d(np.asarray(seeds, dtype=np.int64))
    out = torch.empty((len(seeds),) + shape, dtype=torch.float32)
    gen = torch.Generator()
    for i, s in enumerate(seeds.tolist()):
        gen.manual_seed(int(s))
        out[i] = torch.randn(shape, generator=gen)
    return out


def save_eval_set(eval_set: dict, path) -> Path:
    """Write the triples to an .npz atomically (temp file + rename)."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, index=eval_set["index"], sigma=eval_set["sigma"], noise_seed=eval_set["noise_seed"])
    return path


def _read_npz(path, keys) -> dict:
    """read_checked_npz of a file that must exist (FileNotFoundError naming it otherwise)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"not found: {path}")
    return read_checked_npz(path, keys)


def load_eval_set(path) -> dict:
    """The evaluation triples of an eval_set.npz, validated: three 1-D arrays of one length, integer indices ≥ 0
    and seeds, finite positive σ."""
    out = _read_npz(path, ("index", "sigma", "noise_seed"))
    bad = [k for k, v in out.items() if v.ndim != 1]
    if bad or len({len(v) for v in out.values()}) != 1:
        raise integrity.invalid(path, f"index, sigma and noise_seed must be 1-D of one length, got shapes "
                                      f"{ {k: list(v.shape) for k, v in out.items()} }")
    if not (np.issubdtype(out["index"].dtype, np.integer) and np.issubdtype(out["noise_seed"].dtype, np.integer)):
        raise integrity.invalid(path, "index and noise_seed must be integers")
    if out["index"].size and out["index"].min() < 0:
        raise integrity.invalid(path, f"negative index {int(out['index'].min())}")
    if not np.all(np.isfinite(out["sigma"]) & (out["sigma"] > 0)):
        raise integrity.invalid(path, "σ values must be finite and > 0")
    return out


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


def npz_num_items(path) -> int:
    """N of a dataset file, from its array header only (training.dataset.open_dataset maps, it does not read)."""
    return len(open_dataset(path))


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


def trapezoid_log_weights(sigmas) -> np.ndarray:
    """Trapezoid quadrature weights q_k on u = ln σ for an ascending grid (weight 1 for a single σ)."""
    u = np.log(np.asarray(sigmas, dtype=np.float64))
    if u.size == 1:
        return np.ones(1)
    if np.any(np.diff(u) <= 0):
        raise ValueError("σ grid must be strictly ascending for the quadrature")
    du = np.diff(u)
    q = np.zeros_like(u)
    q[:-1] += du / 2
    q[1:] += du / 2
    return q


def total_weights(sigmas, sigma_density, loss_weight) -> np.ndarray:
    """The weights c_k = a_k·λ_k / Σ a with a_k = q_k·p(ln σ_k): total = Σ_k c_k·S_k for any per-σ statistic S."""
    sig = np.asarray(sigmas, dtype=np.float64)
    p = np.asarray(sigma_density(sig), dtype=np.float64).reshape(-1)
    lam = np.asarray(loss_weight(sig), dtype=np.float64).reshape(-1)
    a = trapezoid_log_weights(sig) * p
    if not np.all(np.isfinite(a)) or a.sum() <= 0:
        raise ValueError(f"the training σ distribution puts no mass on the evaluation grid "
                         f"[{sig.min():.4g}, {sig.max():.4g}]; widen evaluation.sigma_min/sigma_max")
    return a * lam / a.sum()


def weighted_totals(table: pd.DataFrame, sigma_density, loss_weight) -> dict:
    """Totals of the per-σ table under the training weighting (module docstring): for each statistic S,
    Σ a_k λ_k S_k / Σ a_k with a_k = q_k·p(ln σ_k), and its standard error.

    sigma_density(σ array) -> density of ln σ; loss_weight(σ array) -> λ(σ) (numpy in, array-likes out)."""
    c = total_weights(table["sigma"].to_numpy(dtype=np.float64), sigma_density, loss_weight)
    out = {"n": int(table["n"].sum())}
    for k in STATS:
        out[k] = float(np.sum(c * table[k].to_numpy(dtype=np.float64)))
        se = table[f"{k}_stderr"].to_numpy(dtype=np.float64)
        out[f"{k}_stderr"] = float(np.sqrt(np.sum((c * se) ** 2)))
    return out


def variant_fns(variant):
    """numpy wrappers of a models.diffusion.Variant's sigma_density and loss_weight (computed in float64)."""
    def density(s):
        return variant.sigma_density(torch.tensor(np.array(s, dtype=np.float64))).numpy()

    def weight(s):
        return variant.loss_weight(torch.tensor(np.array(s, dtype=np.float64))).numpy()

    return density, weight


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


def _triples_path(eval_csv) -> Path:
    """Where `snapshot --per-triple` puts a snapshot's per-triple arrays: beside its CSV, same stem."""
    return Path(eval_csv).with_suffix(".npz")


TRIPLE_KEYS = ("sigma", "level", "loss", "excess", "optimal_loss", "total_weight")


def read_eval_csv(path) -> pd.DataFrame:
    """One snapshot's evaluation CSV, checked against its sidecar and validated: the LOSS_COLUMNS, one model and
    snapshot, per-σ rows (weighting `none`) at distinct ascending σ > 0 followed by one total row (σ empty,
    weighting `training`), finite statistics (a standard error may be missing only where n = 1)."""
    df = read_checked_csv(path, LOSS_COLUMNS, "evaluation CSV")
    per, total = df[df["sigma"].notna()], df[df["sigma"].isna()]
    if len(total) != 1 or not df["sigma"].iloc[-1:].isna().all() or per.empty:
        raise integrity.invalid(path, f"{len(per)} per-σ rows and {len(total)} total rows; expected per-σ rows "
                                      "and one total row, last")
    sig = per["sigma"].to_numpy(np.float64)
    if not (np.all(np.isfinite(sig) & (sig > 0)) and np.all(np.diff(sig) > 0)):
        raise integrity.invalid(path, "σ values must be finite, > 0, distinct and ascending")
    if df["model"].nunique(dropna=False) != 1 or df["images_seen"].nunique(dropna=False) != 1:
        raise integrity.invalid(path, "rows of several snapshots (model, images_seen)")
    if set(per["weighting"]) != {"none"} or set(total["weighting"]) != {"training"}:
        raise integrity.invalid(path, "weighting must be `none` on per-σ rows and `training` on the total")
    check_finite_statistics(df, path)
    return df


def read_triples(path, per_sigma: pd.DataFrame | None = None) -> dict:
    """One snapshot's per-triple arrays (the .npz beside its CSV), checked against its sidecar and validated:
    shapes, levels 1..K, finite values; with the CSV's per-σ rows, the same σ grid and the same per-σ means."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"per-triple errors not found: {path} (written by `analysis.evaluate snapshot "
                                f"--per-triple`)")
    a = _read_npz(path, TRIPLE_KEYS)
    k, m = a["sigma"].size, a["loss"].size
    shapes = {"sigma": (k,), "level": (m,), "loss": (m,), "excess": (m,), "optimal_loss": (m,),
              "total_weight": (k,)}
    bad = [f"{key} {list(a[key].shape)}" for key, shape in shapes.items() if a[key].shape != shape]
    if bad or not np.issubdtype(a["level"].dtype, np.integer):
        raise integrity.invalid(path, f"array shapes do not fit together ({', '.join(bad) or 'level not integer'})")
    if m and (a["level"].min() < 1 or a["level"].max() > k):
        raise integrity.invalid(path, f"level must index the σ grid 1..{k}")
    for key in ("sigma", "loss", "excess", "optimal_loss", "total_weight"):
        if not np.all(np.isfinite(a[key])):
            raise integrity.invalid(path, f"non-finite {key}")
    if per_sigma is not None:
        sig = per_sigma["sigma"].to_numpy(np.float64)
        if sig.shape != a["sigma"].shape or not np.allclose(sig, a["sigma"], rtol=1e-12, atol=0):
            raise integrity.invalid(path, "its σ grid differs from its evaluation CSV's")
        counts = np.bincount(a["level"], minlength=k + 1)[1:]
        for key in ("loss", "optimal_loss", "excess"):
            means = np.bincount(a["level"], weights=a[key], minlength=k + 1)[1:] / np.maximum(counts, 1)
            if not np.allclose(means, per_sigma[key].to_numpy(np.float64), rtol=1e-9, atol=1e-300):
                raise integrity.invalid(path, f"its per-σ means of {key} differ from its evaluation CSV's")
    return a


def collect_per_triple(losses: pd.DataFrame, eval_csvs) -> dict:
    """The study's per-triple arrays (analysis.resample's per_triple.npz) from every snapshot's .npz beside its
    CSV, in the snapshot order of ``losses``. All snapshots must share the evaluation set."""
    by_key = {}
    for p in eval_csvs:
        csv = read_eval_csv(p)
        head = csv.iloc[0]
        by_key[(str(head["model"]), int(head["images_seen"]))] = read_triples(_triples_path(p),
                                                                              csv[csv["sigma"].notna()])
    snaps = losses[losses["sigma"].isna()][["model", "params", "images_seen", "flops"]].reset_index(drop=True)
    first = next(iter(by_key.values()))
    rows = []
    for _, r in snaps.iterrows():
        a = by_key[(str(r["model"]), int(r["images_seen"]))]
        for k in ("sigma", "level", "optimal_loss"):
            if a[k].shape != first[k].shape or not np.array_equal(a[k], first[k]):
                raise ValueError(f"snapshot {r['model']}@{int(r['images_seen'])} was evaluated on another "
                                 f"evaluation set ({k} differs); re-evaluate every snapshot on one set")
        rows.append(a)
    return {"sigma": first["sigma"], "level": first["level"], "optimal_loss": first["optimal_loss"],
            "loss": np.stack([a["loss"] for a in rows]), "excess": np.stack([a["excess"] for a in rows]),
            "total_weight": np.stack([a["total_weight"] for a in rows]),
            "model": snaps["model"].astype(str).to_numpy(), "params": snaps["params"].to_numpy(np.int64),
            "images_seen": snaps["images_seen"].to_numpy(np.int64), "flops": snaps["flops"].to_numpy(np.float64)}


# ---------------------------------------------------------------------------------------------------------------
# collecting every snapshot's CSV into losses.csv, with the invariant check
# ---------------------------------------------------------------------------------------------------------------

def interp_log_sigma(sigma_grid_, values, sigma) -> np.ndarray:
    """Linear interpolation in ln σ; NaN outside the grid (no extrapolation)."""
    sg = np.asarray(sigma_grid_, dtype=np.float64)
    order = np.argsort(sg)
    u, v = np.log(sg[order]), np.asarray(values, dtype=np.float64)[order]
    s = np.asarray(sigma, dtype=np.float64)
    out = np.full(s.shape, np.nan)
    ok = np.isfinite(s) & (s > 0)
    us = np.log(np.where(ok, s, 1.0))
    inside = ok & (us >= u[0] - 1e-12) & (us <= u[-1] + 1e-12)
    out[inside] = np.interp(us[inside], u, v)
    return out


def _z(diff: pd.Series, se: pd.Series) -> pd.Series:
    """diff / se; with se = 0 (identical values), +inf or −inf by the sign of diff (0 counts as ≥ 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        z = diff / se.where(se > 0)
    zero = se == 0
    return z.where(~zero, np.where(diff >= 0, np.inf, -np.inf))


def check_invariant(df: pd.DataFrame, k: float = INVARIANT_SIGMAS) -> pd.DataFrame:
    """Adds `invariant_z` and `invariant_ok` to the per-σ rows (NaN / True on totals).

    Two checks, both must hold: (a) on the same triples, the paired gap L − J* ≥ −k·s.e.(gap) (a significantly
    negative gap means D* is not the posterior mean of these x_t: wrong σ, labels or data); (b) where the grid
    J*(σ) of optimal_loss/jstar.csv covers that σ (`jstar_grid`, with `jstar_covered` True when given), L ≥
    J*_grid − k·sqrt(s.e.(L)² + s.e.(J*_grid)²). invariant_z is the smaller of the two z-scores. A row whose
    check cannot be made because a value it needs is not finite (L, its gap or their standard errors, or J*_grid
    where the grid covers σ) has invariant_z NaN and invariant_ok False: nothing unchecked passes."""
    df = df.copy()
    per = df["sigma"].notna()
    needed = [df[c] for c in ("loss", "loss_stderr", "gap", "gap_stderr")]
    z = _z(df["gap"], df["gap_stderr"])
    if "jstar_grid" in df:
        covered = df["jstar_covered"].astype(bool) if "jstar_covered" in df else df["jstar_grid"].notna()
        js_se = df["jstar_grid_stderr"].fillna(0.0) if "jstar_grid_stderr" in df else 0.0
        z_grid = _z(df["loss"] - df["jstar_grid"], np.sqrt(df["loss_stderr"] ** 2 + js_se ** 2))
        z = pd.concat([z, z_grid.where(covered)], axis=1).min(axis=1, skipna=True)
        needed.append(df["jstar_grid"].where(covered, 0.0))
    finite = np.logical_and.reduce([np.isfinite(pd.to_numeric(c, errors="coerce").to_numpy(np.float64))
                                    for c in needed])
    df["invariant_z"] = np.where(per & finite, z, np.nan)
    df["invariant_ok"] = ~(per & (~finite | (df["invariant_z"] < -k)))
    return df


def collect(eval_csvs, jstar_csv=None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Concatenate per-snapshot CSVs into the study's losses table (sorted by params, images seen, σ; totals
    last), add `jstar_grid` (+ stderr) from jstar.csv, and run the invariant check. Returns (losses, invariant)
    where `invariant` holds every per-σ row's check (model, images_seen, sigma, loss, optimal_loss, z, ok)."""
    frames, seen, grid = [], {}, None
    for p in eval_csvs:
        one = read_eval_csv(p)
        key = (str(one["model"].iloc[0]), int(one["images_seen"].iloc[0]))
        if key in seen:
            raise ValueError(f"{p} and {seen[key]} both hold snapshot {key[0]}@{key[1]}")
        seen[key] = p
        sig = one["sigma"].dropna().to_numpy(np.float64)
        if grid is None:
            grid = (p, sig)
        elif sig.shape != grid[1].shape or not np.allclose(sig, grid[1], rtol=1e-12, atol=0):
            raise integrity.invalid(p, f"its σ grid ({sig.size} σ) differs from {grid[0]}'s ({grid[1].size} σ): "
                                       "every snapshot must be evaluated on one evaluation set")
        frames.append(one)
    if not frames:
        raise ValueError("collect: no evaluation CSVs given")
    df = pd.concat(frames, ignore_index=True)
    if jstar_csv is not None:
        js = read_jstar(jstar_csv)
        df["jstar_grid"] = interp_log_sigma(js["sigma"], js["optimal_loss"], df["sigma"])
        df["jstar_grid_stderr"] = interp_log_sigma(js["sigma"], js["stderr"], df["sigma"])
        df["jstar_covered"] = np.isfinite(interp_log_sigma(js["sigma"], np.zeros(len(js)), df["sigma"]))
    df = check_invariant(df).drop(columns=["jstar_covered"], errors="ignore")
    df["_total"] = df["sigma"].isna()
    df = df.sort_values(["params", "model", "images_seen", "_total", "sigma"]).drop(columns="_total")
    df = df.reset_index(drop=True)
    per = df[df["sigma"].notna()]
    cols = ["model", "params", "images_seen", "sigma", "loss", "loss_stderr", "optimal_loss", "gap",
            "gap_stderr"] + [c for c in ("jstar_grid",) if c in df] + ["invariant_z", "invariant_ok"]
    return df, per[cols].reset_index(drop=True)


def warn_invariant(invariant: pd.DataFrame, stream=None) -> int:
    """Print a loud warning listing every violation (and every row that could not be checked); returns their
    number."""
    stream = stream or sys.stderr
    bad = invariant[~invariant["invariant_ok"].astype(bool)]
    if len(bad):
        unchecked = int(bad["invariant_z"].isna().sum())
        print("!" * 100, file=stream)
        print(f"WARNING: INVARIANT VIOLATED in {len(bad)} of {len(invariant)} (model, snapshot, σ) rows: "
              f"L(σ) < J*(σ) − {INVARIANT_SIGMAS:g} standard errors"
              + (f", or ({unchecked} rows) a value the check needs is not finite" if unchecked else "")
              + ". Check that D* (optimal_loss) and the models use the same data, σ and labels.", file=stream)
        for _, r in bad.iterrows():
            print(f"  model {r['model']} images_seen {int(r['images_seen'])} σ={r['sigma']:.4g}: "
                  f"L={r['loss']:.6g} J*={r['optimal_loss']:.6g} z={r['invariant_z']:.2f}", file=stream)
        print("!" * 100, file=stream)
    return int(len(bad))


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------

def _atomic_csv(df: pd.DataFrame, path) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def main(argv=None) -> int:
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
                    with atomic_path(_triples_path(out)) as tmp:
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
        integrity.stamp_outputs(args, *args.out, *(_triples_path(o) for o in args.out if args.per_triple))
    else:  # make-set: --out; collect: --out, --invariant and --per-triple
        integrity.stamp_outputs(args, args.out, getattr(args, "invariant", None), getattr(args, "per_triple", None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
