"""Tests for models/diffusion.py and models/processes.py: every formula is checked against an independent
computation."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from models import diffusion as dm
from models import processes as pr

PROCESS_NAMES = ["ve", "edm", "vp", "vp-cosine", "fm"]
# Interior times where every process has 0 < σ_VE < ∞ (VE/EDM use t = σ directly).
T_GRID = {"ve": [0.01, 0.3, 2.0, 40.0], "edm": [0.01, 0.3, 2.0, 40.0], "vp": [0.01, 0.2, 0.6, 0.95],
          "vp-cosine": [0.01, 0.2, 0.6, 0.95], "fm": [0.01, 0.2, 0.6, 0.95]}


def _deriv(f, t, h=1e-6):
    """Central finite difference in float64 — independent of the analytic α̇, σ̇."""
    return (f(t + h) - f(t - h)) / (2 * h)


@pytest.mark.parametrize("name", PROCESS_NAMES)
def test_process_derivatives_match_finite_differences(name):
    p = pr.get_process(name)
    t = torch.tensor(T_GRID[name], dtype=torch.float64)
    torch.testing.assert_close(p.alpha_dot(t), _deriv(p.alpha, t), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(p.sigma_dot(t), _deriv(p.sigma, t), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(p.dsigma_ve_dt(t), _deriv(p.sigma_ve, t), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", ["vp", "vp-cosine"])
def test_vp_processes_preserve_variance(name):
    p = pr.get_process(name)
    t = torch.linspace(1e-4, 0.999, 50, dtype=torch.float64)
    torch.testing.assert_close(p.alpha(t) ** 2 + p.sigma(t) ** 2, torch.ones_like(t))
    assert float(p.alpha(torch.tensor(0.0, dtype=torch.float64))) == pytest.approx(1.0)


def test_vp_linear_matches_discrete_ddpm_betas():
    # Song et al. 2021: DDPM's 1000 linear betas 1e-4..0.02 are β(t)/1000 at t = i/1000, so
    # −ln ᾱ(1) = ∫β dt equals Σ β_i (the discrete ᾱ = Π(1 − β_i) agrees only to first order in β).
    betas = np.linspace(1e-4, 0.02, 1000)
    alpha1 = float(pr.get_process("vp").alpha(torch.tensor(1.0, dtype=torch.float64)))
    assert -math.log(alpha1**2) == pytest.approx(betas.sum(), rel=1e-12)


@pytest.mark.parametrize("name", PROCESS_NAMES)
def test_sigma_ve_round_trip(name):
    p = pr.get_process(name)
    sig = torch.logspace(-3, 2, 41, dtype=torch.float64)
    t = p.t_from_sigma_ve(sig)
    torch.testing.assert_close(p.sigma_ve(t), sig, rtol=1e-9, atol=0)
    # σ_VE is σ/α by definition
    torch.testing.assert_close(p.sigma(t) / p.alpha(t), sig, rtol=1e-9, atol=0)
    # monotone: larger σ_VE ↔ later time
    assert torch.all(torch.diff(t) > 0)


def test_fm_time_map_is_closed_form():
    s = torch.tensor([0.5, 1.0, 3.0], dtype=torch.float64)
    torch.testing.assert_close(pr.get_process("fm").t_from_sigma_ve(s), s / (1 + s))


# ---- target factors --------------------------------------------------------------------------------------

def _targets_from_x0(proc, t, x_t, x0, eps, sigma_data):
    """Each target's value given (x0, ε), written straight from its definition (no factor formulas)."""
    a, s = proc.alpha(t), proc.sigma(t)
    sve = s / a
    c_skip = sigma_data**2 / (sve**2 + sigma_data**2)
    c_out = sve * sigma_data / torch.sqrt(sve**2 + sigma_data**2)
    return {
        "x0": x0,
        "eps": eps,
        "score": -eps / s,
        "v": a * eps - s * x0,
        "velocity": _deriv(proc.alpha, t) * x0 + _deriv(proc.sigma, t) * eps,
        "edm-F": (x0 - c_skip * (x_t / a)) / c_out,  # F from D = c_skip·x + c_out·F in VE coords
    }


