"""Tests for the study's statistics (analysis/resample.py, analysis/study_stats.py): replicates, the one frontier,
the vectorised fits against float64 references, interval coverage on simulated studies with a known truth, the
paired verdict, the compute-optimal law, and machine independence."""

import numpy as np
import pandas as pd
import pytest
from scipy.optimize import minimize_scalar

from analysis import study_stats as st
from analysis.resample import StudyReplicates, load_per_triple, replicates, resample_counts, save_per_triple
from tests.study_sim import simulate, study_shape


def _truth_replicates(reps: StudyReplicates, truth: dict) -> StudyReplicates:
    """The study an infinite evaluation set would give: the true means, as replicate 0."""
    loss = np.concatenate([truth["total_loss"][:, None], truth["loss"]], axis=1)[None]
    js = np.broadcast_to(np.r_[truth["total_jstar"], truth["jstar"]], loss.shape).copy()
    return StudyReplicates(reps.snapshots, reps.sigma, loss, js, loss - js)


# ---------------------------------------------------------------------------------------------------------------
# replicates
# ---------------------------------------------------------------------------------------------------------------
def test_resample_counts_keep_each_sigma_level_and_are_deterministic():
    level = np.repeat([1, 2, 3], [5, 7, 4])
    c = resample_counts(level, 50, seed=3)
    assert c.shape == (51, 16) and (c[0] == 1).all()
    for lv, n in ((1, 5), (2, 7), (3, 4)):
        assert (c[:, level == lv].sum(axis=1) == n).all()   # a resample of a σ level keeps its size
    np.testing.assert_array_equal(c, resample_counts(level, 50, seed=3))
    assert not np.array_equal(c, resample_counts(level, 50, seed=4))


def test_replicate_zero_is_the_evaluation_set_and_totals_use_the_weights(tmp_path):
    pt, _ = simulate(np.random.default_rng(0), n_sizes=3, n_snapshots=2, per_sigma=16)
    save_per_triple(tmp_path / "p.npz", pt)
    back = load_per_triple(tmp_path / "p.npz")
    assert list(back["model"]) == list(pt["model"])
    reps = replicates(back, 20, seed=0)
    k = pt["sigma"].size
    for j in range(k):  # per-σ means of replicate 0 are the plain means over that σ's triples
        sel = pt["level"] == j + 1
        np.testing.assert_allclose(reps.loss[0, :, j + 1], pt["loss"][:, sel].mean(axis=1), rtol=1e-12)
        np.testing.assert_allclose(reps.jstar[0, 0, j + 1], pt["optimal_loss"][sel].mean(), rtol=1e-12)
    np.testing.assert_allclose(reps.loss[:, :, 0], np.einsum("rsk,sk->rs", reps.loss[:, :, 1:], pt["total_weight"]))
    # pairing: a replicate moves J* and L together, so L − J* moves far less than L
    assert np.std(reps.loss[1:, 0, 3] - reps.jstar[1:, 0, 3]) < np.std(reps.loss[1:, 0, 3])


def test_load_per_triple_names_a_bad_file(tmp_path):
    pt, _ = simulate(np.random.default_rng(0), n_sizes=2, n_snapshots=2, per_sigma=4)
    pt["excess"] = pt["excess"][:, :-1]
    save_per_triple(tmp_path / "bad.npz", pt)
    with pytest.raises(ValueError, match="bad.npz: excess has shape"):
        load_per_triple(tmp_path / "bad.npz")


# ---------------------------------------------------------------------------------------------------------------
# the one frontier
# ---------------------------------------------------------------------------------------------------------------
def test_frontier_on_crossing_curves():
    # two models whose loss curves cross: the small one is better at low compute, the big one at high compute
    flops = np.array([1, 2, 4, 8, 3, 6, 12, 24], dtype=float)
    loss = np.array([1.0, 0.8, 0.7, 0.65, 1.2, 0.75, 0.6, 0.5])
    mask = st.frontier_mask(flops, loss)[0]
    # by compute: 1 (1.0) 2 (0.8) 3 (1.2 ✗) 4 (0.7) 6 (0.75 ✗) 8 (0.65) 12 (0.6) 24 (0.5)
    np.testing.assert_array_equal(mask, [True, True, True, True, False, False, True, True])
    # brute force: on the frontier iff strictly below every loss with less compute
    for i in range(len(flops)):
        cheaper = flops < flops[i]
        assert mask[i] == (loss[i] < loss[cheaper].min() if cheaper.any() else True)
    # rows are replicates: each gets its own frontier
    two = st.frontier_mask(flops, np.stack([loss, loss[::-1]]))
    np.testing.assert_array_equal(two[0], mask)
    assert two[1].sum() != mask.sum()


