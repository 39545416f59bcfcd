"""Tests for fitting a law to any table (analysis.fit_law): the Chinchilla reproduction through the new path, column
mapping and errors of the command, runs resampled whole, interval coverage on simulated ladders whose checkpoints
share a run offset, predictions, bounds, rolling origin."""

import io
import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis import fit_law as fl
from analysis import law_intervals as li
from analysis import table_law as tl
from analysis.forecast import splits
from analysis.single_fits import fit_chinchilla

CHINCHILLA_CSV = Path(__file__).resolve().parent / "data" / "chinchilla_approach3_points.csv"
FIVE = ("E", "A", "B", "alpha", "beta")


def chinchilla_law(n, d, E=1.8, A=480.0, B=2100.0, alpha=0.35, beta=0.37):
    return E + A / np.asarray(n) ** alpha + B / np.asarray(d) ** beta


# ---------------------------------------------------------------------------------------------------------------
# the Chinchilla points through the new command, with other column names
# ---------------------------------------------------------------------------------------------------------------
def test_fit_law_reproduces_fit_chinchilla_exactly():
    df = pd.read_csv(CHINCHILLA_CSV)
    ref = fit_chinchilla(df["params"], df["tokens"], df["loss"], drop_highest=5)
    f = tl.fit_law(df["params"], df["loss"], df["tokens"], drop_highest=5, n_bootstrap=0, leave_one_out=False)
    est = f.parameters.set_index("parameter")["estimate"]
    for k in FIVE:
        assert est[k] == ref[k], k                     # the same points, starts and solver: the same floats
    assert f.n_points == 240 and f.objective == ref["huber_loss"]


def test_cli_renamed_columns_fit_and_predict_in_one_command(tmp_path, monkeypatch, capsys):
    """The README's example: the Chinchilla points with columns renamed, read from standard input, fitted and
    predicted in one command; the files hold full precision and the prediction is the law at that point."""
    text = CHINCHILLA_CSV.read_text().replace("params,training_flops,tokens,loss", "N,C,D,L", 1)
    monkeypatch.setattr(sys, "stdin", io.StringIO(text))
    out = tmp_path / "fit"
    argv = ["-", "--params", "N", "--tokens", "D", "--loss", "L", "--drop-highest", "5", "--predict", "70e9,1.4e12",
            "--n-bootstrap", "20", "--no-leave-one-out", "--out", str(out)]
    assert fl.main(argv) == 0
    printed = capsys.readouterr().out
    assert "L(N=7e+10, D=1.4e+12) = " in printed and "wrote" in printed
    df = pd.read_csv(CHINCHILLA_CSV)
    ref = fit_chinchilla(df["params"], df["tokens"], df["loss"], drop_highest=5)
    params = pd.read_csv(out / "parameters.csv").set_index("parameter")
    for k in FIVE:
        assert params.loc[k, "estimate"] == ref[k], k   # round-trips to the last bit
        assert params.loc[k, "ci_lo"] <= ref[k] <= params.loc[k, "ci_hi"]
    pred = pd.read_csv(out / "predictions.csv").iloc[0]
    expect = ref["E"] + ref["A"] / 70e9 ** ref["alpha"] + ref["B"] / 1.4e12 ** ref["beta"]
    assert pred["predicted"] == pytest.approx(expect, rel=1e-12)
    assert pred["pi_lo"] <= pred["ci_lo"] < expect < pred["ci_hi"] <= pred["pi_hi"]
    summary = json.loads((out / "fit.json").read_text())
    assert summary["parameters"][0]["estimate"] == ref["E"] and summary["n_bootstrap"] == 20
    assert len(pd.read_csv(out / "draws.csv")) == 21


