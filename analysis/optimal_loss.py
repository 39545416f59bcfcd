"""The optimal diffusion loss J*(σ) of a dataset and its optimal denoiser D*(x) (docs/science.md, "The formulas").

Everything is in VE-x0 coordinates: a noisy point is x = x0 + σ·ε and the loss is the per-dimension mean
‖D(x) − x0‖²/D, so one curve J*(σ) serves every process and target (see models.diffusion.to_process_curve).

Public API
----------
posterior_mean(data, x_noisy, sigma, *, labels=None, noisy_labels=None) -> tensor
    The exact posterior mean D*(x) = Σ_n softmax_n(−‖x − x0_n‖²/2σ²)·x0_n of the empirical distribution.
estimate_optimal_loss(data, sigmas, *, estimator="full", labels=None, n_samples=None, subset_size=None, C=None,
                      seed=0, device=None) -> pandas.DataFrame
    J*(σ) on a σ grid with one of the estimators `full`, `dol`, `cdol`, `snis` (docs/science.md).

CLI
---
python -m analysis.optimal_loss --dataset SPEC --estimator {full,dol,cdol,snis,all} --out jstar.csv [...]
python -m analysis.optimal_loss denoise --dataset dataset.npz --eval-set eval_set.npz --out eval_denoised.npy

The exact posterior D* (its kernel, screens and error bounds) lives in analysis/posterior.py, the subset
estimators' D̂ in analysis/subset_estimators.py.

Estimators (B = E‖D̂‖², M noisy samples x_m = x0_{n_m} + σ ε_m)
------------------------------------------------------------
* `full`: the exact D* over all N points.  J* = mean_m ‖D*(x_m) − x0_m‖²/D (the "direct" form: never negative
  and lower variance than A − B; both agree in expectation because E⟨x0, D*⟩ = E‖D*‖²; both are reported).
* `snis`: D̂ is the softmax over a random subset of L points (the source is usually missing at small σ).
* `dol`: the source plus L − 1 other random points.  Biased: overestimates B, underestimates J*.
* `cdol`: DOL with log C added to the non-source logits (our reading of the paper's Eq. 11):
  C = 1 is DOL, C → ∞ is SNIS on L − 1 points; default C = 4N/L (the paper's).
  For the subset estimators J* = mean_m (‖x0_m‖² − ‖D̂_m‖²)/D, the paper's A − B form, with A paired per sample
  (the sources are balanced: every point is used ⌊M/N⌋ or ⌈M/N⌉ times, so when N divides M the paired A is the
  exact dataset A) and in centred coordinates — both are variance reductions that leave the exact estimator's
  expectation unchanged.
* `cdol-nn` (ours, not in the paper): the source's K = min(64, (L−1)/4) nearest neighbours (a kNN graph built
  once per dataset, O(N²D)) are enumerated exactly, the other L − 1 − K points are a random subset of the rest
  weighted by C = (N−1−K)/(its size) (stratified sampling: unbiased numerator and denominator of D*), and
  ‖D̂‖² is corrected by the delta-method estimate of tr Var(D̂) from the subset.  In the bias study
  (benchmarks/estimator_bias.py) it removes most of the large-σ bias (≈ −variance/L for every subset
  estimator) and much of the small-σ one; a bias of ~10% remains near the critical σ at L = N/16.
* Random numbers: sources, ε and subsets come from generators seeded by (seed, block of 64 samples), so the
  numbers do not depend on chunk or batch size, and the same ε / sources / subsets are reused for every σ and
  every estimator (common random numbers: smooth, monotone curves and paired estimator comparisons).  Sources
  and subsets are drawn on the CPU; ε on the data's device (on a GPU the CPU generator would cost more than the
  distance GEMM), so a CUDA run draws other ε than a CPU run with the same seed: same numbers per device type,
  agreement across types within the standard error.
  Subsets are shared by the 64 samples of a block; stderr is the plain std/√M over samples (it ignores that
  sharing, so it is slightly optimistic for the subset estimators).
* Default M (n_samples): min(max(2N, 1024), max(256, 2^39 / (K·D))) with K = N (full) or L (subsets): the paper's
  "M ≈ 2–3 N", capped at ~5·10^11 multiply-adds per σ.  Default L: clip(N/20, 64, 4096), at most N.
* Class-conditional J* (`labels`): each class is its own dataset (the posterior sum runs over the sample's class
  only); J* = Σ_c (N_c/N)·J*_c, with M_c = ⌈M·N_c/N⌉ samples and the class's own default L and C.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from analysis.centred_data import CentredData
from analysis.eval_set import eval_noise, load_eval_set, sigma_grid  # the evaluation set's ε and σ

# the exact posterior (kernel, screens, bounds); posterior_mean is also this module's documented interface
from analysis.posterior import (
    as_labels,
    as_matrix,
    posterior_centred,
    posterior_mean,
    resolve_device,
    single_thread_if_small,
)
from analysis.subset_estimators import _knn_graph, _nn_count, _nn_denoise, _subset_denoise
from models.diffusion import to_process_curve
from models.processes import get_process
from study import integrity
from study.atomic import atomic_path
from training.dataset import DatasetError, check_images, open_dataset

__all__ = ["posterior_mean", "estimate_optimal_loss", "denoise_eval_set", "ESTIMATORS", "EXTRA_ESTIMATORS", "main"]

ESTIMATORS = ("full", "dol", "cdol", "snis")    # the paper's four (the CLI's "all")
EXTRA_ESTIMATORS = ("cdol-nn",)                  # ours: cDOL with the source's nearest neighbours stratified out

_RNG_BLOCK = 64              # samples per random-number block (fixes the streams independent of batching)
_FULL_BATCH_BLOCKS = 16      # the full estimator processes 16 blocks (1024 queries) per pass over the data
_COST_BUDGET = 2 ** 39       # multiply-adds per σ that the default n_samples aims at


def _seed_of(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (numpy SeedSequence), so nearby seeds give unrelated streams."""
    return int(np.random.SeedSequence([int(p) % (2 ** 63) for p in parts]).generate_state(1, np.uint64)[0] >> 1)


