"""Diffusion processes (α_t, σ_t): x_t = α_t·x0 + σ_t·ε, and their map to the VE coordinates every other module
works in (docs/science.md, "The formulas"). Dividing by α_t gives x_t/α_t = x0 + σ_VE·ε with σ_VE = σ_t/α_t, so every
process is a re-parametrised VE process; each gives α, σ, their t-derivatives, σ_VE(t) and its inverse.

Processes: VE, EDM (VE with its σ_data), VP with a linear β (DDPM), VP-cosine, flow matching (rectified flow);
`get_process(name)`. The targets, noise distributions and variants built on them are models.diffusion's.

Conventions: functions take torch tensors (numbers and arrays are converted to float64 tensors, ``to_tensor``) and
return tensors of the same shape.
"""

from __future__ import annotations

import math

import torch

__all__ = ["Process", "VE", "EDM", "VPLinear", "VPCosine", "FlowMatching", "get_process", "PROCESSES", "to_tensor"]


def to_tensor(x) -> torch.Tensor:
    """Tensors pass through; numbers / arrays become float64 tensors (the precise default for analysis)."""
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(x, dtype=torch.float64)


class Process:
    """x_t = α(t)·x0 + σ(t)·ε.  Subclasses give α, σ and their t-derivatives; σ_VE = σ/α and its inverse.

    `t_range` is the nominal domain of t (open at the ends where σ_VE is 0 or ∞)."""

    name = "process"
    t_range = (0.0, 1.0)
    sigma_data = 0.5  # only used by the EDM-F target; EDM sets it from its kwargs

    def alpha(self, t):
        raise NotImplementedError

    def sigma(self, t):
        raise NotImplementedError

    def alpha_dot(self, t):
        raise NotImplementedError

    def sigma_dot(self, t):
        raise NotImplementedError

    def sigma_ve(self, t):
        t = to_tensor(t)
        return self.sigma(t) / self.alpha(t)

    def t_from_sigma_ve(self, s):
        raise NotImplementedError

    def dsigma_ve_dt(self, t):
        """d(σ/α)/dt = (σ̇α − α̇σ)/α² — used to turn a density over t into a density over ln σ_VE."""
        t = to_tensor(t)
        a, s = self.alpha(t), self.sigma(t)
        return (self.sigma_dot(t) * a - self.alpha_dot(t) * s) / a**2

    def __repr__(self):
        return f"{type(self).__name__}()"


class VE(Process):
    """Variance exploding (NCSN): α = 1, σ = t."""

    name = "ve"
    t_range = (0.0, math.inf)

    def alpha(self, t):
        return torch.ones_like(to_tensor(t))

    def sigma(self, t):
        return to_tensor(t).clone()

    def alpha_dot(self, t):
        return torch.zeros_like(to_tensor(t))

    def sigma_dot(self, t):
        return torch.ones_like(to_tensor(t))

    def t_from_sigma_ve(self, s):
        return to_tensor(s).clone()


class EDM(VE):
    """EDM (Karras et al. 2022): the VE process with t = σ; σ_data parametrises the EDM-F target."""

    name = "edm"

    def __init__(self, sigma_data: float = 0.5):
        if not sigma_data > 0:
            raise ValueError(f"EDM process: sigma_data must be > 0, got {sigma_data}")
        self.sigma_data = float(sigma_data)

    def __repr__(self):
        return f"EDM(sigma_data={self.sigma_data})"