def test_one_frontier_for_every_level_and_quantity():
    pt, _ = simulate(np.random.default_rng(1))
    reps = replicates(pt, 0)
    table = st.study_table(reps, axes=("compute",), quantities=("raw", "minus_jstar", "excess"))
    assert table["n"].nunique() == 1   # every σ and quantity uses the same frontier points
    n_front = int(st.frontier_mask(reps.snapshots["flops"].to_numpy(), reps.loss[:, :, 0]).sum())
    assert table["n"].iloc[0] == n_front


# ---------------------------------------------------------------------------------------------------------------
# vectorised fits against references
# ---------------------------------------------------------------------------------------------------------------
def test_loglinear_fit_matches_polyfit_with_masks():
    rng = np.random.default_rng(0)
    u = rng.uniform(0, 5, size=(7, 12))
    y = 0.5 + np.exp(1.0 - 0.3 * u + 0.05 * rng.standard_normal(u.shape))
    w = (rng.random(u.shape) < 0.7).astype(float)
    w[:, :3] = 1.0
    c = rng.uniform(0, 0.4, size=7)
    k, p, r, valid = st.loglinear_fit(u, y, c, w)
    assert valid.all()
    for i in range(7):
        sel = w[i] > 0
        kk, pp = np.polyfit(u[i, sel], np.log(y[i, sel] - c[i]), 1)
        assert k[i] == pytest.approx(kk, rel=1e-10) and p[i] == pytest.approx(pp, rel=1e-10)
        assert r[i] == pytest.approx(np.corrcoef(u[i, sel], np.log(y[i, sel] - c[i]))[0, 1], rel=1e-10)
    # a used point at or below the offset makes that row invalid, not silently dropped
    y2 = y.copy()
    y2[2, 0] = c[2]
    assert not st.loglinear_fit(u, y2, c, w)[3][2]


def test_free_offset_fit_recovers_exact_law_and_reaches_the_global_optimum():
    u = np.log(np.geomspace(1e3, 1e6, 9))
    y = 0.2 + 3.0 * np.exp(-0.35 * u)
    k, p, c, valid = st.free_offset_fit(u[None], y[None], np.ones((1, 9)))
    assert valid[0] and k[0] == pytest.approx(-0.35, abs=1e-4) and c[0] == pytest.approx(0.2, rel=1e-3)
    # noisy data: compare the relative-least-squares optimum with a dense 1-D profile over k (float64 reference)
    rng = np.random.default_rng(5)
    yn = y * np.exp(0.02 * rng.standard_normal(y.size))
    k, p, c, _ = st.free_offset_fit(u[None], yn[None], np.ones((1, 9)))

    def profile(kk):
        _, _, sse = st._offset_fits(np.exp(kk * u)[None, None, :], yn[None, None, :], np.ones((1, 1, 9)),
                                    np.array([[yn.min() * (1 - 1e-9)]]))
        return float(sse[0, 0])

    ks = np.linspace(-3, 3, 60001)
    best = ks[np.argmin([profile(v) for v in ks])]
    ref = minimize_scalar(profile, bounds=(best - 1e-4, best + 1e-4), method="bounded", options={"xatol": 1e-10})
    assert k[0] == pytest.approx(ref.x, abs=2e-5)
    assert profile(k[0]) <= ref.fun * (1 + 1e-6)