# --------------------------------------------------------------------------------------------------------

def _default_subset_size(n: int) -> int:
    return int(min(n, max(64, min(4096, n // 20))))


def _default_n_samples(n: int, k: int, dim: int) -> int:
    return int(min(max(2 * n, 1024), max(256, _COST_BUDGET // max(k * dim, 1))))


def _balanced_sources(n: int, m: int, seed: int) -> torch.Tensor:
    """m source indices in which every point appears ⌊m/n⌋ or ⌈m/n⌉ times (stratified over the dataset)."""
    g = torch.Generator().manual_seed(_seed_of(seed, 0x5EED))
    reps = -(-m // n)
    return torch.cat([torch.randperm(n, generator=g) for _ in range(reps)])[:m]


def _block_noise(seed: int, block: int, rows: int, dim: int, device: torch.device) -> torch.Tensor:
    """ε of one block of samples, drawn on the data's device: on a GPU the CPU generator would cost more than the
    distance GEMM itself.  CUDA's generator (Philox) draws other numbers than the CPU's from the same seed."""
    g = torch.Generator(device=device).manual_seed(_seed_of(seed, block, 1))
    return torch.randn(rows, dim, generator=g, dtype=torch.float64, device=device)


def _block_subset(seed: int, block: int, n: int, size: int) -> torch.Tensor:
    """A uniform random subset of `size` of range(n), in random order (the order matters: DOL drops the last)."""
    g = torch.Generator().manual_seed(_seed_of(seed, block, 2))
    if 4 * size > n:
        return torch.randperm(n, generator=g)[:size]
    # small subsets of a large set: draw with replacement until `size` distinct ones, O(size) not O(n)
    picked = torch.unique(torch.randint(0, n, (size + size // 4 + 16,), generator=g))
    while picked.numel() < size:
        picked = torch.unique(torch.cat([picked, torch.randint(0, n, (size,), generator=g)]))
    return picked[torch.randperm(picked.numel(), generator=g)[:size]]   # a uniform subset, shuffled


def _per_sample_losses(data: CentredData, sigmas, estimator, m, subset_size, c_value, seed, chunk, bar):
    """[len(σ), M] per-sample (direct, A − B) losses (per-dim) for one (class-)dataset.  The loop runs over
    groups of samples outside and σ inside, so each group's sources and ε are drawn once for all σ."""
    n, dim = data.n, data.dim
    src_all = _balanced_sources(n, m, seed)
    blocks = [(b, src_all[b * _RNG_BLOCK:(b + 1) * _RNG_BLOCK]) for b in range(-(-m // _RNG_BLOCK))]
    direct = torch.empty(len(sigmas), m, dtype=torch.float64)
    a_minus_b = torch.empty(len(sigmas), m, dtype=torch.float64)
    log_c = math.log(c_value) if c_value is not None else 0.0
    group = _FULL_BATCH_BLOCKS if estimator == "full" else 1
    knn = _knn_graph(data, _nn_count(subset_size, n), chunk) if estimator == "cdol-nn" else None
    screen_logs: dict[int, list] = {}
    for g0 in range(0, len(blocks), group):
        chunk_blocks = blocks[g0:g0 + group]
        eps = torch.cat([_block_noise(seed, b, len(s), dim, data.device) for b, s in chunk_blocks])
        src = torch.cat([s for _, s in chunk_blocks]).to(data.device)
        x_src = data.rows(src, torch.float64)
        a_src = (x_src ** 2).sum(1)
        subset = None
        if estimator == "cdol-nn":
            subset = _block_subset(seed, chunk_blocks[0][0], n, max(1, subset_size - 1 - knn.shape[1]))
        elif estimator != "full":
            subset = _block_subset(seed, chunk_blocks[0][0], n, subset_size)
        subset = None if subset is None else subset.to(data.device)
        lo = g0 * _RNG_BLOCK
        for i, sigma in enumerate(sigmas):
            screen_log = screen_logs.setdefault(i, [])
            xq = x_src + sigma * eps
            var_tr = None
            if estimator == "full":
                sig = torch.full((xq.shape[0],), float(sigma), dtype=torch.float64, device=data.device)
                den = posterior_centred(data, xq, sig, chunk, hint=src, screen_log=screen_log)
            elif estimator == "cdol-nn":
                den, var_tr = _nn_denoise(data, xq, eps, src, float(sigma), subset, knn, c_value)
            else:
                den = _subset_denoise(data, estimator, xq, eps, src, float(sigma), subset, log_c)
            direct[i, lo:lo + len(src)] = ((den - x_src) ** 2).sum(1).cpu() / dim
            ab = a_src - (den ** 2).sum(1)
            if var_tr is not None:
                ab += var_tr
            a_minus_b[i, lo:lo + len(src)] = ab.cpu() / dim
            if bar is not None:
                bar.update(len(src))
    return direct, a_minus_b


def _check_estimate_args(estimator: str, sig: np.ndarray, n_total: int, n_samples, subset_size, C) -> None:
    if sig.size == 0 or not np.all(np.isfinite(sig)) or not np.all(sig > 0):
        raise ValueError(f"sigmas must be a non-empty list of finite values > 0, got {sig.tolist()[:8]}")
    if n_samples is not None and int(n_samples) < 2:
        raise ValueError(f"n_samples must be >= 2 (a standard error needs two samples), got {n_samples}")
    if subset_size is not None and estimator != "full" and not 2 <= int(subset_size) <= n_total:
        raise ValueError(f"subset_size must be in [2, N={n_total}], got {subset_size}")
    if C is not None and not (float(C) > 0 and math.isfinite(float(C))):
        raise ValueError(f"C must be a finite number > 0, got {C}")


@dataclass
class _ClassPlan:
    """One class of a class-conditional estimate (or the whole set): its rows, size N_c, subset size L, samples M
    and cDOL's C (None: stratified per sample)."""
    label: int | None
    members: torch.Tensor | None
    n: int
    size: int
    m: int
    c_value: float | None


def _class_plans(estimator: str, x0: torch.Tensor, labels, n_samples, subset_size, C) -> list[_ClassPlan]:
    n_total, dim = x0.shape
    if labels is None:
        parts = [(None, None)]
    else:   # members only: a class's rows are copied when its turn comes (never a second copy of the whole set)
        lab = as_labels(labels, n_total, "labels")
        parts = [(c, torch.nonzero(lab == c).squeeze(1)) for c in lab.unique().tolist()]
    m_total = int(n_samples) if n_samples is not None else None
    plans = []
    for c, members in parts:
        n = n_total if members is None else members.numel()
        size = n if estimator == "full" else min(n, int(subset_size) if subset_size else _default_subset_size(n))
        size = max(size, min(n, 2))
        if m_total is None:
            m = _default_n_samples(n, size, dim)
        else:
            m = max(2, -(-m_total * n // n_total))
        c_val = None
        if estimator == "dol":
            c_val = 1.0
        elif estimator == "cdol":
            c_val = float(C) if C is not None else 4.0 * n / size
        elif estimator == "cdol-nn":
            if size < 3 or n < 3:
                raise ValueError(f"cdol-nn needs subset_size >= 3 and N >= 3, got {size} and {n}")
            c_val = float(C) if C is not None else None       # None: stratified, per sample
        plans.append(_ClassPlan(c, members, n, size, m, c_val))
    return plans


def _estimate_classes(x0, plans: list[_ClassPlan], sig, estimator: str, seed: int, dev, chunk_size, progress):
    """[(class weight N_c/N, direct losses [S, M_c], A − B losses [S, M_c])], one class at a time."""
    bar = None
    if progress:
        bar = tqdm(total=sum(p.m for p in plans) * sig.size, desc=f"J* {estimator}", unit="x_t", leave=False)
    try:
        parts_out = []
        for p in plans:
            d = CentredData(x0 if p.members is None else x0[p.members], dev)
            part_seed = seed if p.label is None else _seed_of(seed, int(p.label), 7)
            gemm = (_FULL_BATCH_BLOCKS * _RNG_BLOCK * p.n if estimator == "full" else _RNG_BLOCK * p.size) * d.dim
            with single_thread_if_small(dev, gemm):
                direct, ab = _per_sample_losses(d, sig, estimator, p.m, p.size, p.c_value, part_seed, chunk_size,
                                                bar)
            parts_out.append((p.n / x0.shape[0], direct, ab))
            del d   # this class's copy (and cached centred data) goes before the next class's is made
    finally:
        if bar is not None:
            bar.close()
    return parts_out


def estimate_optimal_loss(data, sigmas, *, estimator: str = "full", labels=None, n_samples: int | None = None,
                          subset_size: int | None = None, C: float | None = None, seed: int = 0, device=None,
                          chunk_size: int | None = None, progress: bool = False) -> pd.DataFrame:
    """J*(σ) per dimension (x0 target, VE coordinates) of the empirical distribution of `data` [N, …].

    One row per σ with columns sigma, optimal_loss, stderr, estimator, n_samples, subset_size, C, conditional,
    direct, direct_stderr, a_minus_b, a_minus_b_stderr.  `optimal_loss` is the direct mean ‖D* − x0‖²/D for
    `full` and the A − B form for the subset estimators (module docstring).  `labels` [N] gives the
    class-conditional J*.  Deterministic under `seed` for a device type (independent of chunk and batch sizes;
    CPU and CUDA draw different ε, so they agree within the standard error)."""
    if estimator not in ESTIMATORS + EXTRA_ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; choose one of "
                         f"{', '.join(ESTIMATORS + EXTRA_ESTIMATORS)}")
    x0 = as_matrix(data, "data", check_finite=False)   # CentredData's mean / norms catch NaN and inf
    sig = np.asarray(sigmas, dtype=np.float64).reshape(-1)
    _check_estimate_args(estimator, sig, x0.shape[0], n_samples, subset_size, C)
    if estimator == "full":
        subset_size = None  # the full estimator uses every point
    dev = resolve_device(device)
    plans = _class_plans(estimator, x0, labels, n_samples, subset_size, C)
    parts_out = _estimate_classes(x0, plans, sig, estimator, seed, dev, chunk_size, progress)

    def combine(which: int):
        """Class-weighted mean and its standard error (classes are independent samples)."""
        mean = sum(w * v[which].mean(1) for w, *v in parts_out)
        var = sum(w ** 2 * v[which].var(1) / v[which].shape[1] for w, *v in parts_out)
        return mean.numpy(), var.sqrt().numpy()

    d_mean, d_se = combine(0)
    ab_mean, ab_se = combine(1)
    opt, se = (d_mean, d_se) if estimator == "full" else (ab_mean, ab_se)
    single = len(plans) == 1  # per-class L and C differ; report them only when they are one number
    c_col = plans[0].c_value if single else (float(C) if C is not None else None)
    return pd.DataFrame({
        "sigma": sig,
        "optimal_loss": opt,
        "stderr": se,
        "estimator": estimator,
        "n_samples": sum(p.m for p in plans),
        "subset_size": plans[0].size if single else (int(subset_size) if subset_size else np.nan),
        "C": np.nan if c_col is None else c_col,
        "conditional": labels is not None,
        "direct": d_mean,
        "direct_stderr": d_se,
        "a_minus_b": ab_mean,
        "a_minus_b_stderr": ab_se,
    })


# --------------------------------------------------------------------------------------------------------
# the study's fixed evaluation set
# --------------------------------------------------------------------------------------------------------



def denoise_eval_set(x0, eval_set, *, labels=None, device=None, batch_size: int = 1024) -> np.ndarray:
    """D* for every (index, σ, noise_seed) triple of an evaluation set: float32 [M, D]."""
    x0 = torch.as_tensor(x0)
    for key in ("index", "sigma", "noise_seed"):
        if key not in eval_set:
            raise ValueError(f"eval set lacks the key {key!r} (needs index, sigma, noise_seed)")
    index = np.asarray(eval_set["index"], dtype=np.int64)
    sigma = np.asarray(eval_set["sigma"], dtype=np.float64)
    seeds = np.asarray(eval_set["noise_seed"])
    if not (index.shape == sigma.shape == seeds.shape):
        raise ValueError(f"eval set arrays differ in length: index {index.shape}, sigma {sigma.shape}, "
                         f"noise_seed {seeds.shape}")
    if index.size and (index.min() < 0 or index.max() >= x0.shape[0]):
        raise ValueError(f"eval set index out of range [0, {x0.shape[0]}): min {index.min()}, max {index.max()}")
    out = np.empty((index.size, int(np.prod(x0.shape[1:]))), dtype=np.float32)
    for b in range(0, index.size, batch_size):
        sl = slice(b, b + batch_size)
        clean = x0[torch.from_numpy(index[sl])].double()
        eps = eval_noise(x0.shape[1:], seeds[sl]).double()
        s = torch.from_numpy(sigma[sl])
        noisy = clean + s.view(-1, *([1] * (clean.ndim - 1))) * eps
        kw = {}
        if labels is not None:
            kw = {"labels": labels, "noisy_labels": torch.as_tensor(labels)[torch.from_numpy(index[sl])]}
        den = posterior_mean(x0, noisy, s, device=device, source_index=index[sl], **kw)
        out[sl] = den.reshape(den.shape[0], -1).cpu().numpy().astype(np.float32)
    return out


# --------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------

def _load(spec: str, at_least=None):
    """(x [N, …] float32 tensor, labels or None) via training.dataset.open_dataset, checked (training.dataset.check_images:
    finite, at least `at_least` images): the exact posterior needs every point, so the whole set is converted —
    once, chunk by chunk, into one float32 tensor."""
    data = check_images(open_dataset(spec), at_least=at_least)
    return data.float32(), data.labels


def _load_or_exit(parser, spec: str, at_least=None):
    """_load, or exit 2 with the dataset's one-line error (training.dataset.DatasetError names the file)."""
    try:
        return _load(spec, at_least)
    except DatasetError as err:
        parser.exit(2, f"error: {err}\n")


def _to_process(df: pd.DataFrame, process: str, target: str) -> pd.DataFrame:
    """Add t, process_loss, process_stderr for a named process/target (models.diffusion.to_process_curve)."""
    t_all = get_process(process).t_from_sigma_ve(torch.tensor(df["sigma"].to_numpy(dtype=np.float64))).numpy()
    out = df.copy()
    out["process"], out["target"] = process, target
    out["t"], out["process_loss"], out["process_stderr"] = np.nan, np.nan, np.nan
    for est, rows in out.groupby("estimator").groups.items():
        sub = out.loc[rows]
        sig = sub["sigma"].to_numpy(dtype=np.float64, copy=True)
        t, loss = to_process_curve(sig, sub["optimal_loss"].to_numpy(dtype=np.float64, copy=True), process, target)
        _, se = to_process_curve(sig, sub["stderr"].to_numpy(dtype=np.float64, copy=True), process, target)
        t_rows = t_all[np.asarray([out.index.get_loc(r) for r in rows])]
        for tv, lv, sv in zip(t, loss, se):
            hit = rows[np.isclose(t_rows, tv, rtol=1e-12, atol=0)]
            out.loc[hit, ["t", "process_loss", "process_stderr"]] = [tv, lv, sv]
    return out


def _estimate_cli(argv) -> int:
    p = argparse.ArgumentParser(prog="python -m analysis.optimal_loss",
                                description="J*(σ) of a dataset (per-dim x0-loss, VE coordinates) → CSV. "
                                            "Subcommand `denoise` computes D* on an evaluation set.")
    p.add_argument("--dataset", required=True, help="dataset spec or .npz (training.dataset.open_dataset)")
    p.add_argument("--estimator", default="full", choices=ESTIMATORS + EXTRA_ESTIMATORS + ("all",),
                   help="all = the paper's four (full, dol, cdol, snis)")
    p.add_argument("--out", required=True, help="output CSV")
    p.add_argument("--sigma-min", type=float, default=0.002)
    p.add_argument("--sigma-max", type=float, default=80.0)
    p.add_argument("--num-sigmas", type=int, default=32)
    p.add_argument("--n-samples", type=int, default=None, help="M noisy samples per σ (default: see docs)")
    p.add_argument("--subset-size", type=int, default=None, help="L for dol/cdol/snis (default clip(N/20,64,4096))")
    p.add_argument("--C", type=float, default=None, help="cDOL's C (default 4N/L)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--conditional", action="store_true", help="class-conditional J* (needs labels)")
    p.add_argument("--device", default=None, help="cpu (default) or cuda")
    p.add_argument("--process", default=None, help="also convert to this process (models.diffusion)")
    p.add_argument("--target", default=None, help="… and this target (x0, eps, v, score, velocity, edm-F)")
    integrity.add_stamp_options(p)
    a = p.parse_args(argv)
    if (a.process is None) != (a.target is None):
        p.error("--process and --target go together")
    try:
        sigmas = sigma_grid(a.num_sigmas, a.sigma_min, a.sigma_max)
    except ValueError as err:
        p.error(f"--num-sigmas / --sigma-min / --sigma-max: {err}")
    names = ESTIMATORS if a.estimator == "all" else (a.estimator,)
    subset = set(names) - {"full"}  # the estimators that draw a subset of L points (at least 2)
    x, labels = _load_or_exit(p, a.dataset, {f"the subset of {'/'.join(sorted(subset))} (--subset-size)":
                                             a.subset_size or 2} if subset else None)
    if a.conditional and labels is None:
        p.error(f"--conditional: dataset {a.dataset!r} has no labels")
    frames = [estimate_optimal_loss(x, sigmas, estimator=e, labels=labels if a.conditional else None,
                                    n_samples=a.n_samples, subset_size=a.subset_size, C=a.C, seed=a.seed,
                                    device=a.device, progress=True) for e in names]
    df = pd.concat(frames, ignore_index=True)
    if a.process is not None:
        df = _to_process(df, a.process, a.target)
    out = Path(a.out)
    with atomic_path(out) as tmp:
        df.to_csv(tmp, index=False)
    print(f"wrote {out} ({len(df)} rows: {', '.join(names)} × {sigmas.size} σ)")
    integrity.stamp_outputs(a, out)
    return 0


def _denoise_cli(argv) -> int:
    p = argparse.ArgumentParser(prog="python -m analysis.optimal_loss denoise",
                                description="D*(x_t) for every (index, σ, noise_seed) triple of an eval set")
    p.add_argument("--dataset", required=True)
    p.add_argument("--eval-set", required=True, help=".npz with index, sigma, noise_seed")
    p.add_argument("--out", required=True, help="output .npy, float32 [M, D]")
    p.add_argument("--conditional", action="store_true")
    p.add_argument("--device", default=None)
    integrity.add_stamp_options(p)
    a = p.parse_args(argv)
    x, labels = _load_or_exit(p, a.dataset)
    if a.conditional and labels is None:
        p.error(f"--conditional: dataset {a.dataset!r} has no labels")
    try:
        eval_set = load_eval_set(a.eval_set)
    except (FileNotFoundError, ValueError) as err:
        p.error(f"--eval-set: {err}")
    den = denoise_eval_set(x, eval_set, labels=labels if a.conditional else None, device=a.device)
    out = Path(a.out)
    with atomic_path(out) as tmp, open(tmp, "wb") as fh:
        np.save(fh, den)
    print(f"wrote {out} {den.shape}")
    integrity.stamp_outputs(a, out)
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "denoise":
        return _denoise_cli(argv[1:])
    if argv and argv[0] == "estimate":
        argv = argv[1:]
    return _estimate_cli(argv)


if __name__ == "__main__":
    sys.exit(main())
