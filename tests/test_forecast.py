"""Tests for analysis/forecast.py: the rolling-origin splits, exact forecasts of an exact law, the misfit's error model
against a brute-force likelihood, the tables, and the verdict picking the true floor on simulated studies."""

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from scipy.optimize import minimize

from analysis import forecast as fc
from analysis import study_stats as st
from analysis.resample import StudyReplicates, replicates
from tests.study_sim import simulate, simulated_studies, study_shape


def _exact_study(n_sizes=6, floor=0.15, A=40.0, B=90.0, a=0.35, b=0.45) -> StudyReplicates:
    """A one-row study whose total loss is exactly J* + A/N^a + B/D^b (J* = floor)."""
    model, _, params, images = study_shape(n_sizes, 4)
    total = floor + A / params ** a + B / images ** b
    snaps = pd.DataFrame({"model": model, "params": params, "images_seen": images, "flops": 6 * params * images})
    loss = np.repeat(total[None, :, None], 2, axis=2)
    return StudyReplicates(snaps, np.array([1.0]), loss, np.full(loss.shape, floor), loss - floor)


def test_splits_are_rolling_origin_by_parameters():
    snaps = pd.DataFrame({"model": ["b", "a", "d", "c", "e"], "params": [2, 1, 4, 3, 5]})
    assert fc.splits(snaps) == [(3, ["a", "b", "c"], "d"), (4, ["a", "b", "c", "d"], "e")]
    assert fc.splits(snaps.iloc[:3]) == []


def test_an_exact_joint_law_forecasts_every_held_out_snapshot_exactly():
    bt = fc.Backtest(st.StudyFits(_exact_study()))
    assert len(bt.splits) == 3
    for j in range(3):
        for points in fc.POINTS:
            assert bt.errors[("joint_floor_jstar", points, j)][0] < 1e-6
            assert bt.errors[("joint_floor_free", points, j)][0] < 1e-4     # the free floor finds J*
        assert bt.errors[("pure_L", "frontier", j)][0] > 1e-2               # L itself is no power law
        assert bt.n_points[("joint_floor_jstar", "all", j)] == 4
    assert bt.mean_error("joint_floor_0", "all")[0] > 10 * bt.mean_error("joint_floor_jstar", "all")[0]
    # the estimate's predictions are kept for the figure: every held-out snapshot of every law
    assert len(bt.predictions) == 3 * 4 * len(fc.LAWS)


def test_misfit_likelihood_is_the_maximum_of_the_gaussian_model_likelihood():
    """Profiled closed form against scipy's multivariate normal density maximised over (sd_model, sd_snapshot)."""
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(6), [4, 4, 3, 4, 1, 4])
    r = 0.02 * rng.standard_normal(6)[groups] + 0.01 * rng.standard_normal(groups.size)
    got = fc.misfit_likelihood(r, groups)
    z = (groups[:, None] == groups[None, :]).astype(float)

    def neg(t):
        cov = math.exp(2 * t[0]) * z + math.exp(2 * t[1]) * np.eye(groups.size)
        return -stats.multivariate_normal(np.zeros(groups.size), cov).logpdf(r)

    ref = minimize(neg, np.log([0.02, 0.01]), method="Nelder-Mead", options={"xatol": 1e-10, "fatol": 1e-12})
    assert got["log_likelihood"] == pytest.approx(-ref.fun, abs=1e-6)
    assert (got["sd_model"], got["sd_snapshot"]) == pytest.approx(tuple(np.exp(ref.x)), rel=1e-3)
    # no shared part in the residuals: the model effect goes to 0 and the rest is the plain ML variance
    iid = fc.misfit_likelihood(np.array([0.1, -0.1, 0.1, -0.1]), np.array([0, 0, 1, 1]))
    assert iid["sd_model"] == 0.0 and iid["sd_snapshot"] == pytest.approx(0.1)


def test_forecast_tables_on_a_simulated_study(tmp_path):
    pt, truth = simulate(np.random.default_rng(1), per_sigma=32)
    out = fc.forecast_tables(st.StudyFits(replicates(pt, 30, seed=0)))
    table = out["forecast.csv"]
    assert list(table.columns) == fc.FORECAST_COLUMNS
    assert {"law", "split", "held_out_model", "error", "error_ci_lo", "error_ci_hi"} <= set(table.columns)
    # every law on the frontier points, the joint laws also on every held-out snapshot; 3 splits + their mean
    assert len(table) == (len(fc.LAWS) + len(fc.JOINT)) * 4
    assert set(table["held_out_model"]) == {"t3", "t4", "t5", ""}
    mean = table[table["split"] == "mean"]
    assert (mean["error_ci_lo"] <= mean["error_eval_ci_lo"] + 1e-12).all()   # the total holds the evaluation part
    assert (mean["error_ci_lo"] >= 0).all() and mean["error"].notna().all()
    pairs = out["forecast_pairs.csv"]
    assert len(pairs) == 15 + 3 and set(pairs["points"]) == {"frontier", "all"}
    assert len(out["verdict"]) == 2 and "forecasts best" in out["verdict"][0]
    info = out["information.csv"]
    assert list(info["law"]) == list(fc.LAWS) and (info.groupby("data")["delta_aicc"].min() == 0).all()
    points = out["forecast_points.csv"]
    assert set(points["law"]) == set(fc.LAWS) and (points["actual"] > 0).all()


def test_no_forecast_below_four_sizes():
    pt, _ = simulate(np.random.default_rng(2), n_sizes=3, n_snapshots=2, per_sigma=8)
    out = fc.forecast_tables(st.StudyFits(replicates(pt, 10, seed=0)))
    assert out["forecast.csv"]["note"].str.contains("needs ≥ 4 model sizes").all()
    assert out["verdict"] == ["No forecast: needs ≥ 4 model sizes."]


# Which floor do the forecasts and the information criterion pick? On studies of 8 sizes whose only misfit is the
# floor (exponent a = 0.8, so the largest sizes come close to it, and seed offsets of 1%), 40 per floor; the pick
# is right in ≥ 80% of them (binomial sd at 90% and n = 40: 4.7%).
FLOOR_STUDY = dict(n_sizes=8, a=0.8, curvature=0.0, undertrained=0.0, run_sd=0.01, snapshot_sd=0.003, per_sigma=64)
N_FLOOR_STUDIES = 40


@pytest.mark.slow
@pytest.mark.parametrize("floor_above, true_law", [(0.0, "joint_floor_jstar"), (2.0, "joint_floor_free")])
def test_the_verdict_picks_the_true_floor(floor_above, true_law):
    reps, _ = simulated_studies(20 + int(floor_above), N_FLOOR_STUDIES, 0, jackknife=False, floor_above=floor_above,
                                **FLOOR_STUDY)
    fits = st.StudyFits(reps)
    bt = fc.Backtest(fits)
    errors = np.stack([bt.mean_error(law, "all") for law in fc.JOINT])          # one row per study
    forecast_picks = np.array(fc.JOINT)[np.argmin(errors, axis=0)]
    ic_picks = []
    for row in range(N_FLOOR_STUDIES):
        info = fc.information_table(fits, row=row)
        joint = info[info["data"] == "every snapshot"]
        ic_picks.append(joint.loc[joint["aicc"].idxmin(), "law"])
    assert np.mean(forecast_picks == true_law) >= 0.8, dict(zip(*np.unique(forecast_picks, return_counts=True)))
    assert np.mean(np.array(ic_picks) == true_law) >= 0.8, dict(zip(*np.unique(ic_picks, return_counts=True)))