# ---------------------------------------------------------------------------------------------------------------
# intervals: coverage on simulated studies with a known truth, and too few points
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_intervals_cover_the_truth_on_simulated_studies():
    """≥ 90% coverage of nominal-95% intervals over 200 simulated studies of the default study's shape (6 sizes × 4
    snapshots), through the pipeline's own path: per-triple arrays → replicates → the fit table. The truth is what
    the same fits give on the true means (an infinite evaluation set)."""
    quantities = ("raw", "minus_jstar", "excess")
    hits = {q: 0 for q in quantities}
    n_studies = 200
    for i in range(n_studies):
        pt, truth = simulate(np.random.default_rng(1000 + i))
        reps = replicates(pt, 1000, seed=i)
        est = st.study_table(reps, axes=("compute",), quantities=quantities, levels=[0]).set_index("quantity")
        true = st.study_table(_truth_replicates(reps, truth), axes=("compute",), quantities=quantities,
                              levels=[0]).set_index("quantity")
        for q in quantities:
            hits[q] += est.loc[q, "exponent_ci_lo"] <= true.loc[q, "exponent"] <= est.loc[q, "exponent_ci_hi"]
    coverage = {q: h / n_studies for q, h in hits.items()}
    assert all(c >= 0.90 for c in coverage.values()), coverage


def test_too_few_points_give_no_interval_on_the_smoke_shape():
    pt, _ = simulate(np.random.default_rng(2), n_sizes=3, n_snapshots=2)   # the smoke study: 3 sizes × 2 snapshots
    table = st.study_table(replicates(pt, 200, seed=0), levels=[0])
    params = table[table["axis"] == "params"]
    assert (params["n"] == 3).all()
    assert params["exponent"].notna().all() and params["exponent_ci_lo"].isna().all()
    assert params["note"].str.contains("no interval: 3 points").all()
    small = table[table["n"] < st.MIN_POINTS_FOR_INTERVAL]
    assert small["exponent_ci_lo"].isna().all()


def test_every_interval_holds_its_estimate():
    pt, _ = simulate(np.random.default_rng(3))
    fits = st.StudyFits(replicates(pt, 300, seed=0))
    for table in (st.study_table(fits), st.verdict_table(fits)):
        for lo in [c for c in table.columns if c.endswith("_ci_lo")]:
            key = lo[: -len("_ci_lo")]
            has = table[lo].notna()
            assert has.any(), key
            assert (table.loc[has, lo] <= table.loc[has, key] + 1e-12).all(), key
            assert (table.loc[has, key] <= table.loc[has, key + "_ci_hi"] + 1e-12).all(), key


# ---------------------------------------------------------------------------------------------------------------
# the verdict
# ---------------------------------------------------------------------------------------------------------------
def test_verdict_places_jstar_against_the_free_offset():
    pt, truth = simulate(np.random.default_rng(4), noise=0.2)
    reps = replicates(pt, 400, seed=0)
    v = st.verdict_table(reps, axes=("compute",), levels=[0]).iloc[0]
    # the simulated law's floor is J*: J* inside the free-offset interval, and L − J* is the straighter line
    assert v["jstar_vs_free_offset"] == "inside", v
    assert v["verdict_rho"] == "better" and v["delta_rho_ci_lo"] > 0
    # lie about J* (a quarter of it): the data still put the floor at the true J*, above the claimed one
    low = StudyReplicates(reps.snapshots, reps.sigma, reps.loss, reps.jstar / 4, reps.excess)
    v = st.verdict_table(low, axes=("compute",), levels=[0]).iloc[0]
    assert v["jstar_vs_free_offset"] == "below", v


def test_offset_profile_marks_jstar_and_free_offset():
    pt, _ = simulate(np.random.default_rng(6))
    prof = st.offset_profile(replicates(pt, 100, seed=0), axes=("compute",))
    assert set(prof["marker"]) == {"", "jstar", "free_offset"}
    grid = prof[prof["marker"] == ""]
    assert grid["c"].iloc[0] == 0 and grid["c"].is_monotonic_increasing
    assert grid["rho"].notna().all() and grid["extrapolation_error"].notna().all()