@pytest.mark.parametrize("name", PROCESS_NAMES)
@pytest.mark.parametrize("target", dm.TARGETS)
def test_x0_loss_factor_matches_direct_computation(name, target):
    g = torch.Generator().manual_seed(0)
    proc = pr.get_process(name)
    sigma_data = proc.sigma_data
    for tv in T_GRID[name]:
        t = torch.tensor(tv, dtype=torch.float64)
        x0 = torch.randn(64, generator=g, dtype=torch.float64)
        eps = torch.randn(64, generator=g, dtype=torch.float64)
        x_t = proc.alpha(t) * x0 + proc.sigma(t) * eps
        x0_hat = x0 + 0.1 * torch.randn(64, generator=g, dtype=torch.float64)
        # the prediction implied by x̂0: the noise it implies is ε̂ = (x_t − αx̂0)/σ
        eps_hat = (x_t - proc.alpha(t) * x0_hat) / proc.sigma(t)
        true = _targets_from_x0(proc, t, x_t, x0, eps, sigma_data)[target]
        pred = _targets_from_x0(proc, t, x_t, x0_hat, eps_hat, sigma_data)[target]
        lhs = torch.sum((pred - true) ** 2)
        rhs = dm.x0_loss_factor(target, proc, t) * torch.sum((x0_hat - x0) ** 2)
        torch.testing.assert_close(lhs, rhs, rtol=1e-5, atol=0)


def test_rectified_flow_velocity_factor_is_one_over_t_squared():
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    torch.testing.assert_close(dm.x0_loss_factor("velocity", "fm", t), 1 / t**2)


def test_unknown_target_and_process_are_named():
    with pytest.raises(ValueError, match="bogus"):
        dm.x0_loss_factor("bogus", "ve", 1.0)
    with pytest.raises(ValueError, match="nope"):
        pr.get_process("nope")


def test_to_process_curve_maps_ve_curve_to_fm_velocity_loss():
    sig = np.logspace(-2, 1.5, 30)
    j = sig**2 / (1 + sig**2) * 0.25  # any positive curve: a Gaussian-data-like J(σ)
    t, loss = dm.to_process_curve(sig, j, "fm", "velocity")
    np.testing.assert_allclose(t, sig / (1 + sig))
    np.testing.assert_allclose(loss, j / t**2)
    # x0 target is the identity on the loss
    _, loss_x0 = dm.to_process_curve(sig, j, "vp", "x0")
    np.testing.assert_allclose(loss_x0, j)


def test_to_process_curve_drops_points_outside_process_range():
    sig = np.array([0.1, 1.0, 1000.0])  # σ_VE = 1000 needs t > 1 on the linear VP process
    t, loss = dm.to_process_curve(sig, np.ones(3), "vp", "eps")
    assert len(t) == 2 and np.all(t <= 1)
    np.testing.assert_allclose(loss, 1 / sig[:2] ** 2)  # ε factor α²/σ² = 1/σ_VE²
    with pytest.raises(ValueError, match="3 points"):
        dm.to_process_curve(sig, np.ones(2), "vp", "eps")


# ---- variants ---------------------------------------------------------------------------------------------

SIGMAS = torch.tensor([0.003, 0.05, 0.5, 2.0, 30.0], dtype=torch.float64)


def _own_target(name, x0, eps, sigma, sd=0.5):
    """Each variant's network target written from its paper's definition."""
    if name == "edm":
        x = x0 + sigma * eps
        return (x0 - sd**2 / (sigma**2 + sd**2) * x) / (sigma * sd / torch.sqrt(sigma**2 + sd**2))
    if name == "vp-eps":
        return eps
    if name == "ve-eps":
        return -eps  # NCSN convention: F = σ·score = −ε
    if name == "fm-velocity":
        return eps - x0
    raise AssertionError(name)


