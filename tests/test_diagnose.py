"""analysis/diagnose.py: gap summaries and the diagnosis on synthetic evaluation CSVs."""

import math

import numpy as np
import pandas as pd
import pytest


def fake_eval(path, model, sigma, excess, jstar):
    n = len(sigma)
    rows = pd.DataFrame({"model": model, "arch": "t1", "params": 1, "images_seen": 100, "flops": 1.0,
                         "sigma": sigma, "weighting": "none", "n": 64, "loss": np.asarray(jstar) + excess,
                         "loss_stderr": 0.01, "optimal_loss": jstar, "optimal_loss_stderr": 0.0, "excess": excess,
                         "excess_stderr": 0.001, "gap": excess, "gap_stderr": 0.001})
    total = rows.iloc[[0]].assign(sigma=math.nan, weighting="training")
    pd.concat([rows, total]).to_csv(path, index=False)
    return path


def test_log_sigma_mean_and_edm_weighting():
    from analysis.diagnose import edm_weighted, log_sigma_mean
    from analysis.eval_set import weighted_totals

    s = np.geomspace(0.01, 50, 9)
    # mean over ln σ of ln σ on a symmetric grid is the midpoint
    assert log_sigma_mean(s, np.log(s)) == pytest.approx(0.5 * (math.log(0.01) + math.log(50)))
    # EDM weighting: same as the evaluation module's quadrature with EDM's density and λ
    from models.diffusion import get_variant
    import torch

    v = get_variant("edm")
    vals = np.linspace(0.1, 1.0, 9)
    table = pd.DataFrame({"sigma": s, "n": 1, **{k: vals for k in ("loss", "optimal_loss", "excess", "gap")},
                          **{f"{k}_stderr": 0.0 for k in ("loss", "optimal_loss", "excess", "gap")}})
    ref = weighted_totals(table, lambda x: v.sigma_density(torch.tensor(x)).numpy(),
                          lambda x: v.loss_weight(torch.tensor(x)).numpy())["excess"]
    assert edm_weighted(s, vals) == pytest.approx(ref, rel=1e-9)


def test_diagnose_finds_the_peak(tmp_path):
    from analysis.diagnose import diagnose

    s = np.geomspace(0.01, 50, 9)
    j = 0.3 * s**2 / (1 + s**2)
    a = fake_eval(tmp_path / "a.csv", "a", s, np.exp(-(np.log(s) - np.log(s[3])) ** 2), j)
    b = fake_eval(tmp_path / "b.csv", "b", s, 0.01 * s, j)
    long_df, summ = diagnose([a, b], {"a": {"variant": "edm"}, "b": {"variant": "vp-eps"}})
    assert list(summ["peak_sigma"]) == pytest.approx([s[3], s[-1]])
    assert list(summ["variant"]) == ["edm", "vp-eps"]
    assert len(long_df) == 18


def test_local_peaks():
    from analysis.diagnose import local_peaks

    s = np.arange(1.0, 8.0)
    assert local_peaks(s, [0, 2, 1, 1, 3, 5, 4]) == [(6.0, 5.0), (2.0, 2.0)]
    assert local_peaks(s[:3], [3, 2, 1]) == [(1.0, 3.0)]