# ---------------------------------------------------------------------------------------------------------------
# the compute-optimal law
# ---------------------------------------------------------------------------------------------------------------
def test_compute_optimal_recovers_a_known_law():
    model, params, images = study_shape(6, 4)
    E, A, B, a, b = 0.15, 40.0, 90.0, 0.35, 0.45
    loss = E + A / params ** a + B / images ** b
    for floor in (E, None):
        f = st.fit_compute_optimal(params, images, loss, floor=floor)
        for key, v in (("E", E), ("A", A), ("B", B), ("a", a), ("b", b)):
            assert f[key] == pytest.approx(v, rel=1e-5), (floor, key)
        assert f["n_opt_exponent"] == pytest.approx(b / (a + b), rel=1e-5)
        assert f["d_opt_exponent"] == pytest.approx(a / (a + b), rel=1e-5)


def test_compute_optimal_table_has_intervals_that_cover_the_simulated_law():
    pt, truth = simulate(np.random.default_rng(7))
    co = st.compute_optimal_table(replicates(pt, 200, seed=0)).set_index("floor")
    assert list(co.index) == ["jstar", "free"]
    row = co.loc["jstar"]
    assert row["a_ci_lo"] <= row["a"] <= row["a_ci_hi"] and row["b_ci_lo"] <= row["b"] <= row["b_ci_hi"]
    assert row["E"] == pytest.approx(truth["total_jstar"], rel=0.1)   # J* on the evaluation set, not the exact J*
    assert 0 < row["n_opt_exponent_ci_lo"] < row["n_opt_exponent_ci_hi"] < 1


# ---------------------------------------------------------------------------------------------------------------
# the same numbers on any machine
# ---------------------------------------------------------------------------------------------------------------
def test_numbers_do_not_depend_on_the_thread_count():
    from threadpoolctl import threadpool_limits

    pt, _ = simulate(np.random.default_rng(8))
    outs = []
    for threads in (1, 2):
        with threadpool_limits(limits=threads):
            fits = st.StudyFits(replicates(pt, 200, seed=0))
            outs.append((st.study_table(fits, levels=[0, 3]), st.compute_optimal_table(fits.reps)))
    num = lambda t: t.select_dtypes("number").to_numpy(dtype=float)  # noqa: E731
    np.testing.assert_allclose(num(outs[0][0]), num(outs[1][0]), rtol=1e-9, equal_nan=True)
    np.testing.assert_allclose(num(outs[0][1]), num(outs[1][1]), rtol=1e-6, equal_nan=True)


def test_a_free_floor_the_data_drive_to_zero_is_exactly_zero():
    """Without a floor in the data the free E has no optimum (its gradient vanishes): it is reported as exactly 0,
    the same on every machine, and the rest of the law is still recovered."""
    model, params, images = study_shape(6, 4)
    loss = 40.0 / params ** 0.35 + 90.0 / images ** 0.45
    f = st.fit_compute_optimal(params, images, loss, floor=None)
    assert f["E"] == 0.0
    assert f["a"] == pytest.approx(0.35, rel=1e-6) and f["b"] == pytest.approx(0.45, rel=1e-6)


def test_a_free_offset_at_its_bound_is_not_compared_with_jstar():
    """A last point far below the trend makes the free offset fall to its bound (0): a boundary, which the verdict
    must not read as a floor (the simulated law's own floor is interior)."""
    pt, _ = simulate(np.random.default_rng(9), n_sizes=4, n_snapshots=3)
    reps = replicates(pt, 50, seed=0)
    assert not st.StudyFits(reps).fit("compute", "free_offset", 0)["at_bound"][0]
    loss = reps.loss.copy()
    loss[:, np.argmax(reps.snapshots["flops"].to_numpy()), :] *= 0.6
    fits = st.StudyFits(StudyReplicates(reps.snapshots, reps.sigma, loss, reps.jstar, reps.excess))
    assert fits.fit("compute", "free_offset", 0)["at_bound"][0]
    table = st.study_table(fits, axes=("compute",), quantities=("free_offset",), levels=[0]).iloc[0]
    v = st.verdict_table(fits, axes=("compute",), levels=[0]).iloc[0]
    assert "at its bound" in table["note"] and v["jstar_vs_free_offset"] == "free offset at a bound"
