"""Tests of analysis.optimal_loss against analytic oracles, limits, an independent float64 reference and
invariants (docs/science.md)."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

import analysis.posterior as posterior
from analysis.centred_data import CentredData
from analysis.eval_set import eval_noise, sigma_grid
from analysis.optimal_loss import ESTIMATORS, estimate_optimal_loss, main
from analysis.posterior import (
    _int8_pack_queries,
    _int8_screen_bound,
    _screen_bound,
    _screen_logits,
    _screened_posterior,
    posterior_mean,
)
from models.diffusion import x0_loss_factor
from models.processes import get_process


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny GEMMs on an oversubscribed 2-core box are far faster without OpenMP spin-waiting
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# ---- data and references -------------------------------------------------------------------------------

def clustered(n=800, dim=8, k=10, spread=0.3, seed=1):
    rng = np.random.default_rng(seed)
    centres = 2.0 * rng.standard_normal((k, dim))
    labels = rng.integers(0, k, n)
    return centres[labels] + spread * rng.standard_normal((n, dim)), labels


def reference_posterior(data, x, sigma):
    """Independent float64 numpy D*: distances by explicit differences (no GEMM, no cancellation)."""
    data = np.asarray(data, dtype=np.float64).reshape(len(data), -1)
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    sigma = np.broadcast_to(np.asarray(sigma, dtype=np.float64), (len(x),))
    out = np.empty_like(x)
    for i in range(len(x)):
        logits = -((x[i] - data) ** 2).sum(1) / (2 * sigma[i] ** 2)
        w = np.exp(logits - logits.max())
        out[i] = (w[:, None] * data).sum(0) / w.sum()
    return out


def two_point_jstar(a, sigma, nodes=150):
    """J* of {−a, +a} (1-D, VE) by Gauss–Hermite quadrature: a²(1 − E_z tanh²(a(a + σz)/σ²))."""
    z, w = np.polynomial.hermite_e.hermegauss(nodes)
    w = w / math.sqrt(2 * math.pi)
    return a * a * (1.0 - np.sum(w * np.tanh(a * (a + sigma * z) / sigma ** 2) ** 2))


# ---- posterior_mean ------------------------------------------------------------------------------------

@pytest.mark.parametrize("sigma", [0.002, 0.05, 0.5, 1.0, 3.0, 40.0])
def test_posterior_mean_two_point_tanh_oracle(sigma):
    a = 1.3
    x = np.linspace(-4, 4, 41)[:, None] * max(sigma, 0.5)
    got = posterior_mean(np.array([[-a], [a]]), x, sigma).numpy().ravel()
    np.testing.assert_allclose(got, a * np.tanh(a * x.ravel() / sigma ** 2), atol=1e-6, rtol=0)


def test_posterior_mean_matches_float64_reference_with_near_duplicates():
    # D = 256 values in [−1, 1] (float32) with near-duplicate pairs ~σ√D apart: at σ = 0.002 the pair competes
    # and the logits are ~1e8 in size, where a naive float32 ‖x‖² − 2⟨x,x0⟩ + ‖x0‖² would be off by many nats.
    rng = np.random.default_rng(3)
    base = rng.uniform(-1, 1, (150, 256))
    twins = base[:50] + 0.002 * rng.standard_normal((50, 256)) * 0.25
    data = np.concatenate([base, twins]).astype(np.float32)
    src = rng.integers(0, 50, 60)
    sigmas = np.array([0.002, 0.004, 0.02, 0.2, 1.0, 5.0, 80.0]).repeat(10)[:60]
    x = data[src].astype(np.float64) + sigmas[:, None] * rng.standard_normal((60, 256))
    got = posterior_mean(data, x, torch.from_numpy(sigmas)).numpy()
    ref = reference_posterior(data, x, sigmas)
    # the near-duplicate pairs really compete at σ = 0.002 (else this test would not test the precision)
    logits = -((x[:10, None, :] - data[None].astype(np.float64)) ** 2).sum(-1) / (2 * 0.002 ** 2)
    top2 = np.sort(logits, axis=1)[:, -2:]
    assert np.median(top2[:, 1] - top2[:, 0]) < 20
    # large-σ rows take the float32 path: weight errors ≲ 1e-2 nats · (posterior spread), in practice ~1e-6
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
    small = sigmas < 0.1
    np.testing.assert_allclose(got[small], ref[small], atol=1e-9, rtol=0)


# ---- the screen: a cheap low-precision GEMM with a rigorous error bound, then exact float64 candidates --------

def _near_duplicates(seed=3, dim=256, shift=0.0):
    """[200, dim] float32 values in [−1, 1] (+ shift) whose last 50 rows are near-duplicates of the first 50."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(-1, 1, (150, dim)) + shift
    twins = base[:50] + 0.000125 * rng.standard_normal((50, dim))
    return np.concatenate([base, twins]).astype(np.float32)


