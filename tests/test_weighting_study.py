"""analysis/weighting_study.py: per-arm seed spreads and paired differences on synthetic tables with known answers."""

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from tests.test_diagnose import fake_eval

SIGMA = np.geomspace(0.01, 50, 5)
JSTAR = np.full(5, 0.1)
# per seed: a shared offset (what pairing removes) plus a small arm-specific jitter
OFFSET = {0: 0.0, 1: 0.010, 2: 0.020}
JITTER = {0: 0.0, 1: 0.001, 2: -0.001}


def make_study(tmp_path, arms):
    """arms: {arm: (schedule, logvar, level)} → (eval CSVs, score JSONs, meta) with excess = level + seed offset
    (+ jitter for non-baselines) at every σ, and FD = 100·excess."""
    evals, scores, meta = [], [], {}
    for arm, (schedule, logvar, level) in arms.items():
        for seed in OFFSET:
            m = f"{arm}_s{seed}"
            ex = level + OFFSET[seed] + (JITTER[seed] if schedule != "baseline" else 0.0)
            evals.append(fake_eval(tmp_path / f"{m}.csv", m, SIGMA, np.full(5, ex), JSTAR))
            (tmp_path / f"{m}.json").write_text(json.dumps({"model": m, "fd_classifier": 100 * ex}))
            scores.append(tmp_path / f"{m}.json")
            meta[m] = {"variant": "edm", "schedule": schedule, "seed": seed, "arch": "t1", "logvar": logvar,
                       "schedule_kwargs": {"floor": 0.5} if arm.endswith("floor") else {}}
    return evals, scores, meta


def test_paired_difference_and_t_interval(tmp_path):
    from analysis.weighting_study import compare_arms, comparison_markdown, model_rows

    arms = {"base": ("baseline", False, 0.05), "ol": ("optimal-loss", False, 0.03),
            "ol_floor": ("optimal-loss", False, 0.06),
            "base_lv": ("baseline", True, 0.05), "ol_lv": ("optimal-loss", True, 0.08)}
    models = model_rows(*make_study(tmp_path, arms))
    assert set(models["arm"]) == set(arms)
    comp = compare_arms(models)
    tot = comp[comp["sigma"].isna()].set_index(["arm", "measure"])
    # seed spread of an arm: sd of level + offset over the three seeds
    assert tot.loc[("base", "excess"), "sd"] == pytest.approx(np.std([0, 0.01, 0.02], ddof=1))
    assert tot.loc[("base", "excess"), "mean"] == pytest.approx(0.06)
    # paired by seed the offsets cancel: diffs = level difference + jitter, t-interval with 2 d.o.f.
    d = np.array([-0.02 + JITTER[s] for s in OFFSET])
    h = stats.t.ppf(0.975, 2) * d.std(ddof=1) / math.sqrt(3)
    r = tot.loc[("ol", "excess")]
    assert r["baseline"] == "base" and r["pairs"] == 3
    assert (r["diff"], r["diff_lo"], r["diff_hi"]) == pytest.approx((-0.02, -0.02 - h, -0.02 + h))
    assert r["rel_diff"] == pytest.approx(-0.02 / 0.06)
    # the interval is much narrower than the unpaired seed spread would allow
    assert r["diff_hi"] - r["diff_lo"] < tot.loc[("base", "excess"), "sd"]
    assert tot.loc[("ol", "fd_classifier"), "diff"] == pytest.approx(-2.0)
    assert tot.loc[("ol_floor", "excess"), "diff"] == pytest.approx(0.01)
    # logvar-on arms are compared with the logvar-on baseline only
    assert tot.loc[("ol_lv", "excess"), "baseline"] == "base_lv"
    assert tot.loc[("ol_lv", "excess"), "diff"] == pytest.approx(0.03)
    # baselines carry no difference; per σ the same paired difference at every σ
    assert np.isnan(tot.loc[("base", "excess"), "diff"])
    per = comp[comp["sigma"].notna() & (comp["arm"] == "ol")]
    assert len(per) == 5 and per["diff"].to_numpy() == pytest.approx(np.full(5, -0.02))
    md = comparison_markdown(comp)
    assert "| ol_floor |" in md and "floor=0.5" in md and "(-33%)" in md


def test_t_interval_edge_cases():
    from analysis.weighting_study import t_interval

    m, sd, lo, hi = t_interval([1.0])
    assert m == 1.0 and all(math.isnan(v) for v in (sd, lo, hi))
    m, sd, lo, hi = t_interval([1.0, 3.0])          # t_{0.975,1} = 12.706, sd/√2 = 1
    assert (m, lo, hi) == pytest.approx((2.0, 2 - 12.7062, 2 + 12.7062), rel=1e-4)


def test_bad_tables_are_named(tmp_path):
    from analysis.weighting_study import compare_arms, model_rows

    evals, scores, meta = make_study(tmp_path, {"base": ("baseline", False, 0.05)})
    with pytest.raises(ValueError, match="no sample-quality JSON"):
        model_rows(evals, scores[:-1], meta)
    meta2 = dict(meta)
    meta2.pop("base_s0")
    with pytest.raises(ValueError, match="'base_s0'.*not in the model table"):
        model_rows(evals, scores, meta2)
    evals, scores, meta = make_study(tmp_path, {"a": ("baseline", False, 0.05), "b": ("baseline", False, 0.04)})
    with pytest.raises(ValueError, match="more than one baseline arm"):
        compare_arms(model_rows(evals, scores, meta))


def test_arm_of():
    from analysis.weighting_study import arm_of

    assert arm_of("edm_ol_s12") == "edm_ol" and arm_of("edm_ol") == "edm_ol" and arm_of("s1_base_s0") == "s1_base"
