"""EDM's deterministic sampler: 2nd-order Heun on the probability-flow ODE (Karras et al. 2022, Algorithm 1).

In VE coordinates x = x0 + σ·ε the probability-flow ODE is dx/dσ = (x − D(x; σ))/σ, with D the denoiser
(posterior mean at the optimum).  Time steps follow EDM's ρ-schedule

    σ_i = (σ_max^(1/ρ) + i/(N−1)·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ,  i = 0 … N−1,   σ_N = 0,

which crowds steps toward small σ (ρ = 7).  Every step is an Euler step plus a trapezoidal correction, except the
last one (to σ = 0), which is Euler alone: there D(x; σ_{N−1}) is the answer.  Each of the N steps calls D twice
except the last: 2N − 1 evaluations.

`denoiser` is any callable D(x, sigma, labels) -> tensor like x, with sigma a tensor [B] (models.denoiser.Denoiser,
analysis.optimal_loss.posterior_mean wrapped in a lambda, or an oracle).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from models.denoiser import Denoiser
from study.atomic import atomic_path


def karras_sigmas(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                  *, dtype=torch.float64, device=None) -> torch.Tensor:
    """The N + 1 noise levels σ_0 = σ_max > … > σ_{N−1} = σ_min > σ_N = 0 (float64 by default)."""
    if int(num_steps) < 1:
        raise ValueError(f"sampler: num_steps must be >= 1, got {num_steps}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"sampler: need 0 < sigma_min < sigma_max, got [{sigma_min}, {sigma_max}]")
    if not rho > 0:
        raise ValueError(f"sampler: rho must be > 0, got {rho}")
    n = int(num_steps)
    if n == 1:
        steps = torch.tensor([float(sigma_max)], dtype=torch.float64)
    else:
        i = torch.arange(n, dtype=torch.float64)
        steps = (sigma_max ** (1 / rho) + i / (n - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([steps, torch.zeros(1, dtype=torch.float64)]).to(dtype=dtype, device=device)


def _call(denoiser, x, sigma, labels):
    s = torch.full((x.shape[0],), float(sigma), dtype=x.dtype, device=x.device)
    return denoiser(x, s, labels).to(x.dtype)


@torch.no_grad()
def heun_solve(denoiser, x, sigmas, labels=None) -> torch.Tensor:
    """Integrate the probability-flow ODE from σ = sigmas[0] (x is a sample at that level) down the given grid.
    A step that ends at σ = 0 is Euler only (EDM Alg. 1); any other step gets the 2nd-order correction."""
    sig = [float(s) for s in torch.as_tensor(sigmas).reshape(-1).tolist()]
    if len(sig) < 2 or any(b >= a for a, b in zip(sig, sig[1:])) or sig[-1] < 0 or sig[0] <= 0:
        raise ValueError(f"sampler: sigmas must decrease strictly from a positive value to >= 0, got {sig[:3]}…")
    for s_cur, s_next in zip(sig[:-1], sig[1:]):
        d_cur = (x - _call(denoiser, x, s_cur, labels)) / s_cur
        x_next = x + (s_next - s_cur) * d_cur
        if s_next > 0:
            d_next = (x_next - _call(denoiser, x_next, s_next, labels)) / s_next
            x_next = x + (s_next - s_cur) * 0.5 * (d_cur + d_next)
        x = x_next
    return x


@torch.no_grad()
def heun_sample(denoiser, shape, *, num_steps: int = 18, sigma_min: float = 0.002, sigma_max: float = 80.0,
                rho: float = 7.0, labels=None, generator=None, device=None, dtype=torch.float32,
                noise: torch.Tensor | None = None) -> torch.Tensor:
    """Draw samples: x ~ N(0, σ_max²·I) of `shape` (or σ_max·`noise`), then `heun_solve` over `karras_sigmas`."""
    if noise is None:
        dev = generator.device if generator is not None else (device or "cpu")
        noise = torch.randn(tuple(shape), generator=generator, device=dev, dtype=dtype)
    noise = noise.to(device=device or noise.device, dtype=dtype)
    sigmas = karras_sigmas(num_steps, sigma_min, sigma_max, rho)
    return heun_solve(denoiser, noise * float(sigmas[0]), sigmas, labels)


# --------------------------------------------------------------------------------------------------------------
# CLI: samples from a training snapshot
# --------------------------------------------------------------------------------------------------------------

def sample_snapshot(snapshot, num: int, *, num_steps: int = 18, sigma_min: float = 0.002, sigma_max: float = 80.0,
                    rho: float = 7.0, shape=None, labels=None, seed: int = 0, batch_size: int = 500,
                    device="cpu") -> np.ndarray:
    """`num` samples (float32 numpy [num, C, H, W]) from a snapshot's EMA denoiser.  `shape` (C, H, W) is taken
    from the snapshot's arch record (resolution, channels) when not given; labels [num] for a conditional net."""
    den = Denoiser.from_snapshot(snapshot, device=device)
    if shape is None:
        arch = den.snapshot_arch
        shape = (int(arch["channels"]), int(arch["resolution"]), int(arch["resolution"]))
    gen = torch.Generator(device=device).manual_seed(int(seed))
    out = []
    for start in range(0, int(num), int(batch_size)):
        b = min(int(batch_size), int(num) - start)
        lab = None if labels is None else torch.as_tensor(labels[start:start + b], device=device)
        out.append(heun_sample(den, (b, *shape), num_steps=num_steps, sigma_min=sigma_min, sigma_max=sigma_max,
                               rho=rho, labels=lab, generator=gen, device=device).cpu())
    return torch.cat(out).numpy()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m models.sampler",
                                 description="Heun (EDM Alg. 1) samples from a snapshot's EMA denoiser → .npz (x)")
    ap.add_argument("--snapshot", required=True)
    ap.add_argument("--num", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=18)
    ap.add_argument("--sigma-min", type=float, default=0.002)
    ap.add_argument("--sigma-max", type=float, default=80.0)
    ap.add_argument("--rho", type=float, default=7.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    x = sample_snapshot(args.snapshot, args.num, num_steps=args.steps, sigma_min=args.sigma_min,
                        sigma_max=args.sigma_max, rho=args.rho, seed=args.seed, device=args.device)
    out = Path(args.out)
    with atomic_path(out) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, x=x, layout=np.array("NCHW"))   # training.dataset's reader then never guesses the layout
    print(f"wrote {out}: {x.shape[0]} samples of shape {x.shape[1:]}")


if __name__ == "__main__":
    main()
