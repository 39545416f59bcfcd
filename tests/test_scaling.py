"""Tests for the single fits (analysis.single_fits' fit_power_law, fit_chinchilla, holdout_error; analysis.frontier's
lower_envelope), the study table from losses.csv (analysis.scaling), and the CLI."""

import json
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis import joint_fits, optimal_loss, posterior, report, scaling, single_fits, study_stats
from analysis.frontier import lower_envelope
from analysis.scaling import fit_table
from analysis.single_fits import fit_chinchilla, fit_power_law, holdout_error

# Epoch AI's points from Hoffmann et al.'s Figure 4 (tests/data/README.md)
CHINCHILLA_CSV = Path(__file__).resolve().parent / "data" / "chinchilla_approach3_points.csv"


# ---------------------------------------------------------------------------------------------------------------
# fit_power_law on exact data
# ---------------------------------------------------------------------------------------------------------------
def test_documented_interfaces_stay_importable():
    """The single-fit functions and the exact posterior keep their documented homes (analysis.scaling,
    analysis.optimal_loss) besides the modules that define them."""
    assert scaling.fit_power_law is single_fits.fit_power_law
    assert scaling.fit_chinchilla is single_fits.fit_chinchilla
    assert optimal_loss.posterior_mean is posterior.posterior_mean


def test_pure_power_law_recovered_at_flops_scale():
    x = np.logspace(15, 19, 9)  # training FLOPs: the fit must be scale-free
    y = 0.37 * x ** -0.05
    f = fit_power_law(x, y)
    assert f["exponent"] == pytest.approx(-0.05, abs=1e-7)
    assert f["prefactor"] == pytest.approx(0.37, rel=1e-5)
    assert f["offset"] == 0.0
    assert f["rho"] == pytest.approx(1.0, abs=1e-10)
    assert f["pearson_r"] == pytest.approx(-1.0, abs=1e-10)  # decreasing: signed r is −1, ρ is its magnitude
    assert f["r2"] == pytest.approx(1.0, abs=1e-10)
    assert f["n"] == 9 and f["n_dropped"] == 0
    assert math.isnan(f["exponent_ci"][0]) and math.isnan(f["offset_ci"][1])  # no bootstrap → NaN intervals


def test_fixed_offset_power_law_recovered():
    x = np.logspace(0, 4, 10)
    y = 0.1 + 2.0 * x ** -0.5
    f = fit_power_law(x, y, offset=0.1)
    assert f["exponent"] == pytest.approx(-0.5, abs=1e-6)
    assert f["prefactor"] == pytest.approx(2.0, rel=1e-5)
    assert f["offset"] == 0.1
    assert f["rho"] == pytest.approx(1.0, abs=1e-10) and f["r2"] == pytest.approx(1.0, abs=1e-10)
    # the same data without the offset is not a power law: lower ρ, the exponent absorbs the curvature
    g = fit_power_law(x, y)
    assert g["rho"] < 0.999 and g["exponent"] > -0.5


@pytest.mark.parametrize("E, A, k, xs", [
    (1.5, 30.0, -0.3, np.logspace(1, 6, 12)),
    (0.015, 0.3675, -0.014, np.logspace(17, 22, 12)),  # the paper's total-loss fit, J = 0.3675·F^−0.014 + 0.015
])
def test_free_offset_recovers_E(E, A, k, xs):
    y = E + A * xs ** k
    f = fit_power_law(xs, y, offset="free")
    assert f["offset"] == pytest.approx(E, rel=1e-3)
    assert f["exponent"] == pytest.approx(k, rel=1e-3)
    assert f["prefactor"] == pytest.approx(A, rel=1e-2)
    assert f["rho"] == pytest.approx(1.0, abs=1e-8) and f["r2"] == pytest.approx(1.0, abs=1e-8)


