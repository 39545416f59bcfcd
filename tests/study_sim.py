"""Simulated studies with a known truth, in the shape the pipeline produces (per-triple arrays), for the
statistics tests. They are generated the way the real data arise:

- per triple i (x0, σ, ε), the optimal loss o_i = ‖D* − x0‖² (a positive variable with mean J*_σ), the excess
  e_si = ‖Dθ − D*‖² of snapshot s, and L_si = o_i + e_si + 2⟨Dθ − D*, D* − x0⟩: the cross term has mean 0 but is
  far larger than the excess's own scatter where J* is large, so L − J* ≠ the excess per triple;
- the triples are shared by every snapshot (their difficulty and the direction of D* − x0 are common);
- every training run has its own seed offset (a factor on its excess, shared by its snapshots), and every snapshot a
  smaller one of its own;
- the law is not exactly the one fitted: the size exponent drifts with N (curvature in log-log), early snapshots
  carry an extra undertraining term, and the floor is J* or a level above it (a model class that cannot reach J*);
- the study's compute frontier is chosen on the noisy totals, as the pipeline does.

The truth of a statistic is what the pipeline's own fit gives on the law's means with neither evaluation noise nor
run effects (``truth_replicates``): the estimand an infinite evaluation set and infinitely many seeds would give.
"""

import numpy as np

SIGMAS = np.geomspace(0.01, 40.0, 6)
DATA_VARIANCE = 0.3


def jstar_curve(sigmas):
    """J*(σ): 0 to rounding below σ* ≈ 0.1 (each noisy point still identifies its source), rising to the data
    variance at large σ."""
    return DATA_VARIANCE * sigmas ** 2 / (sigmas ** 2 + 0.25) * np.exp(-(0.1 / sigmas) ** 2)


def study_shape(n_sizes=6, n_snapshots=4, seeds=1):
    """(model, size, params, images): ``seeds`` runs per size (named t<i>, t<i>_s1, …), ``n_snapshots`` geometric
    snapshots each; sizes double, as the tiny ladder's do."""
    names, sizes, params, images = [], [], [], []
    for i in range(n_sizes):
        for k in range(seeds):
            for j in range(n_snapshots):
                names.append(f"t{i}" if k == 0 else f"t{i}_s{k}")
                sizes.append(f"t{i}")
                params.append(1e5 * 2.0 ** i)
                images.append(3000 * 2.0 ** j)
    return np.array(names), np.array(sizes), np.array(params), np.array(images)


def true_gap(params, images, sigmas=SIGMAS, *, a=0.35, b=0.45, curvature=0.03, undertrained=0.6,
             floor_above=0.0):
    """[S, K] the true mean of L − J* per σ: amp_σ·(3·(N/N0)^−(a + curvature·ln(N/N0)/2) + 2·(D/D0)^−b·(1 +
    undertrained·e^(−D/D0)) + floor_above)."""
    amp = 0.15 + 0.1 * np.exp(-np.log(sigmas / 0.5) ** 2)      # largest gap at intermediate σ
    n = np.log(np.asarray(params, float) / 1e5)[:, None]
    dd = np.asarray(images, float)[:, None] / 3e3
    law = (3.0 * np.exp(-(a + curvature * n / 2) * n) + 2.0 * dd ** -b * (1 + undertrained * np.exp(-dd))
           + floor_above)
    return amp * law


def quadrature(sigmas):
    w = np.diff(np.log(sigmas))
    q = np.r_[w[0] / 2, (w[:-1] + w[1:]) / 2, w[-1] / 2]
    return q / q.sum()


