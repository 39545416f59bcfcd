"""A study's replicate rows: per-σ means and weighted totals of every model size's snapshots, for the evaluation set
and for resamples of its triples, of its seed runs and of its models.

Where the noise of a study's numbers is.
- The evaluation set: every snapshot and the optimal denoiser are evaluated on one fixed set of (x0, σ, ε) triples,
  so every per-σ mean and weighted total carries that set's sampling error, *shared* by all snapshots (same
  triples). An "evaluation" row resamples the triples with replacement within each σ, with one resample index used
  for every snapshot, so the pairing between snapshots — and between L and J*, which come from the same triples —
  is kept.
- The training runs: a run's seed moves all its snapshots together, and a law that is not exactly right misses a
  whole model at once, so a model's snapshots are not independent evidence. Where a size has several seed runs
  (a model-table entry with `seeds: K`), its snapshots are the seeds' mean, and a "seed" row resamples the runs of
  every size with replacement (on top of the evaluation row of the same index). A "jackknife" row is the study
  with one size — all its runs and snapshots — left out (its values NaN): analysis.intervals turns the spread of
  those into the model part of the total interval.
Row 0 ("estimate") is the evaluation set itself, every model in.

Arrays (``StudyReplicates``), rows × S size-snapshots × (K+1) levels; level 0 is the weighted total, levels 1..K the
σ grid in ascending order:
    loss[r, s, l]      model x0-loss L           (per-dimension mean)
    jstar[r, s, l]     optimal loss J* on the same triples (per snapshot only because a snapshot's variant fixes
                       the weights of its total; per σ it is the same for every snapshot)
    excess[r, s, l]    E‖Dθ − D*‖², the direct estimate of L − J*

per_triple.npz (written by ``analysis.evaluate collect``; read by ``load_per_triple``), one entry per run snapshot:
    sigma [K], level [M] (σ index 1..K of each triple), optimal_loss [M], loss [S, M], excess [S, M],
    total_weight [S, K] (the quadrature × density × λ weights of each snapshot's total, summing the per-σ means),
    model [S], params [S], images_seen [S], flops [S]
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from study.atomic import atomic_path
from study.integrity import IntegrityError, invalid, rebuild_hint
from study.tables import read_checked_npz

PER_TRIPLE_KEYS = ("sigma", "level", "optimal_loss", "loss", "excess", "total_weight",
                   "model", "params", "images_seen", "flops")
SNAPSHOT_COLUMNS = ("model", "params", "images_seen", "flops")


@dataclass
class StudyReplicates:
    snapshots: pd.DataFrame   # model (the size), params, images_seen, flops, seeds (S rows, the order of axis 1)
    sigma: np.ndarray         # [K]
    loss: np.ndarray          # [rows, S, K+1]
    jstar: np.ndarray         # [rows, S, K+1]
    excess: np.ndarray        # [rows, S, K+1]
    kind: np.ndarray = None   # [rows] "estimate", "evaluation", "seed", "jackknife" (default: estimate, evaluation…)
    left_out: np.ndarray = field(default=None)  # [rows] the size a jackknife row leaves out ("" on other rows)

    def __post_init__(self):
        rows = self.loss.shape[0]
        if self.kind is None:
            self.kind = np.array(["estimate"] + ["evaluation"] * (rows - 1))
        if self.left_out is None:
            self.left_out = np.full(rows, "", dtype=object)
        self.kind, self.left_out = np.asarray(self.kind), np.asarray(self.left_out, dtype=object)

    @property
    def n_replicates(self) -> int:
        """Bootstrap replicates of the evaluation set."""
        return int((self.kind == "evaluation").sum())

    @property
    def available(self) -> np.ndarray:
        """[rows, S] bool: the snapshot is in the row (False where a jackknife row left its model out)."""
        return np.isfinite(self.loss[:, :, 0])

    def subset(self, mask) -> "StudyReplicates":
        """The same rows restricted to some snapshots (e.g. one architecture family): comparisons between subsets
        stay paired, since every subset sees the same resample of the triples. Jackknife rows that leave out a
        model of another subset are dropped."""
        mask = np.asarray(mask, dtype=bool)
        snaps = self.snapshots[mask].reset_index(drop=True)
        keep = (self.kind != "jackknife") | np.isin(self.left_out, snaps["model"].unique())
        return StudyReplicates(snaps, self.sigma, self.loss[keep][:, mask], self.jstar[keep][:, mask],
                               self.excess[keep][:, mask], self.kind[keep], self.left_out[keep])

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
    """per_triple.npz, checked against its checksum sidecar (study.integrity) and validated (shapes, levels,
    finite values): a bad file is one error naming it and the command that rebuilds it."""
    out = read_checked_npz(path, PER_TRIPLE_KEYS)
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


def check_same_numbers(losses: pd.DataFrame, per_triple: dict, losses_path, per_triple_path, *,
                       rtol: float = 1e-9) -> None:
    """losses.csv (what the figures plot) and per_triple.npz (what the statistics resample) are one evaluation's
    numbers: the same snapshots, σ grid, and per-σ and total loss, J* and excess (the per-triple means, to rounding).
    Checked where the statistics start, so an edited table never gives figures that disagree with the fits; an
    IntegrityError in one line naming both files otherwise."""
    table, arrays = replicates_from_losses(losses), replicates(per_triple, 0, jackknife=False)

    def fail(what: str) -> IntegrityError:
        return IntegrityError(f"{losses_path} and {per_triple_path} disagree ({what}): both come from one "
                              f"evaluation; {rebuild_hint(losses_path)}")

    keys = [list(zip(r.snapshots["model"].astype(str), r.snapshots["images_seen"].astype(int)))
            for r in (table, arrays)]
    if sorted(keys[0]) != sorted(keys[1]):
        raise fail(f"snapshots {sorted(set(keys[0]) ^ set(keys[1]))[:3]} are in one file only")
    if table.sigma.shape != arrays.sigma.shape or not np.allclose(table.sigma, arrays.sigma, rtol=1e-12, atol=0):
        raise fail("σ grids differ")
    order = [keys[1].index(key) for key in keys[0]]
    for name, column in (("loss", "loss"), ("jstar", "optimal_loss"), ("excess", "excess")):
        a, b = getattr(table, name)[0], getattr(arrays, name)[0][order]
        bad = np.isfinite(a) & ~np.isclose(a, b, rtol=rtol, atol=0)
        if bad.any():
            s, level = (int(i) for i in np.argwhere(bad)[0])
            where = "the total" if level == 0 else f"σ={table.sigma[level - 1]:.6g}"
            raise fail(f"{column} of {keys[0][s][0]}@{keys[0][s][1]} at {where}: {a[s, level]:.10g} in the table, "
                       f"{b[s, level]:.10g} from the triples")


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
        # how often each member is drawn in each replicate (row r's draws offset by r·n, counted at once)
        per_row = np.bincount((draws + n * np.arange(n_replicates)[:, None]).ravel(), minlength=n_replicates * n)
        counts[1:, members] = per_row.reshape(n_replicates, n)
    return counts


def _level_means(values: list, counts: np.ndarray, level: np.ndarray, k: int) -> list:
    """Arrays [S, M] (or [M]) → their per-level means [R+1, S, K] under the multiplicities counts [R+1, M]
    (one product per level for all of them)."""
    vs = [np.atleast_2d(v) for v in values]
    stacked = np.concatenate(vs)
    out = np.empty((counts.shape[0], stacked.shape[0], k))
    for j in range(k):
        sel = np.flatnonzero(level == j + 1)
        if sel.size and (np.diff(sel) == 1).all():           # the evaluation set is stored σ by σ: a view
            sel = slice(sel[0], sel[-1] + 1)
        c = counts[:, sel]                                    # [R+1, n_j]
        out[:, :, j] = c @ stacked[:, sel].T / c.sum(axis=1, keepdims=True)
    edges = np.cumsum([0] + [len(v) for v in vs])
    return [out[:, a:b] for a, b in zip(edges[:-1], edges[1:])]


def size_groups(runs: pd.DataFrame, sizes: dict | None = None):
    """The size-snapshots of a study's run-snapshots: (snapshots table, group index [S_runs] → size-snapshot, the
    size of each run-snapshot). ``sizes`` maps a run to its size (seed runs of a model-table entry to the entry);
    a run it does not name is its own size. The runs of a size must share parameters and snapshot marks."""
    size = runs["model"].map(lambda m: (sizes or {}).get(m, m))
    key = pd.DataFrame({"size": size, "images_seen": runs["images_seen"].to_numpy()})
    snaps = key.drop_duplicates().reset_index(drop=True)
    index = pd.MultiIndex.from_frame(snaps).get_indexer(pd.MultiIndex.from_frame(key))
    table = runs.assign(size=size.to_numpy())
    for name, g in table.groupby("size", sort=False):
        if g["params"].nunique() > 1:
            raise ValueError(f"the seed runs of {name} ({', '.join(sorted(g['model'].unique()))}) have different "
                             "parameter counts; they must differ only in the seed")
        marks = {m: tuple(sorted(r["images_seen"])) for m, r in g.groupby("model")}
        if len(set(marks.values())) > 1:
            raise ValueError(f"the seed runs of {name} have different snapshot marks {marks}; they must differ only "
                             "in the seed")
    first = table.groupby(["size", "images_seen"], sort=False).first().reset_index()
    seeds = table.groupby("size")["model"].nunique()
    out = snaps.merge(first[["size", "images_seen", "params", "flops"]], on=["size", "images_seen"], how="left")
    out = out.rename(columns={"size": "model"})[list(SNAPSHOT_COLUMNS)]
    out["seeds"] = out["model"].map(seeds).to_numpy()
    return out, index, size.to_numpy()


def _group_means(x: np.ndarray, weights: np.ndarray, index: np.ndarray, n_groups: int) -> np.ndarray:
    """x [R, S_runs, L] → [R, S_sizes, L]: each size-snapshot's weighted mean over its runs (weights [R, S_runs])."""
    g = np.zeros((weights.shape[0], n_groups, x.shape[1]))
    g[:, index, np.arange(x.shape[1])] = weights
    g /= g.sum(axis=2, keepdims=True)
    valid = np.isfinite(x)
    out = np.matmul(g, np.where(valid, x, 0.0))
    missing = np.matmul(g, (~valid).astype(np.float64)) > 0    # a mean over a missing value is missing
    return np.where(missing, np.nan, out)