@pytest.mark.parametrize("argv, message", [
    (["{csv}", "--params", "N"], "has no column 'N' (--params)"),
    (["{csv}", "--run", "seed"], "has no column 'seed' (--run)"),
    (["{csv}", "--floor", "J"], "has no column 'J' (--floor)"),
    (["{bad}"], "column 'loss' (--loss): 2 values are not positive numbers (first on line 3: abc)"),
    (["{bad}", "--loss", "tokens", "--tokens", "loss"], "column 'loss' (--tokens): 2 values are not positive"),
    (["{csv}", "--predict", "7e9"], "--predict '7e9': expected N,D"),
    (["{csv}", "--floor", "-1"], "--floor '-1': a fixed floor must be a finite number ≥ 0"),
    (["{csv}", "--floor", "3"], "the floor (3) is not below every loss"),
    (["{csv}", "--rows", "final"], "--rows final needs --run"),
    (["{csv}", "--law", "n", "--huber-delta", "0.01"], "takes no huber_delta"),
    (["{csv}", "--starts", "grid"], "starts must be 'epoch'"),
    (["{dir}/none.csv"], "table file not found"),
    (["{csv}", "--predict-file", "{dir}/none.csv"], "table file not found"),
])
def test_cli_bad_input_is_one_line_naming_it(tmp_path, capsys, argv, message):
    n = np.repeat([1e7, 1e8, 1e9], 3)
    d = np.tile([1e9, 1e10, 1e11], 3)
    good = pd.DataFrame({"params": n, "tokens": d, "loss": chinchilla_law(n, d)})
    good.to_csv(tmp_path / "t.csv", index=False)
    bad = good.astype({"loss": object})
    bad.loc[1, "loss"], bad.loc[4, "loss"] = "abc", ""
    bad.to_csv(tmp_path / "bad.csv", index=False)
    args = [a.format(csv=tmp_path / "t.csv", bad=tmp_path / "bad.csv", dir=tmp_path) for a in argv]
    assert fl.main(args + ["--n-bootstrap", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ") and message in err, err


# ---------------------------------------------------------------------------------------------------------------
# resampling whole runs
# ---------------------------------------------------------------------------------------------------------------
def test_resampling_moves_a_runs_rows_together():
    runs = np.array(["a", "a", "b", "c", "c", "c", "d"])
    rs = li.resampling(runs, 50, seed=3)
    assert list(rs.kind[:2]) == ["estimate", "bootstrap"] and (rs.weights[0] == 1).all()
    boot = rs.weights[rs.kind == "bootstrap"]
    for r in "abcd":
        cols = boot[:, runs == r]
        assert (cols == cols[:, :1]).all()                      # every row of a run has its run's multiplicity
    per_run = np.stack([boot[:, np.flatnonzero(runs == r)[0]] for r in "abcd"], axis=1)
    assert (per_run.sum(axis=1) == 4).all()                    # four runs drawn with replacement
    loo = rs.weights[rs.kind == "leave_one_out"]
    assert list(rs.left_out[rs.kind == "leave_one_out"]) == list("abcd")
    np.testing.assert_array_equal(loo, (runs[None, :] != np.array(list("abcd"))[:, None]).astype(float))


def test_final_rows_takes_each_runs_most_tokens():
    runs = np.array(["a", "b", "a", "b", "a", "c"])
    tokens = np.array([3.0, 5.0, 9.0, 1.0, 9.0, 2.0])          # run a's 9 appears twice: the later row counts
    np.testing.assert_array_equal(li.final_rows(runs, tokens), [False, True, False, False, True, True])


def test_rows_final_fits_only_the_final_rows():
    rng = np.random.default_rng(0)
    n, d, run, loss = _ladder(rng)
    a = tl.fit_law(n, loss, d, runs=run, rows="final", huber_delta=None, starts=_TRUTH_START, n_bootstrap=0)
    last = li.final_rows(run, d)
    b = tl.fit_law(n[last], loss[last], d[last], runs=run[last], huber_delta=None, starts=_TRUTH_START,
                   n_bootstrap=0)
    assert a.n_points == b.n_points == a.n_units == 24
    pd.testing.assert_frame_equal(a.parameters, b.parameters)


# ---------------------------------------------------------------------------------------------------------------
# coverage on simulated ladders: checkpoints of a run share its offset
# ---------------------------------------------------------------------------------------------------------------
TRUTH = {"E": 1.8, "A": 480.0, "B": 2100.0, "alpha": 0.35, "beta": 0.37}
_TRUTH_START = [[math.log(TRUTH["A"]), math.log(TRUTH["B"]), math.log(TRUTH["E"]), TRUTH["alpha"], TRUTH["beta"]]]
SIZES, MULTIPLES, CHECKPOINTS = np.logspace(7, 9, 8), (1, 4, 16), 6
RUN_SD, ROW_SD = 0.01, 0.002                  # log offsets: a run's (shared by its checkpoints), a checkpoint's
HELD_OUT = np.array([[4e9, 20 * 4e9 * m] for m in MULTIPLES])   # new runs 4× the largest size


def _ladder(rng):
    """8 sizes × 3 token multiples = 24 runs, 6 checkpoints each; log L = log law + run offset + checkpoint noise."""
    n, d, run = [], [], []
    for g, (size, m) in enumerate((s, m) for s in SIZES for m in MULTIPLES):
        for frac in np.arange(1, CHECKPOINTS + 1) / CHECKPOINTS:
            n.append(size), d.append(20 * size * m * frac), run.append(g)
    n, d, run = np.array(n), np.array(d), np.array(run)
    offset = rng.normal(0, RUN_SD, run.max() + 1)
    return n, d, run, chinchilla_law(n, d) * np.exp(offset[run] + rng.normal(0, ROW_SD, n.size))


def _coverage(by_runs: bool, n_ladders: int) -> dict:
    """Fraction of ladders whose interval holds the truth (E, α, β, the law at the held-out points) and of held-out
    runs inside their prediction interval. Least squares and the true start keep it fast; resampling is the point."""
    rng = np.random.default_rng(7)
    hits = {k: [] for k in ("E", "alpha", "beta", "law", "new_run")}
    for i in range(n_ladders):
        n, d, run, loss = _ladder(rng)
        new = chinchilla_law(*HELD_OUT.T) * np.exp(rng.normal(0, RUN_SD, 3) + rng.normal(0, ROW_SD, 3))
        f = tl.fit_law(n, loss, d, runs=run if by_runs else None, huber_delta=None, starts=_TRUTH_START,
                       n_bootstrap=100, leave_one_out=False, seed=i, predict=HELD_OUT, actual=new)
        p = f.parameters.set_index("parameter")
        for k in ("E", "alpha", "beta"):
            hits[k].append(p.loc[k, "ci_lo"] <= TRUTH[k] <= p.loc[k, "ci_hi"])
        pr = f.predictions
        truth = chinchilla_law(*HELD_OUT.T)
        hits["law"] += list((pr["ci_lo"] <= truth) & (truth <= pr["ci_hi"]))
        hits["new_run"] += list(pr["in_pi"].astype(bool))
    return {k: float(np.mean(v)) for k, v in hits.items()}


@pytest.fixture(scope="module")
def coverage():
    return {"runs": _coverage(True, 80), "rows": _coverage(False, 30)}


def test_run_resampling_covers_and_row_resampling_does_not(coverage):
    """Resampling whole runs covers the parameters ≥ 90%; treating checkpoints as independent points does not."""
    runs, rows = coverage["runs"], coverage["rows"]
    params = [runs[k] for k in ("E", "alpha", "beta")]
    assert np.mean(params) >= 0.9 and min(params) >= 0.85, runs
    assert max(rows[k] for k in ("E", "alpha", "beta")) <= 0.75, rows


def test_prediction_intervals_cover_held_out_runs(coverage):
    """The law's interval at the held-out size and a new run's interval (law + a run's residual) cover ≥ 90% with
    runs resampled; with rows resampled the law's interval is far too narrow."""
    runs, rows = coverage["runs"], coverage["rows"]
    assert runs["law"] >= 0.9 and runs["new_run"] >= 0.9, runs
    assert rows["law"] <= 0.75 and rows["new_run"] <= 0.85, rows


# ---------------------------------------------------------------------------------------------------------------
# bounds, the law in N alone, predictions from a file, rolling origin
# ---------------------------------------------------------------------------------------------------------------
def test_floor_at_zero_is_reported_at_bound_not_as_a_tiny_number(tmp_path, capsys):
    """Data of a law without a floor: the free floor is 0 on the estimate and on most resamples, and is printed
    and written as 'at bound' with the interval's lower end exactly 0 (the bound of log E is e^−50 ≈ 2e−22)."""
    rng = np.random.default_rng(1)
    n = np.repeat(np.logspace(7, 9, 5), 4)
    d = np.tile(np.logspace(9, 11, 4), 5)
    loss = chinchilla_law(n, d, E=0.0) * np.exp(rng.normal(0, 0.002, n.size))
    pd.DataFrame({"N": n, "D": d, "L": loss}).to_csv(tmp_path / "t.csv", index=False)
    assert fl.main([str(tmp_path / "t.csv"), "--params", "N", "--tokens", "D", "--loss", "L", "--huber-delta",
                    "none", "--n-bootstrap", "40", "--starts", "study", "--out", str(tmp_path / "o")]) == 0
    e_line = next(line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("E "))
    assert "0 (at bound)   [0 (at bound)," in e_line, e_line
    p = pd.read_csv(tmp_path / "o" / "parameters.csv").set_index("parameter")
    assert p.loc["E", "estimate"] == 0.0 and p.loc["E", "ci_lo"] == 0.0
    assert p.loc["E", "at_bound"].startswith("estimate at 0; ci_lo at 0")
    draws = pd.read_csv(tmp_path / "o" / "draws.csv")
    assert (draws["E"] == 0).mean() > 0.5 and not draws["E"].between(1e-300, 1e-12).any()   # never a 2e−22
    assert p.loc["alpha", "at_bound"] != p.loc["alpha", "at_bound"]  # NaN: an exponent inside its range


@pytest.mark.parametrize("floor", [0.5, "column", "free"])
def test_law_in_n_recovers_an_exact_law_and_predicts_it(floor):
    n = np.logspace(6, 9, 12)
    loss = 0.5 + 3.0 * n ** -0.3
    fl_arg = np.full(n.size, 0.5) if floor == "column" else floor
    f = tl.fit_law(n, loss, law="n", floor=fl_arg, n_bootstrap=30, predict=[1e10, 1e12])
    p = f.parameters.set_index("parameter")
    tol = 1e-9 if floor != "free" else 2e-3              # a free floor by enumeration of the exponent
    assert p.loc["E", "estimate"] == pytest.approx(0.5, rel=tol)
    assert p.loc["A", "estimate"] == pytest.approx(3.0, rel=10 * tol)
    assert p.loc["alpha", "estimate"] == pytest.approx(0.3, rel=tol)
    np.testing.assert_allclose(f.predictions["predicted"], 0.5 + 3.0 * np.array([1e10, 1e12]) ** -0.3, rtol=tol)
    assert (p.loc["E", "note"] == "fixed") == (floor == 0.5)


def test_predict_file_scores_each_point(tmp_path):
    n = np.repeat(np.logspace(7, 9, 5), 4)
    d = np.tile(np.logspace(9, 11, 4), 5)
    pd.DataFrame({"params": n, "tokens": d, "loss": chinchilla_law(n, d)}).to_csv(tmp_path / "t.csv", index=False)
    held = pd.DataFrame({"params": [3e9, 3e9], "tokens": [1e11, 1e12]})
    held["loss"] = chinchilla_law(held["params"], held["tokens"]) * np.array([1.0, 1.5])   # the second is off
    held.to_csv(tmp_path / "held.csv", index=False)
    assert fl.main([str(tmp_path / "t.csv"), "--huber-delta", "none", "--floor", "1.8", "--n-bootstrap", "20",
                    "--predict-file", str(tmp_path / "held.csv"), "--out", str(tmp_path / "o")]) == 0
    pred = pd.read_csv(tmp_path / "o" / "predictions.csv")
    np.testing.assert_allclose(pred["log_error"], [0.0, -math.log(1.5)], atol=1e-8)
    assert list(pred["in_pi"]) == [True, False]


def test_rolling_origin_uses_the_studys_splits_and_is_exact_on_an_exact_law(tmp_path):
    n = np.repeat(np.logspace(7, 9.5, 6), 3)
    d = np.tile([1e9, 1e10, 1e11], 6)
    loss = chinchilla_law(n, d)
    table = tl.rolling_origin(n, loss, d, floor=1.8, last=None, huber_delta=None, n_bootstrap=10, starts="study")
    expect = splits(pd.DataFrame({"model": n, "params": n}))
    assert sorted(table["n_train_sizes"].unique()) == [k for k, _, _ in expect] == [3, 4, 5]
    np.testing.assert_allclose(table["held_out_params"], np.repeat([n[9], n[12], n[15]], 3), rtol=1e-5)
    np.testing.assert_allclose(table["log_error"], 0.0, atol=1e-7)
    assert (table["train_max_params"] < table["held_out_params"]).all()
    with pytest.raises(ValueError, match="at least 4 distinct params"):
        tl.rolling_origin(n[:9], loss[:9], d[:9], floor=1.8)


def test_chinchilla_command_floor_at_bound_prints_zero(tmp_path, capsys):
    """`analysis.scaling chinchilla` on data without a floor: the bootstrap floors at the bound of log E are 0, so
    the interval starts at 0 (at bound), not at e^−50 ≈ 2e−22."""
    from analysis import scaling

    rng = np.random.default_rng(1)
    n = np.repeat(np.logspace(7, 9, 5), 4)
    d = np.tile(np.logspace(9, 11, 4), 5)
    loss = chinchilla_law(n, d, E=0.0) * np.exp(rng.normal(0, 0.002, n.size))
    f = fit_chinchilla(n, d, loss, n_bootstrap=40, seed=0)
    assert f["E"] == 0.0 and f["E_ci"][0] == 0.0 and f["E_ci"][1] > 0
    pd.DataFrame({"params": n, "tokens": d, "loss": loss}).to_csv(tmp_path / "t.csv", index=False)
    assert scaling.main(["chinchilla", "--csv", str(tmp_path / "t.csv"), "--n-bootstrap", "40"]) == 0
    assert "E     = 0   95% CI [0 (at bound), " in capsys.readouterr().out