# ---------------------------------------------------------------------------------------------------------------
# fit_power_law on noisy data: statistics against independent references, bootstrap coverage
# ---------------------------------------------------------------------------------------------------------------
def test_rho_and_r2_match_independent_reference():
    rng = np.random.default_rng(3)
    x = np.logspace(2, 5, 15)
    y = 0.2 + 4.0 * x ** -0.4 * np.exp(0.05 * rng.standard_normal(x.size))
    f = fit_power_law(x, y, offset=0.2)
    r_ref = np.corrcoef(np.log(x), np.log(y - 0.2))[0, 1]
    assert f["pearson_r"] == pytest.approx(r_ref, rel=1e-12)
    assert f["rho"] == pytest.approx(abs(r_ref), rel=1e-12)
    pred = 0.2 + f["prefactor"] * x ** f["exponent"]
    resid = np.log(y) - np.log(pred)
    r2_ref = 1 - np.sum(resid ** 2) / np.sum((np.log(y) - np.log(y).mean()) ** 2)
    assert f["r2"] == pytest.approx(r2_ref, rel=1e-12)
    assert 0.9 < f["rho"] < 1.0 and 0.9 < f["r2"] < 1.0


def test_bootstrap_intervals_cover_truth_and_are_seeded():
    rng = np.random.default_rng(0)
    x = np.logspace(0, 4, 25)
    y = 3.0 * x ** -0.25 * np.exp(0.03 * rng.standard_normal(x.size))
    f = fit_power_law(x, y, n_bootstrap=100, seed=1)
    lo, hi = f["exponent_ci"]
    assert lo < -0.25 < hi and hi - lo < 0.05
    lo, hi = f["prefactor_ci"]
    assert lo < 3.0 < hi
    assert lo <= f["prefactor"] <= hi
    assert f["offset_ci"] == (0.0, 0.0)  # a fixed offset has no spread
    g = fit_power_law(x, y, n_bootstrap=100, seed=1)
    assert g["exponent_ci"] == f["exponent_ci"]


def test_free_offset_bootstrap_intervals_cover_truth():
    """Basic-bootstrap intervals of the free-offset fit cover the truth in most of 40 noisy data sets (a single
    data set misses 5% of the time by design)."""
    rng = np.random.default_rng(5)
    x = np.logspace(0, 5, 30)
    hits = {"offset_ci": 0, "exponent_ci": 0, "prefactor_ci": 0}
    for i in range(40):
        y = (1.0 + 2.0 * x ** -0.5) * np.exp(0.005 * rng.standard_normal(x.size))
        f = fit_power_law(x, y, offset="free", n_bootstrap=100, seed=i)
        for key, truth in (("offset_ci", 1.0), ("exponent_ci", -0.5), ("prefactor_ci", 2.0)):
            hits[key] += f[key][0] < truth < f[key][1]
    assert all(h >= 32 for h in hits.values()), hits


# ---------------------------------------------------------------------------------------------------------------
# fit_power_law: input errors and dropping
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("x, y, kw, match", [
    ([1, 2, 3], [1, 2], {}, "same length"),
    ([1, 2], [1, 2], {}, "at least 3 points"),
    ([1, 2, np.nan], [1, 2, 3], {}, "non-finite"),
    ([1, 2, 3], [1, np.inf, 3], {}, "non-finite"),
    ([0, 2, 3], [1, 2, 3], {}, "x must be positive"),
    ([1, 2, 3, 4], [1.0, 0.5, 0.4, 0.3], {"offset": 0.45}, r"2 of 4 points have y ≤ offset \(0.45\)"),
    ([1, 2, 3, 4], [1.0, 0.5, -0.1, 0.3], {}, r"1 of 4 points have y ≤ offset \(0\)"),
    ([1, 2, 3, 4], [1.0, 0.5, -0.1, 0.3], {"offset": "free"}, r"1 of 4 points have y ≤ 0"),
    ([1, 2, 3], [1, 2, 3], {"offset": "fitted"}, "number or 'free'"),
    ([1, 2, 3], [1, 2, 3], {"offset": -1.0}, "finite and ≥ 0"),
    ([2, 2, 2], [1, 2, 3], {}, "all x values are equal"),
    ([1, 2, 3, 4], [1.0, -0.5, 0.4, 0.3], {"drop_nonpositive": True, "offset": 0.35}, "only 2 points left"),
])
def test_power_law_bad_input_errors(x, y, kw, match):
    with pytest.raises(ValueError, match=match):
        fit_power_law(x, y, **kw)