def _twin_queries(seed):
    """The near-duplicate data and 70 noisy points made from the twinned rows, 10 at each σ from 5e-4 to 80."""
    data = _near_duplicates()
    rng = np.random.default_rng(seed)
    src = rng.integers(0, 50, 70)
    sigmas = np.array([0.0005, 0.002, 0.01, 0.1, 0.5, 2.0, 80.0]).repeat(10)
    return data, data[src].astype(np.float64) + sigmas[:, None] * rng.standard_normal((70, 256)), sigmas


INT8 = pytest.param(torch.int8, marks=pytest.mark.skipif(
    not __import__("analysis.posterior", fromlist=["_int8_available"])._int8_available(),
    reason="this torch build has no fbgemm int8 GEMM"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, INT8])
@pytest.mark.parametrize("shift", [0.0, 3.0])
def test_screen_bound_holds_for_every_entry(dtype, shift):
    # the bound must cover the worst entry for random data, offsets (a large mean) and σ from 0.002 to 80
    data = CentredData(torch.from_numpy(_near_duplicates(shift=shift)), torch.device("cpu"))
    rng = np.random.default_rng(0)
    src = rng.integers(0, data.n, 64)
    sig = torch.from_numpy(np.geomspace(0.002, 80, 64))
    xq = data.rows(torch.from_numpy(src), torch.float64) + sig[:, None] * torch.randn(64, data.dim,
                                                                                       dtype=torch.float64)
    inv2s2 = 0.5 / sig ** 2
    (_, approx), = list(_screen_logits(data, xq, sig, dtype, data.n))       # [N, Q], as the screen computes it
    approx = approx.double()
    if dtype == torch.int8:                                                   # int8 logits carry a row shift
        approx -= ((xq @ data.mean) / sig ** 2)[None, :]
    x0 = data.rows(torch.arange(data.n), torch.float64)
    exact = (2 * xq @ x0.T - (x0 ** 2).sum(1)[None, :]) * inv2s2[:, None]  # [Q, N] in float64
    err = (approx.T - exact).abs()
    bound = _int8_screen_bound(xq, sig, data, _int8_pack_queries(xq)[1]) if dtype == torch.int8 else \
        _screen_bound(xq, sig, data, dtype)
    assert bool((err <= bound[:, None]).all()), float((err / bound[:, None]).max())
    assert float((err / bound[:, None]).max()) > 1e-4   # and is not absurdly loose


@pytest.mark.parametrize("mode", ["bfloat16", "float32", pytest.param("int8", marks=INT8.marks), "auto", "off"])
def test_screened_posterior_matches_float64_reference(monkeypatch, mode):
    # every mode must give the exact D*; screened rows are refined in float64, so they match to ~1e-12
    monkeypatch.setattr(posterior, "_SCREEN", mode)
    data, x, sigmas = _twin_queries(seed=5)
    got = posterior_mean(data, x, torch.from_numpy(sigmas)).numpy()
    ref = reference_posterior(data, x, sigmas)
    # the twins really compete at σ = 0.0005 (else the float64 refinement would not be tested)
    logits = -((x[:10, None, :] - data[None].astype(np.float64)) ** 2).sum(-1) / (2 * 0.0005 ** 2)
    top2 = np.sort(logits, axis=1)[:, -2:]
    assert np.median(top2[:, 1] - top2[:, 0]) < 20
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
    small = sigmas < 0.2
    np.testing.assert_allclose(got[small], ref[small], atol=1e-10 if mode != "off" else 1e-9, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, INT8])