def replicates(per_triple: dict, n_replicates: int = 1000, seed: int = 0, *, sizes: dict | None = None,
               jackknife: bool = True) -> StudyReplicates:
    """Every row of a study: the estimate, ``n_replicates`` evaluation replicates, as many seed replicates where a
    size has several seed runs (``sizes`` maps a run to its size), and one jackknife row per size (``jackknife``;
    with two sizes or more)."""
    level = np.asarray(per_triple["level"], dtype=np.int64)
    k = int(np.asarray(per_triple["sigma"]).size)
    counts = resample_counts(level, n_replicates, seed)
    w = np.asarray(per_triple["total_weight"], dtype=np.float64)        # [S_runs, K]

    def with_total(per_level):                                        # [R+1, S, K] → [R+1, S, K+1]
        total = np.einsum("rsk,sk->rs", per_level, w)
        return np.concatenate([total[:, :, None], per_level], axis=2)

    loss, excess, opt = _level_means([per_triple["loss"], per_triple["excess"], per_triple["optimal_loss"]], counts,
                                     level, k)
    loss, excess = with_total(loss), with_total(excess)
    opt = with_total(np.broadcast_to(opt, loss.shape[:2] + (k,)))
    runs = pd.DataFrame({c: np.asarray(per_triple[c]) for c in SNAPSHOT_COLUMNS})
    snaps, index, size_of = size_groups(runs, sizes)
    n_groups = len(snaps)
    arrays = [loss, opt, excess]
    means = [_group_means(a, np.ones(a.shape[:2]), index, n_groups) for a in arrays]
    kind = ["estimate"] + ["evaluation"] * n_replicates
    left_out = [""] * (n_replicates + 1)
    if (snaps["seeds"] > 1).any() and n_replicates > 0:
        seed_w = _seed_weights(runs["model"].to_numpy(), size_of, n_replicates, seed)
        means = [np.concatenate([m, _group_means(a[1:], seed_w, index, n_groups)]) for m, a in zip(means, arrays)]
        kind += ["seed"] * n_replicates
        left_out += [""] * n_replicates
    names = list(dict.fromkeys(snaps["model"]))
    if jackknife and len(names) >= 2:
        rows = []
        for name in names:
            rows.append([np.where((snaps["model"] == name).to_numpy()[None, :, None], np.nan, m[:1]) for m in means])
        means = [np.concatenate([m] + [r[j] for r in rows]) for j, m in enumerate(means)]
        kind += ["jackknife"] * len(names)
        left_out += names
    return StudyReplicates(snaps, np.asarray(per_triple["sigma"], dtype=np.float64), *means,
                           kind=np.array(kind), left_out=np.array(left_out, dtype=object))