@pytest.mark.parametrize("name", dm.VARIANTS)
def test_precond_gives_x0_for_ideal_output(name):
    v = dm.get_variant(name)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(len(SIGMAS), 16, generator=g, dtype=torch.float64) * 0.5
    eps = torch.randn(len(SIGMAS), 16, generator=g, dtype=torch.float64)
    s = SIGMAS[:, None]
    x = x0 + s * eps
    c_skip, c_out, c_in, c_noise = v.precond(s)
    F = _own_target(name, x0, eps, s)
    torch.testing.assert_close(c_skip * x + c_out * F, x0)
    torch.testing.assert_close(v.target_output(x0, eps, s), F)
    torch.testing.assert_close(c_noise, torch.log(s) / 4)  # one convention for all variants
    assert torch.all(c_in > 0)


def test_precond_input_is_the_process_input():
    s = SIGMAS
    # VP: the network sees x_t = x/sqrt(1+σ²); FM: x_t = (1−t)·x
    torch.testing.assert_close(dm.get_variant("vp-eps").precond(s)[2], 1 / torch.sqrt(1 + s**2))
    torch.testing.assert_close(dm.get_variant("fm-velocity").precond(s)[2], 1 - s / (1 + s))
    torch.testing.assert_close(dm.get_variant("ve-eps", input_scaling="raw").precond(s)[2], torch.ones_like(s))
    # EDM's c_in gives unit-variance input for data of std σ_data
    sd = 0.5
    torch.testing.assert_close(dm.get_variant("edm").precond(s)[2] ** 2 * (sd**2 + s**2), torch.ones_like(s))


@pytest.mark.parametrize("name", dm.VARIANTS)
def test_loss_weight_gives_the_variants_own_loss(name):
    v = dm.get_variant(name)
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(len(SIGMAS), 32, generator=g, dtype=torch.float64) * 0.5
    eps = torch.randn(len(SIGMAS), 32, generator=g, dtype=torch.float64)
    s = SIGMAS[:, None]
    x = x0 + s * eps
    F = torch.randn(len(SIGMAS), 32, generator=g, dtype=torch.float64)  # an arbitrary network output
    c_skip, c_out, _, _ = v.precond(s)
    D = c_skip * x + c_out * F
    own = ((F - _own_target(name, x0, eps, s)) ** 2).mean(1)
    weighted = v.loss_weight(SIGMAS) * ((D - x0) ** 2).mean(1)
    torch.testing.assert_close(weighted, own)
    # ... and it agrees with the process/target factor table at the variant's time
    torch.testing.assert_close(v.loss_weight(SIGMAS), dm.x0_loss_factor(v.target, v.proc, v.t_of(SIGMAS)))


def test_loss_weight_closed_forms():
    s = SIGMAS
    torch.testing.assert_close(dm.get_variant("edm").loss_weight(s), (s**2 + 0.25) / (0.5 * s) ** 2)
    torch.testing.assert_close(dm.get_variant("vp-eps").loss_weight(s), 1 / s**2)
    torch.testing.assert_close(dm.get_variant("ve-eps").loss_weight(s), 1 / s**2)
    torch.testing.assert_close(dm.get_variant("fm-velocity").loss_weight(s), ((1 + s) / s) ** 2)


SAMPLING_CASES = [
    ("edm", {}),
    ("edm", {"P_mean": -0.4, "P_std": 1.0}),
    ("vp-eps", {}),
    ("ve-eps", {}),
    ("fm-velocity", {}),
    ("fm-velocity", {"noise": "logit-normal-t", "logit_mean": 0.3, "logit_std": 0.8}),
    ("fm-velocity", {"t_min": 0.3, "t_max": 0.8}),  # a truncation large enough to matter
    ("vp-eps", {"process": "vp-cosine", "t_min": 0.05, "t_max": 0.99}),
    ("fm-velocity", {"noise": "logit-normal-t", "t_min": 0.2, "t_max": 0.9}),
]


@pytest.mark.parametrize("name,kw", SAMPLING_CASES)
def test_sample_sigma_matches_its_cdf(name, kw):
    v = dm.get_variant(name, **kw)
    s = v.sample_sigma(20000, generator=torch.Generator().manual_seed(3))
    assert s.dtype == torch.float32 and s.shape == (20000,)
    s64 = s.double().numpy()
    res = stats.kstest(s64, lambda q: v.sigma_cdf(torch.from_numpy(np.asarray(q, dtype=np.float64))).numpy())
    assert res.pvalue > 1e-3, res