def test_screen_takes_the_concentrated_rows_and_leaves_the_dense_ones(dtype):
    data = CentredData(torch.from_numpy(_near_duplicates()), torch.device("cpu"))
    rng = np.random.default_rng(1)
    src = torch.from_numpy(rng.integers(0, data.n, 40))
    sig = torch.tensor([0.01] * 20 + [50.0] * 20, dtype=torch.float64)
    xq = data.rows(src, torch.float64) + sig[:, None] * torch.randn(40, data.dim, dtype=torch.float64)
    den, done = _screened_posterior(data, xq, sig, dtype, chunk=64, init_max=None, max_candidates=32)
    assert bool(done[:20].all())          # one-hot posteriors: certified and refined
    assert not bool(done[20:].any())      # at σ = 50 every point matters: handed to the streaming path
    ref = reference_posterior(data.rows(torch.arange(data.n), torch.float64), xq[:20], sig[:20])
    np.testing.assert_allclose(den[:20].numpy(), ref, atol=1e-12, rtol=0)


def test_cpu_screen_precision_follows_batch_size_and_hint(monkeypatch):
    data = CentredData(torch.from_numpy(_near_duplicates()), torch.device("cpu"))
    fast = torch.tensor([True, False, True])
    dtype, rows = posterior._screen_dtype(data, fast, hinted=True)       # a small batch: float32, the float64 rows only
    assert dtype == torch.float32 and rows.tolist() == [False, True, False]
    monkeypatch.setattr(posterior, "_INT8_MIN_GEMM", 0)                    # as if the batch were large
    dtype, rows = posterior._screen_dtype(data, fast, hinted=True)
    if posterior._int8_available():
        assert dtype == torch.int8 and bool(rows.all())
    assert posterior._screen_dtype(data, fast, hinted=False)[0] == torch.float32   # no hint: no int8 screen
    monkeypatch.setattr(posterior, "_SCREEN", "off")
    assert posterior._screen_dtype(data, fast, hinted=True)[0] is None