class VPLinear(Process):
    """DDPM's linear β schedule in continuous time (Song et al. 2021): β(t) = β_min + β_d·t,
    α = exp(−½∫β) = exp(−½(β_min·t + ½β_d·t²)), σ = sqrt(1 − α²), t ∈ [0, 1]."""

    name = "vp"

    def __init__(self, beta_min: float = 0.1, beta_d: float = 19.9):
        if not (beta_min >= 0 and beta_d > 0):
            raise ValueError(f"VP process: need beta_min >= 0 and beta_d > 0, got {beta_min}, {beta_d}")
        self.beta_min, self.beta_d = float(beta_min), float(beta_d)

    def _B(self, t):  # ∫0^t β
        return self.beta_min * t + 0.5 * self.beta_d * t**2

    def alpha(self, t):
        return torch.exp(-0.5 * self._B(to_tensor(t)))

    def sigma(self, t):
        return torch.sqrt(-torch.expm1(-self._B(to_tensor(t))))  # sqrt(1 − α²), exact near t = 0

    def alpha_dot(self, t):
        t = to_tensor(t)
        return -0.5 * (self.beta_min + self.beta_d * t) * self.alpha(t)

    def sigma_dot(self, t):
        t = to_tensor(t)
        return 0.5 * (self.beta_min + self.beta_d * t) * self.alpha(t) ** 2 / self.sigma(t)

    def sigma_ve(self, t):
        return torch.sqrt(torch.expm1(self._B(to_tensor(t))))  # σ/α = sqrt(e^B − 1)

    def t_from_sigma_ve(self, s):
        # Solve ½β_d t² + β_min t = ln(1 + σ²) with the cancellation-free root 2L / (β_min + sqrt(β_min² + 2β_d L)).
        L = torch.log1p(to_tensor(s) ** 2)
        return 2 * L / (self.beta_min + torch.sqrt(self.beta_min**2 + 2 * self.beta_d * L))

    def __repr__(self):
        return f"VPLinear(beta_min={self.beta_min}, beta_d={self.beta_d})"


class VPCosine(Process):
    """Cosine schedule (Nichol & Dhariwal 2021) in continuous time: θ(t) = π/2·(t + s)/(1 + s),
    α = cos θ / cos θ0 (θ0 = θ(0)), σ = sqrt(1 − α²); α(0) = 1, α(1) = 0."""

    name = "vp-cosine"

    def __init__(self, s: float = 0.008):
        if not s >= 0:
            raise ValueError(f"VP-cosine process: offset s must be >= 0, got {s}")
        self.s = float(s)
        self._theta0 = 0.5 * math.pi * self.s / (1 + self.s)
        self._dtheta = 0.5 * math.pi / (1 + self.s)

    def _theta(self, t):
        return 0.5 * math.pi * (to_tensor(t) + self.s) / (1 + self.s)

    def alpha(self, t):
        return torch.cos(self._theta(t)) / math.cos(self._theta0)

    def sigma(self, t):
        # 1 − cos²θ/cos²θ0 = sin(θ − θ0)·sin(θ + θ0)/cos²θ0, which keeps precision near t = 0.
        th = self._theta(t)
        return torch.sqrt(torch.sin(th - self._theta0) * torch.sin(th + self._theta0)) / math.cos(self._theta0)

    def alpha_dot(self, t):
        return -torch.sin(self._theta(t)) * self._dtheta / math.cos(self._theta0)

    def sigma_dot(self, t):
        th = self._theta(t)
        return torch.cos(th) * torch.sin(th) * self._dtheta / (math.cos(self._theta0) ** 2 * self.sigma(t))

    def t_from_sigma_ve(self, s):
        a = 1 / torch.sqrt(1 + to_tensor(s) ** 2)  # α from σ_VE on the VP circle
        theta = torch.arccos(a * math.cos(self._theta0))
        return theta / self._dtheta - self.s

    def __repr__(self):
        return f"VPCosine(s={self.s})"


class FlowMatching(Process):
    """Rectified flow / flow matching: α = 1 − t, σ = t; σ_VE = t/(1 − t), t = σ/(1 + σ)."""

    name = "fm"

    def alpha(self, t):
        return 1 - to_tensor(t)

    def sigma(self, t):
        return to_tensor(t).clone()

    def alpha_dot(self, t):
        return -torch.ones_like(to_tensor(t))

    def sigma_dot(self, t):
        return torch.ones_like(to_tensor(t))

    def t_from_sigma_ve(self, s):
        s = to_tensor(s)
        return s / (1 + s)


PROCESSES = {"ve": VE, "edm": EDM, "vp": VPLinear, "vp-cosine": VPCosine, "fm": FlowMatching}


def get_process(name, **kw) -> Process:
    """A process by name (`ve`, `vp`, `vp-cosine`, `fm`, `edm`); a Process instance passes through."""
    if isinstance(name, Process):
        return name
    if name not in PROCESSES:
        raise ValueError(f"unknown diffusion process {name!r}; choose one of {sorted(PROCESSES)}")
    try:
        return PROCESSES[name](**kw)
    except TypeError as e:
        raise ValueError(f"bad keyword for process {name!r}: {e}") from None