def _seed_weights(run_of_snapshot, size_of, n_replicates, seed) -> np.ndarray:
    """[R, S_runs] multiplicity of each run-snapshot's run in R resamples of every size's runs (with replacement,
    as many runs as the size has; a run's snapshots move together)."""
    runs = pd.unique(run_of_snapshot)
    size_of_run = dict(zip(run_of_snapshot, size_of))
    rng = np.random.default_rng([seed, 1])
    mult = np.zeros((n_replicates, len(runs)))
    for size in pd.unique(size_of):
        members = np.flatnonzero([size_of_run[r] == size for r in runs])
        draws = rng.integers(0, members.size, size=(n_replicates, members.size))
        np.add.at(mult, (np.repeat(np.arange(n_replicates), members.size), members[draws.ravel()]), 1.0)
    col = {r: i for i, r in enumerate(runs)}
    return mult[:, [col[r] for r in run_of_snapshot]]


def replicates_from_losses(df: pd.DataFrame, sizes: dict | None = None) -> StudyReplicates:
    """The evaluation set's own numbers (the estimate row alone) from a tidy losses table: one row per (model,
    images_seen, σ) and a total row with σ empty per snapshot. Seed runs of a size are averaged. ``excess`` is NaN
    where the table has none."""
    sig = pd.to_numeric(df["sigma"], errors="coerce")
    runs = (df[list(SNAPSHOT_COLUMNS)].drop_duplicates(["model", "images_seen"]).reset_index(drop=True))
    grid = np.sort(sig.dropna().unique())
    shape = (1, len(runs), grid.size + 1)
    arrays = {k: np.full(shape, np.nan) for k in ("loss", "optimal_loss", "excess")}
    pos = {(m, int(i)): j for j, (m, i) in enumerate(zip(runs["model"], runs["images_seen"]))}
    lev = np.where(sig.isna(), 0, np.searchsorted(grid, sig.fillna(0).to_numpy()) + 1)
    rows = [pos[(m, int(i))] for m, i in zip(df["model"], df["images_seen"])]
    for k, a in arrays.items():
        if k in df:
            a[0, rows, lev] = pd.to_numeric(df[k], errors="coerce").to_numpy(dtype=np.float64)
    snaps, index, _ = size_groups(runs, sizes)
    means = [_group_means(arrays[k], np.ones((1, len(runs))), index, len(snaps))
             for k in ("loss", "optimal_loss", "excess")]
    return StudyReplicates(snaps, grid.astype(np.float64), *means)