def test_screen_is_skipped_for_a_sigma_once_it_finished_almost_nothing(monkeypatch):
    monkeypatch.setattr(posterior, "_SCREEN", "bfloat16")
    monkeypatch.setattr(posterior, "_SCREEN_MIN_CANDIDATES", 16)   # (the default, 256, exceeds this N = 200)
    data = CentredData(torch.from_numpy(_near_duplicates()), torch.device("cpu"))
    log = []
    for sigma, expect in ((50.0, [0.0]), (50.0, [0.0])):     # dense: logged once, then skipped
        sig = torch.full((30,), sigma, dtype=torch.float64)
        xq = data.rows(torch.arange(30), torch.float64) + sigma * torch.randn(30, data.dim, dtype=torch.float64)
        got = posterior.posterior_centred(data, xq, sig, None, screen_log=log)
        assert log == expect
        ref = reference_posterior(data.rows(torch.arange(data.n), torch.float64), xq, sig)
        np.testing.assert_allclose(got.numpy(), ref, atol=1e-6, rtol=0)
    small = []
    sig = torch.full((30,), 0.01, dtype=torch.float64)
    posterior.posterior_centred(data, data.rows(torch.arange(30), torch.float64), sig, None, screen_log=small)
    assert small == [1.0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("screen", ["auto", "off"])
def test_cuda_matches_float64_reference(monkeypatch, screen):
    monkeypatch.setattr(posterior, "_SCREEN", screen)
    data, x, sigmas = _twin_queries(seed=6)
    got = posterior_mean(data, x, torch.from_numpy(sigmas), device="cuda").cpu().numpy()
    ref = reference_posterior(data, x, sigmas)
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(got[sigmas < 0.2], ref[sigmas < 0.2], atol=1e-9, rtol=0)
    # the estimator draws ε on the device (other numbers than the CPU's): agreement within the standard error
    cpu = estimate_optimal_loss(data, [0.01, 0.3, 3.0], n_samples=1024)
    gpu = estimate_optimal_loss(data, [0.01, 0.3, 3.0], n_samples=1024, device="cuda")
    again = estimate_optimal_loss(data, [0.01, 0.3, 3.0], n_samples=1024, device="cuda")
    pd.testing.assert_frame_equal(gpu, again)
    se = np.hypot(cpu["stderr"], gpu["stderr"])
    assert bool((np.abs(gpu["optimal_loss"] - cpu["optimal_loss"]) <= 4 * se + 1e-12).all())


@pytest.mark.parametrize("sigma, tol", [(0.7, 1e-5), (0.01, 1e-11)])
def test_posterior_mean_chunked_equals_unchunked(sigma, tol):
    # σ = 0.7 takes the float32 GEMM path (summation order differs by chunk: ~1e-6), σ = 0.01 the float64 one
    data, _ = clustered(n=300, dim=6)
    rng = np.random.default_rng(0)
    x = data[rng.integers(0, 300, 40)] + sigma * rng.standard_normal((40, 6))
    whole = posterior_mean(data, x, sigma, chunk_size=300)
    tiny = posterior_mean(data, x, sigma, chunk_size=7)
    np.testing.assert_allclose(tiny.numpy(), whole.numpy(), rtol=0, atol=tol)
    np.testing.assert_allclose(whole.numpy(), reference_posterior(data, x, sigma), rtol=0, atol=tol)


def test_posterior_mean_conditional_runs_over_the_class_only():
    data, labels = clustered(n=200, dim=4, k=3)
    rng = np.random.default_rng(1)
    qlab = rng.integers(0, 3, 30)
    x = 5.0 * rng.standard_normal((30, 4))          # far from everything: the class decides
    got = posterior_mean(data, x, 2.0, labels=labels, noisy_labels=qlab).numpy()
    for c in range(3):
        rows = qlab == c
        np.testing.assert_allclose(got[rows], reference_posterior(data[labels == c], x[rows], 2.0), atol=1e-6)


def test_posterior_mean_keeps_shape_and_rejects_bad_input():
    data = np.random.default_rng(0).standard_normal((20, 2, 3, 3)).astype(np.float32)
    out = posterior_mean(data, data[:5] + 0.1, 0.5)
    assert out.shape == (5, 2, 3, 3)
    with pytest.raises(ValueError, match="sigma"):
        posterior_mean(data, data[:5], 0.0)
    with pytest.raises(ValueError, match="features"):
        posterior_mean(data, data[:5, :1], 0.5)
    with pytest.raises(ValueError, match="noisy_labels"):
        posterior_mean(data, data[:5], 0.5, labels=np.zeros(20, int))


# ---- estimate_optimal_loss: oracles and limits ---------------------------------------------------------

def test_full_two_point_against_quadrature():
    a = 1.0
    sigmas = [0.3, 0.7, 1.5, 4.0]
    df = estimate_optimal_loss(np.array([[-a], [a]]), sigmas, n_samples=20000, seed=0)
    exact = np.array([two_point_jstar(a, s) for s in sigmas])
    assert (df["stderr"] > 0).all()
    z = (df["optimal_loss"] - exact) / df["stderr"]
    assert np.all(np.abs(z) < 4), (df["optimal_loss"].tolist(), exact.tolist())
    # σ = 0.3 is a rare-event regime (J* ≈ 1e-3 from a few samples near x = 0): only the z-test there
    np.testing.assert_allclose(df["optimal_loss"][1:], exact[1:], rtol=0.03)


def test_limits_zero_and_data_variance():
    data, _ = clustered(n=300, dim=5)
    df = estimate_optimal_loss(data, [1e-3, 1e5], n_samples=600)   # N divides M: A is exact
    tr_cov_per_dim = data.var(axis=0).mean()                        # population covariance, per dimension
    assert df["optimal_loss"].iloc[0] < 1e-12
    np.testing.assert_allclose(df["optimal_loss"].iloc[1], tr_cov_per_dim, rtol=1e-6)
    np.testing.assert_allclose(df["a_minus_b"].iloc[1], tr_cov_per_dim, rtol=1e-6)


def test_monotone_in_sigma():
    data, _ = clustered(n=400, dim=6)
    sig = np.geomspace(0.01, 50, 16)
    j = estimate_optimal_loss(data, sig, n_samples=800)["optimal_loss"].to_numpy()
    assert np.all(np.diff(j) >= -1e-12), j


def test_large_gaussian_sample_matches_gaussian_formula():
    # well above the sample's critical σ* the empirical posterior is the Gaussian one: J* = s²σ²/(s² + σ²)
    rng = np.random.default_rng(5)
    s = 1.5
    data = s * rng.standard_normal((2000, 2))
    s2 = data.var(axis=0).mean()
    sig = np.array([0.5, 1.0, 2.0, 4.0]) * s
    df = estimate_optimal_loss(data, sig, n_samples=4000, seed=1)
    gauss = s2 * sig ** 2 / (s2 + sig ** 2)
    np.testing.assert_allclose(df["optimal_loss"], gauss, rtol=0.03)


def test_full_direct_and_a_minus_b_agree():
    data, _ = clustered(n=400, dim=6)
    df = estimate_optimal_loss(data, [0.3, 1.0, 3.0], n_samples=1600)
    diff = (df["direct"] - df["a_minus_b"]).abs()
    assert np.all(diff <= 4 * np.hypot(df["direct_stderr"], df["a_minus_b_stderr"]) + 1e-12)
    assert np.all(df["optimal_loss"] == df["direct"])


# ---- subset estimators ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster_runs():
    data, labels = clustered()
    n = len(data)
    sig = np.geomspace(0.05, 30, 10)
    m = 4 * n
    runs = {"full": estimate_optimal_loss(data, sig, n_samples=m)}
    runs["dol"] = estimate_optimal_loss(data, sig, estimator="dol", subset_size=n // 20, n_samples=m)
    runs["cdol"] = estimate_optimal_loss(data, sig, estimator="cdol", subset_size=n // 4, n_samples=m)
    runs["snis"] = estimate_optimal_loss(data, sig, estimator="snis", subset_size=n // 4, n_samples=m)
    runs["cond"] = estimate_optimal_loss(data, sig, labels=labels, n_samples=m)
    return data, labels, runs


def test_dol_underestimates_at_intermediate_sigma(cluster_runs):
    data, _, runs = cluster_runs
    full, dol = runs["full"], runs["dol"]
    var = data.var(axis=0).mean()
    mid = ((full["optimal_loss"] > 0.01 * var) & (full["optimal_loss"] < 0.9 * var)).to_numpy()
    assert mid.sum() >= 3
    # paired (same sources and ε) comparison with the full estimator's A − B form
    gap = (full["a_minus_b"] - dol["optimal_loss"])[mid]
    assert np.all(gap > 0), gap.tolist()
    assert (gap / full["optimal_loss"][mid]).max() > 0.2
    assert dol["C"].iloc[0] == 1.0 and dol["subset_size"].iloc[0] == len(data) // 20


def test_cdol_within_two_percent_of_full(cluster_runs):
    data, _, runs = cluster_runs
    full, cdol = runs["full"], runs["cdol"]
    n = len(data)
    assert cdol["C"].iloc[0] == pytest.approx(4 * n / (n // 4))
    var = data.var(axis=0).mean()
    where = (full["optimal_loss"] > 0.1 * var).to_numpy()
    assert where.sum() >= 4
    rel = ((cdol["optimal_loss"] - full["a_minus_b"]) / full["optimal_loss"])[where]
    assert np.all(np.abs(rel) < 0.02), rel.tolist()
    rel_direct = ((cdol["optimal_loss"] - full["optimal_loss"]) / full["optimal_loss"])[where]
    assert np.all(np.abs(rel_direct) < 0.02 + 3 * (cdol["stderr"] / full["optimal_loss"])[where])


def test_snis_is_noisier_than_cdol_at_small_sigma(cluster_runs):
    _, _, runs = cluster_runs
    small = (runs["full"]["sigma"] < 0.2).to_numpy()
    snis_err = (runs["snis"]["optimal_loss"] - runs["full"]["optimal_loss"]).abs()[small]
    cdol_err = (runs["cdol"]["optimal_loss"] - runs["full"]["optimal_loss"]).abs()[small]
    assert np.all(runs["snis"]["stderr"][small] > 10 * runs["cdol"]["stderr"][small] + 1e-6)
    assert np.all(snis_err > cdol_err)


def test_conditional_not_above_unconditional(cluster_runs):
    data, labels, runs = cluster_runs
    full, cond = runs["full"], runs["cond"]
    tol = 3 * np.hypot(full["stderr"], cond["stderr"]) + 1e-12
    assert np.all(cond["optimal_loss"] <= full["optimal_loss"] + tol)
    # at large σ the conditional J* is the mean within-class variance, far below the total variance
    within = sum((labels == c).mean() * data[labels == c].var(axis=0).mean() for c in np.unique(labels))
    np.testing.assert_allclose(cond["optimal_loss"].iloc[-1], within, rtol=0.05)
    assert cond["conditional"].all() and not full["conditional"].any()


def test_cdol_with_c_one_is_dol():
    data, _ = clustered(n=200, dim=4)
    kw = dict(subset_size=20, n_samples=256, seed=4)
    dol = estimate_optimal_loss(data, [0.5, 2.0], estimator="dol", **kw)
    cdol1 = estimate_optimal_loss(data, [0.5, 2.0], estimator="cdol", C=1.0, **kw)
    np.testing.assert_allclose(cdol1["optimal_loss"], dol["optimal_loss"], rtol=1e-12)


# ---- determinism, chunking, interface ------------------------------------------------------------------

@pytest.mark.parametrize("estimator", ESTIMATORS + ("cdol-nn",))
def test_same_seed_same_numbers(estimator):
    data, _ = clustered(n=200, dim=4)
    kw = dict(estimator=estimator, n_samples=300, subset_size=20)
    a = estimate_optimal_loss(data, [0.3, 1.0], seed=11, **kw)
    b = estimate_optimal_loss(data, [0.3, 1.0], seed=11, **kw)
    c = estimate_optimal_loss(data, [0.3, 1.0], seed=12, **kw)
    pd.testing.assert_frame_equal(a, b)
    assert not np.allclose(a["optimal_loss"], c["optimal_loss"])


def test_estimate_chunked_equals_unchunked():
    data, _ = clustered(n=300, dim=6)
    a = estimate_optimal_loss(data, [0.2, 1.0, 5.0], n_samples=300, chunk_size=300)
    b = estimate_optimal_loss(data, [0.2, 1.0, 5.0], n_samples=300, chunk_size=5)
    # rows above σ ≈ 0.05 run the float32 GEMM, whose summation order follows the chunking (~1e-6)
    np.testing.assert_allclose(a["optimal_loss"], b["optimal_loss"], rtol=1e-5, atol=1e-14)


def test_estimate_columns_and_bad_input():
    data, _ = clustered(n=100, dim=3)
    df = estimate_optimal_loss(torch.from_numpy(data).float(), [0.5], estimator="cdol", n_samples=64)
    for col in ("sigma", "optimal_loss", "stderr", "estimator", "n_samples", "subset_size", "C"):
        assert col in df.columns
    assert df["n_samples"].iloc[0] == 64 and df["subset_size"].iloc[0] == 64   # default L = clip(N/20, 64, …)
    with pytest.raises(ValueError, match="estimator"):
        estimate_optimal_loss(data, [0.5], estimator="bogus")
    with pytest.raises(ValueError, match="sigmas"):
        estimate_optimal_loss(data, [0.5, -1.0])
    with pytest.raises(ValueError, match="subset_size"):
        estimate_optimal_loss(data, [0.5], estimator="dol", subset_size=1000)
    with pytest.raises(ValueError, match="C must"):
        estimate_optimal_loss(data, [0.5], estimator="cdol", C=0)


# ---- CLI ---------------------------------------------------------------------------------------------

def test_cli_estimate_and_denoise(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (60, 1, 4, 4)).astype(np.float32)
    labels = rng.integers(0, 3, 60)
    np.savez(tmp_path / "dataset.npz", x=x, labels=labels)
    out = tmp_path / "jstar.csv"
    rc = main(["--dataset", str(tmp_path / "dataset.npz"), "--estimator", "all", "--out", str(out),
               "--num-sigmas", "4", "--n-samples", "120", "--subset-size", "10", "--process", "vp",
               "--target", "eps"])
    assert rc == 0
    df = pd.read_csv(out)
    assert sorted(df["estimator"].unique()) == sorted(ESTIMATORS) and len(df) == 16
    assert np.isclose(df["sigma"].min(), 0.002) and np.isclose(df["sigma"].max(), 80.0)
    ok = df["process_loss"].notna()
    assert ok.any()
    proc = get_process("vp")
    factor = x0_loss_factor("eps", proc, torch.tensor(df.loc[ok, "t"].to_numpy(dtype=np.float64))).numpy()
    np.testing.assert_allclose(df.loc[ok, "process_loss"], factor * df.loc[ok, "optimal_loss"], rtol=1e-9)

    index = rng.integers(0, 60, 25)
    sig = np.geomspace(0.002, 80, 25)
    seeds = rng.integers(0, 2 ** 31, 25)
    np.savez(tmp_path / "eval_set.npz", index=index, sigma=sig, noise_seed=seeds)
    rc = main(["denoise", "--dataset", str(tmp_path / "dataset.npz"), "--eval-set",
               str(tmp_path / "eval_set.npz"), "--out", str(tmp_path / "den.npy"), "--conditional"])
    assert rc == 0
    den = np.load(tmp_path / "den.npy")
    assert den.shape == (25, 16) and den.dtype == np.float32
    eps = torch.stack([torch.randn((1, 4, 4), generator=torch.Generator().manual_seed(int(s))) for s in seeds])
    assert torch.equal(eval_noise((1, 4, 4), seeds), eps)
    noisy = x[index].astype(np.float64) + sig[:, None, None, None] * eps.double().numpy()
    flat = x.reshape(60, -1)
    for i in range(25):
        same = labels == labels[index[i]]
        ref = reference_posterior(flat[same], noisy[i].reshape(1, -1), sig[i])[0]
        np.testing.assert_allclose(den[i], ref, atol=2e-6)


def test_cli_one_sigma_sits_where_the_evaluation_set_puts_it(tmp_path):
    """A one-point J* grid is the evaluation set's one σ (analysis.eval_set.sigma_grid): the geometric midpoint,
    so a one-σ study compares L and J* at the same noise level."""
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "dataset.npz", x=rng.uniform(-1, 1, (20, 1, 2, 2)).astype(np.float32))
    out = tmp_path / "jstar.csv"
    assert main(["--dataset", str(tmp_path / "dataset.npz"), "--out", str(out), "--num-sigmas", "1",
                 "--sigma-min", "0.01", "--sigma-max", "100", "--n-samples", "40"]) == 0
    sigma = pd.read_csv(out)["sigma"].to_numpy()
    np.testing.assert_allclose(sigma, [1.0], rtol=1e-12)
    np.testing.assert_array_equal(sigma, sigma_grid(1, 0.01, 100.0))
    with pytest.raises(SystemExit):  # an inverted range is the CLI's usage error, naming the flags
        main(["--dataset", str(tmp_path / "dataset.npz"), "--out", str(out), "--sigma-min", "5", "--sigma-max", "1"])


def test_source_index_hint_changes_nothing_but_speed():
    data, labels = clustered(n=300, dim=6, k=3)
    rng = np.random.default_rng(2)
    src = rng.integers(0, 300, 50)
    for sigma in (0.01, 0.5, 3.0):
        x = data[src] + sigma * rng.standard_normal((50, 6))
        plain = posterior_mean(data, x, sigma, chunk_size=64)
        hinted = posterior_mean(data, x, sigma, chunk_size=64, source_index=src)
        np.testing.assert_allclose(hinted.numpy(), plain.numpy(), rtol=0, atol=1e-6)
        kw = dict(labels=labels, noisy_labels=labels[src], chunk_size=16)
        np.testing.assert_allclose(posterior_mean(data, x, sigma, source_index=src, **kw).numpy(),
                                   posterior_mean(data, x, sigma, **kw).numpy(), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="source_index"):
        posterior_mean(data, x, 1.0, source_index=[0, 1])


def test_cdol_nn_reduces_the_subset_bias():
    # same samples as cDOL at the same L: the neighbour stratum + variance correction should cut the worst
    # relative error (the two are compared on the σ where J* matters)
    data, _ = clustered(n=600, dim=8, seed=3)
    sig = np.geomspace(0.1, 20, 8)
    m, L = 1200, 600 // 16
    full = estimate_optimal_loss(data, sig, n_samples=m)
    live = (full["optimal_loss"] > 0.01 * data.var(axis=0).mean()).to_numpy()
    err = {}
    for est in ("cdol", "cdol-nn"):
        df = estimate_optimal_loss(data, sig, estimator=est, subset_size=L, n_samples=m)
        err[est] = ((df["optimal_loss"] - full["a_minus_b"]) / full["optimal_loss"]).to_numpy()[live]
    assert np.abs(err["cdol-nn"]).max() < 0.7 * np.abs(err["cdol"]).max(), err
    assert abs(err["cdol-nn"][-1]) < 0.01          # large σ: the −variance/L bias is corrected
    assert abs(err["cdol"][-1]) > 2 * abs(err["cdol-nn"][-1])