def simulate(rng, n_sizes=6, n_snapshots=4, per_sigma=128, sigmas=SIGMAS, *, seeds=1, run_sd=0.04,
             snapshot_sd=0.01, noise=0.5, cross=1.0, **law):
    """A per-triple dict (analysis.resample's format) and the truth (per-σ means of the law, J*, the sizes).

    ``run_sd``: sd of a run's log factor on its excess (shared by its snapshots); ``snapshot_sd``: the same per
    snapshot; ``noise``: the spread of the per-triple excess; ``cross``: scale of the cross term (0: L − J* equals
    the excess per triple). ``law``: true_gap's keywords."""
    model, size, params, images = study_shape(n_sizes, n_snapshots, seeds)
    gap = true_gap(params, images, sigmas, **law)                         # [S, K]
    js = jstar_curve(sigmas)
    k = sigmas.size
    level = np.repeat(np.arange(1, k + 1), per_sigma)
    m = level.size
    runs, run_of = np.unique(model, return_inverse=True)
    factor = np.exp(run_sd * rng.standard_normal(runs.size)[run_of]
                    + snapshot_sd * rng.standard_normal(model.size))[:, None]
    # per triple: the optimal loss, the difficulty shared by every snapshot, each snapshot's own part
    opt = js[level - 1] * rng.gamma(2.0, 0.5, size=m)
    shared = rng.gamma(4.0, 0.25, size=m)
    own = rng.gamma(16.0, 1 / 16, size=(model.size, m))
    excess = (gap * factor)[:, level - 1] * (1 - noise + noise * shared[None, :] * own)
    # cross term 2⟨Dθ − D*, D* − x0⟩ per dimension: bounded by 2·sqrt(o·e) (so L ≥ 0), mean 0, mostly shared
    # by the snapshots (D* − x0 is the triple's)
    z_shared, z_own = 2 * rng.beta(2, 2, size=m) - 1, 2 * rng.beta(2, 2, size=(model.size, m)) - 1
    z = 0.7 * z_shared[None, :] + 0.3 * z_own
    loss = opt[None, :] + excess + cross * 2 * np.sqrt(opt[None, :] * excess) * z
    q = quadrature(sigmas)
    per_triple = {"sigma": sigmas, "level": level, "optimal_loss": opt, "loss": loss, "excess": excess,
                  "total_weight": np.tile(q, (model.size, 1)), "model": model,
                  "params": params.astype(np.int64), "images_seen": images.astype(np.int64),
                  "flops": params * images * 6.0}
    truth = {"loss": js + gap, "jstar": js, "total_loss": (js + gap) @ q, "total_jstar": float(js @ q),
             "sizes": dict(zip(model, size))}
    return per_triple, truth


def stack(blocks):
    """One StudyReplicates holding the rows of several studies of the same shape, block after block (their
    statistics are computed row by row, so many studies cost one vectorised pass); ``kind`` of one block is
    ``blocks[0].kind``."""
    from analysis.resample import StudyReplicates

    first = blocks[0]
    cat = lambda name: np.concatenate([getattr(b, name) for b in blocks])  # noqa: E731
    return StudyReplicates(first.snapshots, first.sigma, cat("loss"), cat("jstar"), cat("excess"), cat("kind"),
                           cat("left_out"))


def simulated_studies(seed, n_studies, n_replicates, *, jackknife=True, **kw):
    """``n_studies`` simulated studies (simulate's keywords) turned into rows by the pipeline
    (analysis.resample.replicates), stacked; and the truth as a one-row study (``truth_replicates``)."""
    from analysis.resample import replicates

    rng = np.random.default_rng(seed)
    blocks = []
    for i in range(n_studies):
        pt, truth = simulate(rng, **kw)
        blocks.append(replicates(pt, n_replicates, seed=i, sizes=truth["sizes"], jackknife=jackknife))
    return stack(blocks), truth_replicates(blocks[0], truth)


def truth_replicates(reps, truth):
    """The study an infinite evaluation set and infinitely many seeds would give: the law's means, as one row
    (seed runs of a size share the law, so their mean is the law)."""
    from analysis.resample import StudyReplicates

    sizes = truth["sizes"]
    model, size, params, images = study_shape(**_shape_of(reps, sizes))
    first = np.flatnonzero([sizes[m] == m for m in model])   # one run per size
    loss = np.concatenate([truth["total_loss"][first, None], truth["loss"][first]], axis=1)[None]
    js = np.broadcast_to(np.r_[truth["total_jstar"], truth["jstar"]], loss.shape).copy()
    return StudyReplicates(reps.snapshots, reps.sigma, loss, js, loss - js)


def _shape_of(reps, sizes):
    snaps = reps.snapshots
    n_sizes = snaps["model"].nunique()
    return {"n_sizes": n_sizes, "n_snapshots": len(snaps) // n_sizes,
            "seeds": len(sizes) // len(set(sizes.values())) if sizes else 1}
