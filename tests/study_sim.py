"""Simulated studies with a known truth, in the shape the pipeline produces (per-triple arrays), for the
statistics tests: per-σ means follow L(N, D, σ) = J*_σ + A_σ/N^a + B_σ/D^b, per-triple errors scatter around them
with noise shared by all snapshots (same triples) plus a small snapshot-specific part."""

import numpy as np

SIGMAS = np.geomspace(0.01, 40.0, 6)


def true_means(params, images, sigmas=SIGMAS, a=0.35, b=0.45):
    """[S, K] true per-σ L and [K] true J*."""
    jstar = 0.3 * sigmas ** 2 / (sigmas ** 2 + 0.25)          # rises from ≈ 0 to the data variance 0.3
    amp = 0.15 + 0.1 * np.exp(-np.log(sigmas / 0.5) ** 2)      # largest gap at intermediate σ
    n, d = np.asarray(params, float)[:, None], np.asarray(images, float)[:, None]
    loss = jstar + amp * (3.0 * (n / 1e5) ** -a + 2.0 * (d / 3e3) ** -b)
    return loss, jstar


def study_shape(n_sizes=6, n_snapshots=4):
    params = np.repeat(1e5 * 2.0 ** np.arange(n_sizes), n_snapshots)
    images = np.tile(3000 * 2.0 ** np.arange(n_snapshots), n_sizes)
    model = np.repeat([f"t{i}" for i in range(n_sizes)], n_snapshots)
    return model, params, images


def simulate(rng, n_sizes=6, n_snapshots=4, per_sigma=128, sigmas=SIGMAS, noise=0.5):
    """A per-triple dict (analysis.resample format) and the true per-σ means."""
    model, params, images = study_shape(n_sizes, n_snapshots)
    loss_true, js_true = true_means(params, images, sigmas)
    k = sigmas.size
    level = np.repeat(np.arange(1, k + 1), per_sigma)
    m = level.size
    # per-triple J*: a positive variable with mean J*_σ (a Gamma with shape 2)
    opt = js_true[level - 1] * rng.gamma(2.0, 0.5, size=m)
    shared = rng.gamma(4.0, 0.25, size=m)                       # the triple's difficulty, common to all snapshots
    own = rng.gamma(16.0, 1 / 16, size=(len(model), m))         # a snapshot-specific part
    gap_true = loss_true - js_true                              # [S, K]
    excess = gap_true[:, level - 1] * (1 - noise + noise * shared[None, :] * own)
    loss = opt[None, :] + excess
    w = np.diff(np.log(sigmas))
    q = np.r_[w[0] / 2, (w[:-1] + w[1:]) / 2, w[-1] / 2]
    weights = np.tile(q / q.sum(), (len(model), 1))
    per_triple = {"sigma": sigmas, "level": level, "optimal_loss": opt, "loss": loss, "excess": excess,
                  "total_weight": weights, "model": model, "params": params.astype(np.int64),
                  "images_seen": images.astype(np.int64), "flops": params * images * 6.0}
    truth = {"loss": loss_true, "jstar": js_true, "total_loss": loss_true @ (q / q.sum()),
             "total_jstar": float(js_true @ (q / q.sum()))}
    return per_triple, truth