@pytest.mark.parametrize("name,kw", SAMPLING_CASES)
def test_sigma_density_is_the_derivative_of_the_cdf(name, kw):
    v = dm.get_variant(name, **kw)
    lo, hi = math.log(v.sigma_min) + 1e-6, math.log(v.sigma_max) - 1e-6
    if v.noise == "log-normal":
        lo, hi = v.P_mean - 6 * v.P_std, v.P_mean + 6 * v.P_std
    ls = torch.linspace(lo, hi, 4001, dtype=torch.float64)
    dens = v.sigma_density(torch.exp(ls))
    # integral of the ln σ density over the support ≈ 1 ...
    assert float(torch.trapezoid(dens, ls)) == pytest.approx(1.0, abs=2e-3)
    # ... and the cumulative integral reproduces the CDF
    cum = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumulative_trapezoid(dens, ls)])
    cdf = v.sigma_cdf(torch.exp(ls))
    torch.testing.assert_close(cum, cdf - cdf[0], atol=2e-3, rtol=0)


def test_sigma_density_closed_forms():
    ls = torch.linspace(-4, 3, 15, dtype=torch.float64)
    dens = dm.get_variant("edm").sigma_density(torch.exp(ls)).numpy()
    np.testing.assert_allclose(dens, stats.norm.pdf(ls.numpy(), -1.2, 1.2), rtol=1e-10)
    # FM with logit-normal t: logit t = ln σ_VE, so ln σ is exactly N(m, s²) (truncation negligible)
    v = dm.get_variant("fm-velocity", noise="logit-normal-t", logit_mean=0.2, logit_std=0.9,
                       t_min=1e-9, t_max=1 - 1e-9)  # truncation mass ~1e-100
    np.testing.assert_allclose(v.sigma_density(torch.exp(ls)).numpy(), stats.norm.pdf(ls.numpy(), 0.2, 0.9),
                               rtol=1e-8)


def test_sample_moments_log_normal():
    v = dm.get_variant("edm", P_mean=-0.8, P_std=1.6)
    ls = torch.log(v.sample_sigma(50000, generator=torch.Generator().manual_seed(4)).double())
    assert float(ls.mean()) == pytest.approx(-0.8, abs=0.03)
    assert float(ls.std()) == pytest.approx(1.6, abs=0.03)


def test_sampling_is_reproducible_with_generator():
    v = dm.get_variant("vp-eps")
    a = v.sample_sigma(10, generator=torch.Generator().manual_seed(7))
    b = v.sample_sigma(10, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert torch.all((a >= v.sigma_min * 0.999) & (a <= v.sigma_max * 1.001))


def test_variant_sigma_ranges_and_kwargs_round_trip():
    vp = dm.get_variant("vp-eps")
    assert vp.sigma_max == pytest.approx(math.sqrt(math.expm1(0.1 + 19.9 / 2)), rel=1e-9)  # ≈ 152
    fm = dm.get_variant("fm-velocity")
    assert fm.sigma_max == pytest.approx(99.0) and fm.sigma_min == pytest.approx(1e-3 / (1 - 1e-3))
    for name in dm.VARIANTS:
        v = dm.get_variant(name, sigma_data=0.6)
        assert dm.get_variant(v.name, **v.kwargs()) == v


def test_bad_variant_inputs_are_named():
    with pytest.raises(ValueError, match="edm2"):
        dm.get_variant("edm2")
    with pytest.raises(ValueError, match="P_men"):
        dm.get_variant("edm", P_men=0.0)
    with pytest.raises(ValueError, match="t_max"):
        dm.get_variant("fm-velocity", t_max=1.5)
    with pytest.raises(ValueError, match="sigma_min"):
        dm.get_variant("edm", sigma_min=100.0)
    with pytest.raises(ValueError, match="gauss"):
        dm.get_variant("edm", noise="gauss")
