"""models/loss_weighting.py: the optimal-loss weight and noise distribution against hand-computed values."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from models.loss_weighting import JStarCurve, OptimalLossSchedule, bin_probabilities, find_sigma_star, schedule_weight
from training.sigma_bins import SigmaBinTracker


class LogNormalVariant:
    """Stand-in for a Variant: EDM's log-normal σ (the schedule only needs sample_sigma / sigma_density)."""

    def sample_sigma(self, n, generator=None, device=None):
        return torch.exp(-1.2 + 1.2 * torch.randn(n, generator=generator)).to(torch.float32)

    def sigma_density(self, sigma):
        z = (torch.log(torch.as_tensor(sigma, dtype=torch.float64)) + 1.2) / 1.2
        return torch.exp(-0.5 * z**2) / (1.2 * math.sqrt(2 * math.pi))


def write_curve(tmp_path, sigma, jstar, name="jstar.csv"):
    path = tmp_path / name
    pd.DataFrame({"sigma": sigma, "optimal_loss": jstar, "stderr": 0.0, "estimator": "full"}).to_csv(path, index=False)
    return path


def hill(sigma, V=0.3, s0=1.0, k=4.0):
    return V * sigma**k / (sigma**k + s0**k)


# -- σ* ------------------------------------------------------------------------------------------------------

def test_sigma_star_fraction_rule_on_hill_curve():
    # J* = V σ^k/(σ^k + s0^k) reaches f·V at σ = s0·(f/(1−f))^(1/k)
    sig = np.geomspace(1e-3, 1e3, 241)
    for f in (0.01, 0.1):
        expected = 1.0 * (f / (1 - f)) ** 0.25
        got = find_sigma_star(sig, hill(sig), rule="fraction", fraction=f)
        assert got == pytest.approx(expected, rel=5e-3)


def test_sigma_star_fraction_handles_exact_zeros():
    # an exact estimator underflows to 0 below σ*: the rule must still interpolate, not return the grid start
    sig = np.geomspace(1e-3, 1e3, 241)
    j = hill(sig, k=8.0)
    j[sig < 0.3] = 0.0
    got = find_sigma_star(sig, j, rule="fraction", fraction=0.01)
    assert got == pytest.approx((0.01 / 0.99) ** (1 / 8), rel=0.05)


def test_sigma_star_knee_rule_closed_form():
    # J* = σ²/(σ² + s²)·exp(−c/σ²): d ln J*/d ln σ = 2s²/(σ² + s²) + 2c/σ², equal to 2 at σ² = (c + √(c² + 4cs²))/2
    c, s = 0.1, 1.0
    sig = np.geomspace(0.05, 100, 400)
    j = sig**2 / (sig**2 + s**2) * np.exp(-c / sig**2)
    expected = math.sqrt((c + math.sqrt(c * c + 4 * c * s * s)) / 2)
    assert find_sigma_star(sig, j, rule="knee") == pytest.approx(expected, rel=0.01)


def test_sigma_star_errors_name_the_problem():
    sig = np.geomspace(1e-2, 1e2, 10)
    with pytest.raises(ValueError, match="sigma_star_rule"):
        find_sigma_star(sig, hill(sig), rule="steepest")
    with pytest.raises(ValueError, match="sigma_star_fraction"):
        find_sigma_star(sig, hill(sig), fraction=1.5)


# -- the weight ----------------------------------------------------------------------------------------------

def test_weight_hand_computed(tmp_path):
    sig = np.geomspace(0.01, 100, 9)       # J* = σ² exactly: log-log interpolation is exact
    path = write_curve(tmp_path, sig, sig**2)
    sch = OptimalLossSchedule(LogNormalVariant(), path, a=2.0, w_max=10.0, mu=math.log(0.5), std=0.5,
                              sigma_star=1.0)
    bump = lambda s: math.exp(-0.5 * ((math.log(s) - math.log(0.5)) / 0.5) ** 2) / (0.5 * math.sqrt(2 * math.pi))
    expected = {
        2.0: 2 * 0.25,                     # above σ*: a/J* = 2/4, no bump
        1.0: 2 * 1.0,                      # σ = σ* is not < σ*: no bump
        0.5: 2 * 4.0 + bump(0.5),          # 1/J* = 4 < w*; bump at its peak 1/(0.5√2π)
        0.1: 2 * 10.0 + bump(0.1),         # 1/J* = 100 capped at w* = 10
    }
    got = sch.loss_weight(torch.tensor(list(expected), dtype=torch.float64))
    assert got.dtype == torch.float64
    assert got.numpy() == pytest.approx(list(expected.values()), rel=1e-9)
    assert bump(0.5) == pytest.approx(1 / (0.5 * math.sqrt(2 * math.pi)))
    # dtype follows the input
    assert sch.loss_weight(torch.tensor([2.0])).dtype == torch.float32
    # bump off (through the config's free-form kwargs): the first term alone, everywhere
    off = OptimalLossSchedule(LogNormalVariant(), path, a=2.0, w_max=10.0, mu=math.log(0.5), std=0.5,
                              sigma_star=1.0, kwargs={"bump": False})
    got = off.loss_weight(torch.tensor(list(expected), dtype=torch.float64)).numpy()
    assert got == pytest.approx([0.5, 2.0, 8.0, 20.0], rel=1e-9)
    assert off.describe()["bump"] is False
    with pytest.raises(ValueError, match="bump"):
        OptimalLossSchedule(LogNormalVariant(), path, bump="no")


