"""Evaluation-set replicates: a study's per-σ means and weighted totals, for the evaluation set and for bootstrap
resamples of its triples.

Where the noise of a study's numbers is. Every snapshot and the optimal denoiser are evaluated on one fixed set of
(x0, σ, ε) triples, so every per-σ mean and every weighted total carries that set's sampling error, and the error is
*shared* by all snapshots (same triples). A replicate resamples the triples with replacement within each σ, with one
resample index used for every snapshot, so the pairing between snapshots — and between L and J*, which come from
the same triples — is kept. Replicate 0 is the evaluation set itself.

Arrays (``StudyReplicates``), for R replicates (+1 for the original), S snapshots and K σ levels; level 0 is the
weighted total, levels 1..K the σ grid in ascending order:
    loss[r, s, l]      model x0-loss L           (per-dimension mean)
    jstar[r, s, l]     optimal loss J* on the same triples (per snapshot only because a snapshot's variant fixes
                       the weights of its total; per σ it is the same for every snapshot)
    excess[r, s, l]    E‖Dθ − D*‖², the direct estimate of L − J*

per_triple.npz (written by ``analysis.evaluate collect``; read by ``load_per_triple``):
    sigma [K], level [M] (σ index 1..K of each triple), optimal_loss [M], loss [S, M], excess [S, M],
    total_weight [S, K] (the quadrature × density × λ weights of each snapshot's total, summing the per-σ means),
    model [S], params [S], images_seen [S], flops [S]
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from models.atomic import atomic_path

PER_TRIPLE_KEYS = ("sigma", "level", "optimal_loss", "loss", "excess", "total_weight",
                   "model", "params", "images_seen", "flops")


@dataclass
class StudyReplicates:
    snapshots: pd.DataFrame   # model, params, images_seen, flops (S rows, the order of axis 1)
    sigma: np.ndarray         # [K]
    loss: np.ndarray          # [R+1, S, K+1]
    jstar: np.ndarray         # [R+1, S, K+1]
    excess: np.ndarray        # [R+1, S, K+1]

    @property
    def n_replicates(self) -> int:
        return self.loss.shape[0] - 1

    def subset(self, mask) -> "StudyReplicates":
        """The same replicates restricted to some snapshots (e.g. one architecture family): comparisons between
        subsets stay paired, since every subset sees the same resample of the triples."""
        mask = np.asarray(mask, dtype=bool)
        return StudyReplicates(self.snapshots[mask].reset_index(drop=True), self.sigma, self.loss[:, mask],
                               self.jstar[:, mask], self.excess[:, mask])

    def level_label(self, level: int) -> float:
        """σ of a level (NaN for the total, level 0)."""
        return float("nan") if level == 0 else float(self.sigma[level - 1])


def save_per_triple(path, arrays: dict) -> None:
    missing = [k for k in PER_TRIPLE_KEYS if k not in arrays]
    if missing:
        raise ValueError(f"per-triple arrays lack {missing}")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            # model names as fixed-width unicode: object arrays would need pickle to load
            np.savez(f, **{k: np.asarray(arrays[k], dtype=str if k == "model" else None) for k in PER_TRIPLE_KEYS})


def load_per_triple(path) -> dict:
    """per_triple.npz, checked against its checksum sidecar (models.integrity) and validated (shapes, levels,
    finite values): a bad file is one error naming it and the command that rebuilds it."""
    from models.integrity import IntegrityError, invalid, verify

    verify(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in PER_TRIPLE_KEYS if k not in z.files]
            if missing:
                raise invalid(path, f"not a per-triple file (missing {missing})")
            out = {k: z[k] for k in PER_TRIPLE_KEYS}
    except IntegrityError:
        raise
    except Exception as e:  # zipfile.BadZipFile, a truncated member, a pickled object array, ...
        raise invalid(path, f"unreadable ({type(e).__name__}: {e})") from None
    if out["loss"].ndim != 2:
        raise invalid(path, f"loss has shape {list(out['loss'].shape)}, expected [snapshots, triples]")
    s, m = out["loss"].shape
    k = out["sigma"].size
    for key, shape in (("excess", (s, m)), ("optimal_loss", (m,)), ("level", (m,)), ("total_weight", (s, k))):
        if out[key].shape != shape:
            raise invalid(path, f"{key} has shape {list(out[key].shape)}, expected {list(shape)}")
    if m and (out["level"].min() < 1 or out["level"].max() > k):
        raise invalid(path, f"level must index the σ grid 1..{k}")
    for key in ("sigma", "optimal_loss", "loss", "excess", "total_weight", "flops"):
        if not np.all(np.isfinite(out[key])):
            raise invalid(path, f"non-finite {key}")
    return out


def resample_counts(level: np.ndarray, n_replicates: int, seed: int) -> np.ndarray:
    """[R+1, M] multiplicities: row 0 all ones (the evaluation set), rows 1..R a resample of the triples with
    replacement within each σ level (each level keeps its size). Depends only on (level, R, seed)."""
    level = np.asarray(level)
    m = level.size
    counts = np.zeros((n_replicates + 1, m), dtype=np.float64)
    counts[0] = 1.0
    rng = np.random.default_rng(seed)
    for lv in np.unique(level):
        members = np.flatnonzero(level == lv)
        n = members.size
        draws = rng.integers(0, n, size=(n_replicates, n))
        rows = np.repeat(np.arange(1, n_replicates + 1), n)
        np.add.at(counts, (rows, members[draws.ravel()]), 1.0)
    return counts


def _level_means(values: np.ndarray, counts: np.ndarray, level: np.ndarray, k: int) -> np.ndarray:
    """values [S, M] (or [M]) → per-level means [R+1, S, K] under the multiplicities counts [R+1, M]."""
    v = np.atleast_2d(values)
    out = np.empty((counts.shape[0], v.shape[0], k))
    for j in range(k):
        sel = level == j + 1
        c = counts[:, sel]                                    # [R+1, n_j]
        out[:, :, j] = c @ v[:, sel].T / c.sum(axis=1, keepdims=True)
    return out


def replicates(per_triple: dict, n_replicates: int = 1000, seed: int = 0) -> StudyReplicates:
    """Per-σ means and weighted totals of every snapshot for the evaluation set and ``n_replicates`` resamples."""
    level = np.asarray(per_triple["level"], dtype=np.int64)
    k = int(np.asarray(per_triple["sigma"]).size)
    counts = resample_counts(level, n_replicates, seed)
    w = np.asarray(per_triple["total_weight"], dtype=np.float64)        # [S, K]

    def with_total(per_level):                                        # [R+1, S, K] → [R+1, S, K+1]
        total = np.einsum("rsk,sk->rs", per_level, w)
        return np.concatenate([total[:, :, None], per_level], axis=2)

    loss = _level_means(per_triple["loss"], counts, level, k)
    excess = _level_means(per_triple["excess"], counts, level, k)
    opt = _level_means(per_triple["optimal_loss"], counts, level, k)   # [R+1, 1, K]
    opt = np.broadcast_to(opt, loss.shape)
    snaps = pd.DataFrame({c: np.asarray(per_triple[c]) for c in ("model", "params", "images_seen", "flops")})
    return StudyReplicates(snaps, np.asarray(per_triple["sigma"], dtype=np.float64),
                           with_total(loss), with_total(opt), with_total(excess))


def replicates_from_losses(df: pd.DataFrame) -> StudyReplicates:
    """The evaluation set's own numbers (no resamples, R = 0) from a tidy losses table: one row per (model,
    images_seen, σ) and a total row with σ empty per snapshot. ``excess`` is NaN where the table has none."""
    sig = pd.to_numeric(df["sigma"], errors="coerce")
    snaps = (df[["model", "params", "images_seen", "flops"]].drop_duplicates(["model", "images_seen"])
             .reset_index(drop=True))
    grid = np.sort(sig.dropna().unique())
    shape = (1, len(snaps), grid.size + 1)
    arrays = {k: np.full(shape, np.nan) for k in ("loss", "optimal_loss", "excess")}
    pos = {(m, int(i)): j for j, (m, i) in enumerate(zip(snaps["model"], snaps["images_seen"]))}
    lev = np.where(sig.isna(), 0, np.searchsorted(grid, sig.fillna(0).to_numpy()) + 1)
    rows = [pos[(m, int(i))] for m, i in zip(df["model"], df["images_seen"])]
    for k, a in arrays.items():
        if k in df:
            a[0, rows, lev] = pd.to_numeric(df[k], errors="coerce").to_numpy(dtype=np.float64)
    return StudyReplicates(snaps, grid.astype(np.float64), arrays["loss"], arrays["optimal_loss"],
                           arrays["excess"])