def test_drop_nonpositive_reports_dropped_and_fits_the_rest():
    x = np.logspace(0, 3, 8)
    y = 0.5 * x ** -0.6
    y_noisy = y.copy()
    y_noisy[[2, 5]] = [-1e-4, 0.0]  # an "L − J*" that noise pushed to ≤ 0
    f = fit_power_law(x, y_noisy, drop_nonpositive=True)
    assert f["n_dropped"] == 2 and f["n"] == 6
    assert f["exponent"] == pytest.approx(-0.6, abs=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# holdout_error and lower_envelope
# ---------------------------------------------------------------------------------------------------------------
def test_holdout_error_zero_on_exact_and_analytic_when_last_point_is_off():
    x = np.logspace(0, 4, 7)
    y = 0.3 + 2.0 * x ** -0.5
    assert abs(holdout_error(x, y, offset=0.3)) < 1e-6
    assert abs(holdout_error(x, y, offset="free")) < 1e-4
    y_off = y.copy()
    y_off[-1] *= 1.1  # the fit on the other six is exact, so the prediction is the original value
    assert holdout_error(x, y_off, offset=0.3) == pytest.approx(1 / 1.1 - 1, rel=1e-5)
    # shift: the error measured on (y + shift); an "L − J*" fit with J* = 1 added back
    expect = (y[-1] + 1.0) / (y_off[-1] + 1.0) - 1
    assert holdout_error(x, y_off, offset=0.3, shift=1.0) == pytest.approx(expect, rel=1e-5)
    with pytest.raises(ValueError, match="at least 4 points"):
        holdout_error(x[:3], y[:3])


def test_lower_envelope_hand_example():
    compute = np.array([1.0, 2.0, 2.0, 3.0, 4.0, 5.0, 6.0, np.nan])
    loss = np.array([5.0, 4.0, 3.5, 3.8, 3.5, 2.0, 2.5, 0.1])
    # 1→5.0 on; two runs at 2: 3.5 on, 4.0 off; 3.8 at 3 is above 3.5; 3.5 at 4 ties → off; 2.0 on; 2.5 off; NaN ignored
    idx = lower_envelope(compute, loss)
    np.testing.assert_array_equal(idx, [0, 2, 5])
    np.testing.assert_array_equal(compute[idx], [1.0, 2.0, 5.0])
    assert lower_envelope([], []).size == 0
    with pytest.raises(ValueError, match="same length"):
        lower_envelope([1, 2], [1])


# ---------------------------------------------------------------------------------------------------------------
# Chinchilla
# ---------------------------------------------------------------------------------------------------------------
def test_chinchilla_reproduces_epoch_ai_fit():
    df = pd.read_csv(CHINCHILLA_CSV)
    t0 = time.perf_counter()
    f = fit_chinchilla(df["params"], df["tokens"], df["loss"], drop_highest=5)
    elapsed = time.perf_counter() - t0
    # Besiroglu et al. 2024: E 1.817, A 477.7, B 2144, α 0.347, β 0.367
    assert f["n"] == 240
    assert f["E"] == pytest.approx(1.817, abs=0.02)
    assert f["alpha"] == pytest.approx(0.347, abs=0.01)
    assert f["beta"] == pytest.approx(0.367, abs=0.01)
    assert f["A"] == pytest.approx(477.7, rel=0.05)
    assert f["B"] == pytest.approx(2144, rel=0.05)
    assert elapsed < 30, f"Chinchilla fit took {elapsed:.1f} s"


def test_chinchilla_recovers_synthetic_law_and_bootstrap_covers():
    rng = np.random.default_rng(0)
    n = np.repeat(np.logspace(7.5, 10, 6), 6)
    d = np.tile(np.logspace(9, 11.5, 6), 6) * rng.uniform(0.8, 1.25, 36)
    truth = {"E": 1.7, "A": 400.0, "B": 1800.0, "alpha": 0.34, "beta": 0.36}
    loss = truth["E"] + truth["A"] / n ** truth["alpha"] + truth["B"] / d ** truth["beta"]
    f = fit_chinchilla(n, d, loss)  # default: 60 diverse starts of the 5400
    for k, v in truth.items():
        assert f[k] == pytest.approx(v, rel=1e-3), k
    noisy = loss * np.exp(0.003 * rng.standard_normal(loss.size))
    g = fit_chinchilla(n, d, noisy, n_bootstrap=12, seed=0)
    for k in ("E", "alpha", "beta"):
        lo, hi = g[f"{k}_ci"]
        assert lo <= g[k] <= hi and lo < truth[k] < hi, (k, g[f"{k}_ci"])


def test_profile_starts_keep_the_best_a_b_per_exponent_triple():
    grid = joint_fits.chinchilla_grid()
    assert grid.shape == (5400, 5)
    values = np.random.default_rng(0).random(len(grid))
    starts = joint_fits.profile_starts(grid, values, 150)
    # reference: group by (e, α, β) with pandas, keep each group's minimum
    df = pd.DataFrame(grid, columns=["a", "b", "e", "alpha", "beta"]).assign(v=values)
    ref = df.loc[df.groupby(["e", "alpha", "beta"])["v"].idxmin()].sort_values("v")
    np.testing.assert_array_equal(starts, ref[["a", "b", "e", "alpha", "beta"]].to_numpy())
    np.testing.assert_array_equal(joint_fits.profile_starts(grid, values, 7), starts[:7])


def test_chinchilla_drop_highest_and_errors():
    n = np.logspace(7, 9, 8)
    d = np.logspace(9, 10, 8)
    loss = 2.0 + 100 / n ** 0.3 + 50 / d ** 0.3
    with pytest.raises(ValueError, match="same length"):
        fit_chinchilla(n, d[:-1], loss)
    with pytest.raises(ValueError, match="positive"):
        fit_chinchilla(n, d, -loss)
    with pytest.raises(ValueError, match="drop_highest"):
        fit_chinchilla(n, d, loss, drop_highest=8)
    with pytest.raises(ValueError, match="at least 5 points"):
        fit_chinchilla(n, d, loss, drop_highest=4)
    f = fit_chinchilla(n, d, loss, drop_highest=3, top_k=5)
    assert f["n"] == 5


# ---------------------------------------------------------------------------------------------------------------
# fit_table, exponents_markdown, CLI
# ---------------------------------------------------------------------------------------------------------------
SIGMAS = (0.1, 1.0)
JSTAR = {0.1: 0.002, 1.0: 0.09, None: 0.03}  # None = total row


def _synthetic_losses(with_excess=True) -> pd.DataFrame:
    """Four models × five snapshots; every run's excess is exactly c·F^−0.3, so L − J* is a power law in compute.

    All models see the same images at the last snapshot, so the final-snapshot excess is a power law in params too.
    """
    rows = []
    for m, params in enumerate([1e5, 3e5, 1e6, 3e6]):
        for images in (2e4, 5e4, 1e5, 2e5, 4e5):
            flops = 6 * params * images
            for s in list(SIGMAS) + [None]:
                c = {0.1: 50.0, 1.0: 200.0, None: 100.0}[s]
                excess = c * flops ** -0.3
                rows.append({"model": f"m{m}", "params": params, "images_seen": images, "flops": flops,
                             "sigma": np.nan if s is None else s, "loss": JSTAR[s] + excess, "loss_stderr": 1e-4,
                             "optimal_loss": JSTAR[s], "optimal_loss_stderr": 1e-5,
                             "excess": excess if with_excess else np.nan, "excess_stderr": 1e-5})
    return pd.DataFrame(rows)


def test_fit_table_rows_and_values():
    table = fit_table(_synthetic_losses())
    assert list(table.columns) == study_stats.TABLE_COLUMNS
    assert len(table) == 4 * 2 * 3  # quantities × axes × (total + 2 σ)
    keys = set(zip(table["quantity"], table["axis"], table["sigma"].fillna(-1.0)))
    assert keys == {(q, a, s) for q in study_stats.QUANTITIES for a in study_stats.AXES for s in (-1.0, 0.1, 1.0)}
    mj = table[table["quantity"].isin(["minus_jstar", "excess"])]
    np.testing.assert_allclose(mj["exponent"], -0.3, atol=1e-9)
    np.testing.assert_allclose(mj["rho"], 1.0, atol=1e-9)
    np.testing.assert_allclose(mj["extrapolation_error"], 0.0, atol=1e-9)
    free = table[table["quantity"] == "free_offset"]
    np.testing.assert_allclose(free["offset"], free["optimal_loss"], rtol=1e-3)  # the free offset finds J*
    np.testing.assert_allclose(free["exponent"], -0.3, atol=1e-3)
    raw = table[table["quantity"] == "raw"].set_index(["axis", "sigma"])
    mjs = table[table["quantity"] == "minus_jstar"].set_index(["axis", "sigma"])
    assert (raw["rho"] < mjs["rho"]).all()  # L is not a power law; L − J* is
    assert (raw["extrapolation_error"] > mjs["extrapolation_error"]).all()
    # compute axis: one frontier chosen on the total loss (every distinct compute value once: runs at equal
    # compute tie and only the lower loss counts); params axis: one point per model
    n_distinct_flops = _synthetic_losses()["flops"].nunique()
    assert n_distinct_flops == 18
    assert (table.loc[table["axis"] == "compute", "n"] == n_distinct_flops).all()
    assert (table.loc[table["axis"] == "params", "n"] == 4).all()
    assert (table["n_nonpositive"] == 0).all()
    tot = table[table["sigma"].isna() & (table["quantity"] == "minus_jstar") & (table["axis"] == "compute")]
    assert tot["prefactor"].iloc[0] == pytest.approx(100.0, rel=1e-9)


def test_fit_table_one_frontier_for_every_sigma_and_missing_excess():
    df = _synthetic_losses(with_excess=False)
    # the smallest model's last snapshot gets worse in its total only: it leaves the frontier of every σ
    worse = (df["model"] == "m0") & (df["images_seen"] == 4e5) & df["sigma"].isna()
    df.loc[worse, "loss"] += 1.0
    table = fit_table(df, axes=("compute",))
    raw = table[table["quantity"] == "raw"]
    assert (raw["n"] == 17).all()  # the same 17 points at σ = 0.1, 1 and for the total
    ex = table[table["quantity"] == "excess"]
    assert (ex["note"] == "no excess column").all() and ex["exponent"].isna().all()


def test_fit_table_errors_and_too_few_points():
    with pytest.raises(ValueError, match="missing columns.*optimal_loss"):
        fit_table(_synthetic_losses().drop(columns=["optimal_loss"]))
    with pytest.raises(ValueError, match="unknown quantity"):
        fit_table(_synthetic_losses(), quantities=("bogus",))
    mixed = _synthetic_losses().assign(weighting="training")
    mixed.loc[mixed.index[-1], "weighting"] = "uniform"  # the last row is a total row
    with pytest.raises(ValueError, match="several weightings"):
        fit_table(mixed)
    df = _synthetic_losses()
    df = df[df["model"].isin(["m0", "m1"])]  # two models: a params fit has 2 points
    table = fit_table(df, axes=("params",), quantities=("raw",))
    assert table["exponent"].isna().all() and table["note"].str.contains("need ≥ 3").all()


def test_fit_table_names_points_at_or_below_jstar():
    df = _synthetic_losses()
    sel = (df["sigma"] == 0.1) & (df["model"] == "m3") & (df["images_seen"] == 4e5)
    df.loc[sel, "loss"] = JSTAR[0.1] - 1e-4  # noise pushed one frontier point below J*
    table = fit_table(df, axes=("compute",), quantities=("minus_jstar",))
    row = table[table["sigma"] == 0.1].iloc[0]
    assert row["n_nonpositive"] == 1 and np.isnan(row["exponent"]) and "y ≤ offset" in row["note"]


def test_study_outputs_and_markdown_without_replicates(tmp_path):
    out = scaling.study_outputs(_synthetic_losses(), None, tmp_path)
    for name in scaling.STUDY_OUTPUTS:
        assert (tmp_path / name).is_file()
    md = out["exponents.md"]
    assert md.startswith("# Scaling exponents and the verdict on L − J*")
    assert "No intervals" in md and "L/(L − J*)" in md
    verdict = pd.read_csv(tmp_path / "verdict.csv")
    assert {"delta_rho", "delta_rho_ci_lo", "delta_rho_ci_hi"} <= set(verdict.columns)
    assert (verdict["delta_rho"] > 0).all() and (verdict["verdict_rho"] == "no interval").all()
    co = pd.read_csv(tmp_path / "compute_optimal.csv")
    assert list(co["floor"]) == ["jstar", "free"]
    assert {"n_opt_exponent", "d_opt_exponent", "n_opt_exponent_ci_lo", "d_opt_exponent_ci_hi"} <= set(co.columns)


def test_cli_writes_the_analysis_folder(tmp_path, capsys):
    losses = tmp_path / "losses.csv"
    df = _synthetic_losses()
    df[df["sigma"].isna()].to_csv(losses, index=False)  # totals only: keeps the test quick
    out = tmp_path / "a"
    assert scaling.main(["--losses", str(losses), "--out-dir", str(out)]) == 0
    back = pd.read_csv(out / "exponents.csv")
    assert len(back) == 8 and set(back["quantity"]) == set(study_stats.QUANTITIES) and back["sigma"].isna().all()
    md = (out / "exponents.md").read_text()
    assert "## L − J* against L" in md and "## The verdict by forecasting" in md
    with pytest.raises(SystemExit):
        scaling.main(["--losses", str(tmp_path / "nope.csv"), "--out-dir", str(out)])
    assert "not found" in capsys.readouterr().err


def test_cli_chinchilla_prints_fit(tmp_path, capsys):
    n = np.repeat(np.logspace(7.5, 10, 4), 4)
    d = np.tile(np.logspace(9, 11.5, 4), 4)
    loss = 1.7 + 400.0 / n ** 0.34 + 1800.0 / d ** 0.36
    csv = tmp_path / "pts.csv"
    pd.DataFrame({"params": n, "tokens": d, "loss": np.r_[loss[:-1], 9.0]}).to_csv(csv, index=False)
    assert scaling.main(["chinchilla", "--csv", str(csv), "--drop-highest", "1"]) == 0
    out = capsys.readouterr().out
    assert "15 points" in out and "E     = 1.7" in out and "alpha = 0.34" in out


def test_cli_averages_the_seed_runs_named_in_models_json(tmp_path, capsys):
    """A run that models.json names a seed of another size is averaged with it: the study has the sizes, not the
    runs (the params axis fits one point per size)."""
    df = _synthetic_losses()
    df = df[df["sigma"].isna()]
    seed = df[df["model"] == "m1"].assign(model="m1_s1", loss=lambda t: t["loss"] * 1.01)
    losses = tmp_path / "losses.csv"
    pd.concat([df, seed]).to_csv(losses, index=False)
    models = tmp_path / "models.json"
    models.write_text(json.dumps({m: {"size": "m1" if m == "m1_s1" else m} for m in ("m0", "m1", "m1_s1", "m2", "m3")}))
    out = tmp_path / "a"
    assert scaling.main(["--losses", str(losses), "--models", str(models), "--out-dir", str(out)]) == 0
    ex = pd.read_csv(out / "exponents.csv")
    assert (ex.loc[ex["axis"] == "params", "n"] == 4).all()
    with pytest.raises(SystemExit):
        scaling.main(["--losses", str(losses), "--models", str(tmp_path / "no.json"), "--out-dir", str(out)])
    assert "--models file not found" in capsys.readouterr().err
    models.write_text("[1, 2]")
    with pytest.raises(SystemExit):
        scaling.main(["--losses", str(losses), "--models", str(models), "--out-dir", str(out)])
    assert f"--models {models} is not a model table" in capsys.readouterr().err


def _ema_exponents(fixed_sigma_rel=0.05) -> pd.DataFrame:
    """An ema_exponents.csv (analysis.ema_sweep's columns) whose every number is distinct and known."""
    rows = []
    for quantity, at_fixed, at_best in (("raw", -0.25, -0.3), ("minus_jstar", -0.4, -0.55)):
        for ema, k in (("fixed", at_fixed), ("best", at_best), ("best - fixed", at_best - at_fixed)):
            rows.append({"quantity": quantity, "ema": ema, "fixed_sigma_rel": fixed_sigma_rel, "exponent": k,
                         "ci_lo": k - 0.01, "ci_hi": k + 0.02, "n_models": 4})
    return pd.DataFrame(rows)


def test_cli_states_the_ema_and_sets_the_sweep_exponents_beside(tmp_path, capsys):
    """exponents.csv's `ema` column and exponents.md's opening say at which EMA the fits stand (models.json's
    `ema`); with an EMA sweep's ema_exponents.csv, exponents.md sets the best length's exponents beside the fixed
    one's, with the difference and its interval; a bad ema_exponents.csv is one error and writes nothing."""
    from study.spec import ema_label

    losses = tmp_path / "losses.csv"
    df = _synthetic_losses()
    df[df["sigma"].isna()].to_csv(losses, index=False)  # totals only: keeps the test quick
    label = ema_label({"ema": {"kind": "power", "sigma_rel": [0.05, 0.1]}, "ema_halflife_images": 2000})
    assert label == "power σ_rel=0.05"
    models = tmp_path / "models.json"
    models.write_text(json.dumps({f"m{i}": {"size": f"m{i}", "ema": label} for i in range(4)}))
    sweep = tmp_path / "ema_exponents.csv"
    _ema_exponents().to_csv(sweep, index=False)
    out = tmp_path / "a"
    assert scaling.main(["--losses", str(losses), "--models", str(models), "--out-dir", str(out),
                         "--ema-exponents", str(sweep)]) == 0
    ex = pd.read_csv(out / "exponents.csv")
    assert ex.columns[-1] == "ema" and (ex["ema"] == "power σ_rel=0.05").all()
    md = (out / "exponents.md").read_text()
    assert "EMA: every fit below stands at the snapshots' own EMA weights — power σ_rel=0.05." in md
    assert md.index("EMA: every fit") < md.index("Fits of log(y − c)")  # the header, before the fits
    section = md[md.index("## Exponents at each model's best EMA length"):]
    assert md.index("## Total-loss fits") < md.index("## Exponents at each model's best EMA length")
    assert "| quantity | at σ_rel 0.05 | at each model's best | best − fixed |" in section
    assert "| L | -0.2500 [-0.2600, -0.2300] | -0.3000 [-0.3100, -0.2800] | -0.0500 [-0.0600, -0.0300] |" in section
    assert "| L − J* | -0.4000 [-0.4100, -0.3800] | -0.5500 [-0.5600, -0.5300] | -0.1500 [-0.1600, -0.1300] |" \
        in section
    # no sweep: no section; no models.json: the EMA is "unknown", not guessed
    plain = tmp_path / "plain"
    assert scaling.main(["--losses", str(losses), "--out-dir", str(plain)]) == 0
    md = (plain / "exponents.md").read_text()
    assert "best EMA length" not in md and "own EMA weights — unknown." in md
    assert (pd.read_csv(plain / "exponents.csv")["ema"] == "unknown").all()
    # a table missing a row: one error naming the file and the row, nothing written
    _ema_exponents().iloc[:-1].to_csv(sweep, index=False)
    bad = tmp_path / "bad"
    assert scaling.main(["--losses", str(losses), "--out-dir", str(bad), "--ema-exponents", str(sweep)]) == 2
    err = capsys.readouterr().err
    assert str(sweep) in err and "('minus_jstar', 'best - fixed')" in err and not bad.exists()
    # fewer than two models: the sweep writes an empty table, and the section says why there are no exponents
    empty = report.ema_sweep_section(_ema_exponents().iloc[:0])
    assert "Fewer than two models" in "\n".join(empty)
