"""models/sampler.py: EDM's Heun sampler with the exact denoiser of the two-point set {−a, +a}."""

import math

import numpy as np
import pytest
import torch

from models.sampler import heun_sample, heun_solve, karras_sigmas

A = 0.7


def tanh_oracle(x, sigma, labels=None):
    """Exact D*(x) = a·tanh(a·x/σ²) for the two-point set {−a, +a} (VE)."""
    s = sigma.reshape((-1,) + (1,) * (x.ndim - 1)).to(x.dtype)
    return A * torch.tanh(A * x / s**2)


def mixture_cdf(x, sigma):
    """CDF of the noisy marginal ½N(−a, σ²) + ½N(a, σ²) (float64 numpy)."""
    x = np.asarray(x, np.float64)
    phi = lambda z: 0.5 * (1 + np.vectorize(math.erf)(z / math.sqrt(2)))
    return 0.5 * (phi((x - A) / sigma) + phi((x + A) / sigma))


def test_karras_sigmas_closed_form():
    s = karras_sigmas(18, 0.002, 80.0, 7.0)
    assert s.shape == (19,) and s[-1] == 0
    assert float(s[0]) == pytest.approx(80.0) and float(s[-2]) == pytest.approx(0.002)
    i = 5
    expected = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert float(s[i]) == pytest.approx(expected, rel=1e-12)
    assert bool(torch.all(s[1:] < s[:-1]))
    with pytest.raises(ValueError, match="num_steps"):
        karras_sigmas(0)


def test_two_point_samples_land_on_plus_minus_a():
    n = 4000
    x = heun_sample(tanh_oracle, (n, 1), num_steps=18, generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64)
    dist = torch.minimum((x - A).abs(), (x + A).abs())
    assert float(dist.max()) < 1e-6
    frac_plus = float((x > 0).double().mean())
    assert abs(frac_plus - 0.5) < 4 * math.sqrt(0.25 / n)     # the two points equally likely


def test_posterior_mean_oracle_also_lands_on_the_data():
    from analysis.posterior import posterior_mean

    data = torch.tensor([[-A], [A]], dtype=torch.float64)
    den = lambda x, s, labels=None: posterior_mean(data, x, s).to(x.dtype).reshape(x.shape)
    x = heun_sample(den, (256, 1), num_steps=12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert float(torch.minimum((x - A).abs(), (x + A).abs()).max()) < 1e-6


def test_flow_preserves_quantiles_and_is_second_order():
    # The probability-flow ODE is a monotone transport of the marginals: F_σ(x(σ)) is constant along a path.
    x0 = torch.linspace(-3, 3, 41, dtype=torch.float64).reshape(-1, 1) * 20.0
    start, end = 20.0, 0.5
    target_u = mixture_cdf(x0.numpy().ravel(), start)

    def err(n):
        sig = torch.cat([karras_sigmas(n, end, start)[:-1]])    # stop at σ = end (no final step to 0)
        x_end = heun_solve(tanh_oracle, x0.clone(), sig)
        return np.abs(mixture_cdf(x_end.numpy().ravel(), end) - target_u).max()

    e8, e16, e32 = err(8), err(16), err(32)
    assert e32 < 2e-3                                          # (measured 1.2e-3; Euler would be ~1e-2)
    assert e8 / e16 > 3.0 and e16 / e32 > 3.0                   # ≈ 4× per halving: 2nd order


def test_euler_last_step_returns_the_denoiser_output():
    # one step from σ_max straight to 0: x_N = D(x; σ_max)
    x = torch.tensor([[0.3], [-2.0]], dtype=torch.float64)
    out = heun_solve(tanh_oracle, x, torch.tensor([2.0, 0.0]))
    assert out.numpy().ravel() == pytest.approx(tanh_oracle(x, torch.full((2,), 2.0)).numpy().ravel())


def test_bad_sigma_grid_is_named():
    with pytest.raises(ValueError, match="sigmas must decrease"):
        heun_solve(tanh_oracle, torch.zeros(2, 1), torch.tensor([1.0, 2.0]))
