"""The study's fixed evaluation set: the σ grid, the (x0 index, σ, ε-seed) triples and their noise, the set's file,
and the weights that turn per-σ statistics on the grid into totals under a training weighting.

A study fixes one evaluation set of (x0 index, σ, ε-seed) triples drawn from the training set. Every snapshot and
the optimal denoiser D* are evaluated on exactly those triples (analysis.evaluate, analysis.optimal_loss), with the
noisy input x = x0 + σ·ε.

Totals under the study's training weighting. The variant trains on E_σ[λ(σ)·‖D − x0‖²/D] with ln σ drawn from the
density p (`Variant.sigma_density`) and λ = `Variant.loss_weight`. On the evaluation grid u_k = ln σ_k the total is
the quadrature

    total = Σ_k a_k λ_k L_k / Σ_k a_k,     a_k = q_k · p(u_k),

where q_k are the trapezoid weights of the grid in u = ln σ (for the usual geometric grid: Δu·[½, 1, …, 1, ½]; a
single σ gets weight 1). Dividing by Σ a_k makes it the training loss conditioned on σ lying in the grid's range
(a constant factor in p cancels, and so does the probability mass outside [σ_min, σ_max]). L, J*, excess and gap
get the same weights, so total L − total J* = total gap exactly. The σ's are independent samples, so the total's
standard error is sqrt(Σ_k (a_k λ_k / Σ a)² s.e._k²).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from study import integrity
from study.atomic import atomic_path
from study.tables import STATS, read_checked_npz
from training.dataset import open_dataset


# ---------------------------------------------------------------------------------------------------------------
# the triples
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


def npz_num_items(path) -> int:
    """N of a dataset file, from its array header only (training.dataset.open_dataset maps, it does not read)."""
    return len(open_dataset(path))


# ---------------------------------------------------------------------------------------------------------------
# the weights of the σ grid
# ---------------------------------------------------------------------------------------------------------------

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