def test_defaults_follow_the_documented_rules(tmp_path):
    sig = np.geomspace(1e-3, 1e3, 241)
    path = write_curve(tmp_path, sig, hill(sig))
    sch = OptimalLossSchedule(LogNormalVariant(), path)
    s_star = (0.01 / 0.99) ** 0.25
    assert sch.sigma_star == pytest.approx(s_star, rel=5e-3)
    assert sch.w_max == pytest.approx(1 / (0.01 * hill(1e3)), rel=1e-2)    # 1/J*(σ*) = 1/(1 % of Var)
    assert sch.a == pytest.approx(1 / sch.w_max)
    assert sch.mu == pytest.approx(math.log(sch.sigma_star) - 1.0)
    # shape: plateau 1 below σ* (plus the bump), J*(σ*)/J* above
    w = schedule_weight(np.array([10.0]), hill(np.array([10.0])), a=sch.a, w_max=sch.w_max, mu=sch.mu, std=1.0,
                        sigma_star=sch.sigma_star)
    assert w[0] == pytest.approx(0.01 * hill(1e3) / hill(10.0), rel=1e-2)


def test_config_kwargs_and_bad_keys(tmp_path):
    sig = np.geomspace(1e-3, 1e3, 50)
    path = write_curve(tmp_path, sig, hill(sig))
    sch = OptimalLossSchedule(LogNormalVariant(), path, name="optimal-loss", a=3.0, update_every_images=1000,
                              kwargs={"floor": 0.3, "sigma_star": 0.5})
    assert (sch.a, sch.floor, sch.sigma_star) == (3.0, 0.3, 0.5)
    with pytest.raises(TypeError, match="bogus"):
        OptimalLossSchedule(LogNormalVariant(), path, bogus=1)
    with pytest.raises(FileNotFoundError, match="nowhere.csv"):
        OptimalLossSchedule(LogNormalVariant(), tmp_path / "nowhere.csv")


# -- the sampling distribution -------------------------------------------------------------------------------

def test_bin_probabilities_hand_computed():
    # w = 2 everywhere; gaps [0, .1, .4, unseen] → q = [0, .2, .8, 0]; floor .1 over 4 bins adds .025
    p = bin_probabilities([2, 2, 2, 2], [0.5, 0.6, 0.9, np.nan], [0.5] * 4, floor=0.1)
    assert p == pytest.approx([0.025, 0.205, 0.745, 0.025])
    # a negative gap (noisy tracker) counts as 0; weights multiply the gap
    p = bin_probabilities([1, 3, 1, 1], [0.4, 0.6, 0.7, 0.5], [0.5] * 4, floor=0.0)
    assert p == pytest.approx([0, 0.3 / 0.5, 0.2 / 0.5, 0])
    # no positive gap anywhere: fall back to ∝ w on the seen bins
    p = bin_probabilities([1, 3, 1, 1], [0.5, 0.5, np.nan, 0.5], [0.5] * 4, floor=0.0)
    assert p == pytest.approx([0.2, 0.6, 0, 0.2])


def flat_schedule(tmp_path, **kw):
    sig = np.geomspace(1e-3, 1e3, 7)
    path = write_curve(tmp_path, sig, np.full_like(sig, 0.5))       # J* = 0.5 → w = a·2, no bump below 1e-4
    return OptimalLossSchedule(LogNormalVariant(), path, a=1.0, w_max=10.0, sigma_star=1e-4, **kw)


def filled_tracker(means, per_bin=2000):
    tr = SigmaBinTracker(0.01, 100.0, num_bins=len(means), decay=1.0)
    for c, m in zip(tr.centers.tolist(), means):
        if not math.isnan(m):
            tr.update(torch.full((per_bin,), c), torch.full((per_bin,), m))
    return tr


def test_sampling_matches_p_and_is_log_uniform_in_bins(tmp_path):
    sch = flat_schedule(tmp_path, floor=0.1, warmup_samples=100)
    tr = filled_tracker([0.5, 0.6, 0.9, float("nan")])
    sch.set_model_loss(tr)
    assert sch.warmed_up
    table = sch.bin_table()
    assert table["p"].to_numpy() == pytest.approx([0.025, 0.205, 0.745, 0.025])
    n = 200_000
    s = sch.sample_sigma(n, generator=torch.Generator().manual_seed(0))
    assert s.dtype == torch.float32 and s.shape == (n,)
    idx = tr.bin_index(s).numpy()
    freq = np.bincount(idx, minlength=4) / n
    p = table["p"].to_numpy()
    assert np.all(np.abs(freq - p) < 5 * np.sqrt(p * (1 - p) / n))
    # inside a bin ln σ is uniform: mean position 1/2, variance 1/12
    ln_e = np.log(tr.edges.numpy())
    pos = (np.log(s.double().numpy()) - ln_e[idx]) / np.diff(ln_e)[idx]
    assert pos.min() >= -1e-5 and pos.max() <= 1 + 1e-5
    assert pos.mean() == pytest.approx(0.5, abs=0.005) and pos.var() == pytest.approx(1 / 12, abs=0.003)
    # the density of ln σ integrates to 1 and equals p_b/width inside bin b
    dens = sch.sigma_density(tr.centers)
    assert (dens.numpy() * np.diff(ln_e)) == pytest.approx(p)


def test_mass_goes_where_the_weighted_gap_is(tmp_path):
    # real J* curve (Hill), model loss = J* + a gap that peaks in bin 3; the weight 1/J* amplifies small-σ bins
    sig = np.geomspace(1e-3, 1e3, 241)
    path = write_curve(tmp_path, sig, hill(sig))
    sch = OptimalLossSchedule(LogNormalVariant(), path, floor=0.05, warmup_samples=0)
    tr = SigmaBinTracker(0.01, 100.0, num_bins=8, decay=1.0)
    sch.set_model_loss(tr)
    jbar = sch.bin_table()["optimal_loss"].to_numpy()
    gap = np.array([0.001, 0.002, 0.004, 0.02, 0.004, 0.002, 0.001, 0.001])
    for c, m in zip(tr.centers.tolist(), jbar + gap):
        tr.update(torch.full((10,), c), torch.full((10,), m, dtype=torch.float64))
    t = sch.bin_table()
    assert t["gap"].to_numpy() == pytest.approx(gap, rel=1e-6)
    q = (t["p"].to_numpy() - 0.05 / 8) / 0.95
    wg = t["weight"].to_numpy() * gap
    assert q == pytest.approx(wg / wg.sum(), rel=1e-9)
    assert int(np.argmax(wg)) == int(np.argmax(t["p"].to_numpy()))
    assert t["p"].min() >= 0.05 / 8 - 1e-12               # the floor: no bin starves


def test_warm_up_uses_the_variant_distribution(tmp_path):
    sch = flat_schedule(tmp_path, warmup_samples=10_000)
    variant = sch.variant
    ref = variant.sample_sigma(50, generator=torch.Generator().manual_seed(3))
    # no tracker yet
    assert torch.equal(sch.sample_sigma(50, generator=torch.Generator().manual_seed(3)), ref)
    # a tracker with too little data
    sch.set_model_loss(filled_tracker([0.5, 0.6, 0.9, 0.7], per_bin=100))
    assert not sch.warmed_up
    assert torch.equal(sch.sample_sigma(50, generator=torch.Generator().manual_seed(3)), ref)
    # enough data: the schedule takes over (samples stay inside the tracker's range)
    sch.set_model_loss(filled_tracker([0.5, 0.6, 0.9, 0.7], per_bin=5000))
    assert sch.warmed_up
    s = sch.sample_sigma(1000, generator=torch.Generator().manual_seed(3))
    assert float(s.min()) >= 0.01 * (1 - 1e-6) and float(s.max()) <= 100 * (1 + 1e-6)


def test_with_the_real_edm_variant(tmp_path):
    from models.diffusion import get_variant

    sig = np.geomspace(2e-3, 80, 40)
    path = write_curve(tmp_path, sig, hill(sig))
    sch = OptimalLossSchedule(get_variant("edm"), path)
    s = sch.sample_sigma(64, generator=torch.Generator().manual_seed(0))   # warm-up: EDM's log-normal
    w = sch.loss_weight(s)
    assert w.shape == s.shape and bool(torch.all(w > 0)) and bool(torch.all(torch.isfinite(w)))
    curve = JStarCurve.from_csv(path)
    assert curve(np.array([sig[5]]))[0] == pytest.approx(hill(sig[5]))


def test_p_is_held_between_refreshes_and_survives_resume(tmp_path):
    sch = flat_schedule(tmp_path, floor=0.1, warmup_samples=100)
    tr = filled_tracker([0.5, 0.6, 0.9, float("nan")])
    sch.set_model_loss(tr)
    draw = lambda s: s.sample_sigma(500, generator=torch.Generator().manual_seed(7))
    before = draw(sch)
    tr.update(torch.full((5000,), float(tr.centers[0])), torch.full((5000,), 5.0, dtype=torch.float64))
    assert torch.equal(draw(sch), before)                  # held until the trainer refreshes
    resumed = flat_schedule(tmp_path, floor=0.1, warmup_samples=100)
    resumed.load_state_dict(sch.state_dict())
    assert torch.equal(draw(resumed), before)               # a resumed run draws the same σ's
    sch.set_model_loss(tr)
    assert sch.bin_table()["p"].iloc[0] > 0.5               # refreshed: bin 0 now has the big gap
