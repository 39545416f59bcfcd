"""The unified diffusion formulation: where σ enters, and where it is sampled.

Every diffusion model here is described by three things (docs/science.md, "The formulas"):

1. a **process** (α_t, σ_t): x_t = α_t·x0 + σ_t·ε (models.processes).  Dividing by α_t gives
   x_t/α_t = x0 + σ_VE·ε with σ_VE = σ_t/α_t, so every process is a re-parametrised VE process.  All code
   outside these two modules works in these *VE-x0 coordinates*: x = x0 + σ·ε, σ = σ_VE, and the model outputs
   D(x; σ) ≈ E[x0 | x].
2. a **target** (x0, ε, v, score, FM velocity, EDM-F): each is affine in x̂0, so its squared error is the
   x0-error times a factor of t (`x0_loss_factor`).
3. a **noise-level distribution** (log-normal σ, uniform t, logit-normal t, log-uniform σ).

A `Variant` (get_variant("edm" | "vp-eps" | "ve-eps" | "fm-velocity")) bundles the three into what the
trainer needs: `precond(σ)` (where σ enters the network), `sample_sigma(n)` (where σ is sampled),
`loss_weight(σ)` (the factor turning ‖D − x0‖² into the variant's own loss) and `sigma_density(σ)`.

Conventions: functions take torch tensors (numbers and arrays are converted to float64 tensors) and return
tensors of the same shape.  One `c_noise = ln(σ_VE)/4` is used by every variant so the same U-Net serves all.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch

from models.processes import Process, get_process, to_tensor

__all__ = [
    "TARGETS", "x0_loss_factor", "to_process_curve",
    "log_normal_sigma", "uniform_t", "logit_normal_t", "log_uniform_sigma",
    "Variant", "get_variant", "VARIANTS", "c_noise",
]


# --------------------------------------------------------------------------------------------------------
# 1. Processes (α_t, σ_t) and their map to VE coordinates: models.processes
# --------------------------------------------------------------------------------------------------------

# --------------------------------------------------------------------------------------------------------
# 2. Targets: every one is affine in x̂0, so its loss is a factor of t times the x0-loss
# --------------------------------------------------------------------------------------------------------

TARGETS = ("x0", "eps", "v", "score", "velocity", "edm-F")


def _edm_c_out(sigma_ve, sigma_data):
    return sigma_ve * sigma_data / torch.sqrt(sigma_ve**2 + sigma_data**2)


def x0_loss_factor(target: str, process, t, *, sigma_data: float | None = None) -> torch.Tensor:
    """Factor f(t) with (loss of `target`) = f(t)·‖x̂0 − x0‖² at process time t (the table in docs/science.md).

    Derivation: from x_t = αx0 + σε, a prediction x̂0 implies ε̂ = (x_t − αx̂0)/σ, so ε̂ − ε = −(α/σ)(x̂0 − x0);
    score = −ε/σ; v = αε − σx0; velocity u = α̇x0 + σ̇ε; EDM-F: D = c_skip·x + c_out·F in VE coords.
    `sigma_data` (EDM-F only) defaults to the process's own (0.5 unless an EDM process says otherwise)."""
    proc = get_process(process)
    t = to_tensor(t)
    a, s = proc.alpha(t), proc.sigma(t)
    if target == "x0":
        return torch.ones_like(t)
    if target == "eps":
        return a**2 / s**2
    if target == "score":
        return a**2 / s**4
    if target == "v":
        return (a**2 + s**2) ** 2 / s**2
    if target == "velocity":
        return (proc.alpha_dot(t) * s - proc.sigma_dot(t) * a) ** 2 / s**2
    if target == "edm-F":
        sd = proc.sigma_data if sigma_data is None else sigma_data
        return 1 / _edm_c_out(s / a, sd) ** 2
    raise ValueError(f"unknown prediction target {target!r}; choose one of {list(TARGETS)}")


def to_process_curve(sigma_ve, x0_loss, process, target: str = "x0"):
    """Turn a VE-x0 curve J(σ_VE) into `process`'s time axis and `target`'s loss.

    The x0-loss of any process at time t equals the VE x0-loss at σ_VE(t) (docs/science.md), so
    loss(t) = x0_loss_factor(target, process, t)·J(σ_VE(t)).  Points whose t falls outside the process's
    nominal t-range (e.g. σ_VE > 152 for linear VP, where t > 1) are dropped.  Returns numpy float64 arrays
    (t, loss) sorted by t."""
    proc = get_process(process)
    sig = np.asarray(sigma_ve, dtype=np.float64).ravel()
    j = np.asarray(x0_loss, dtype=np.float64).ravel()
    if sig.shape != j.shape:
        raise ValueError(f"to_process_curve: sigma_ve has {sig.size} points but x0_loss has {j.size}")
    if np.any(~(sig > 0)):
        raise ValueError(f"to_process_curve: sigma_ve must be > 0, got min {sig.min() if sig.size else 'n/a'}")
    t = proc.t_from_sigma_ve(torch.from_numpy(sig))
    lo, hi = proc.t_range
    keep = (t > lo) & (t <= hi)
    t = t[keep]
    loss = x0_loss_factor(target, proc, t) * torch.from_numpy(j)[keep]
    order = torch.argsort(t)
    return t[order].numpy(), loss[order].numpy()


# --------------------------------------------------------------------------------------------------------
# 3. Noise-level distributions — where σ is sampled
# --------------------------------------------------------------------------------------------------------

def _normal(n, generator, device):
    dev = generator.device if generator is not None else (device or "cpu")
    return torch.randn(n, generator=generator, device=dev, dtype=torch.float64)


def _uniform(n, generator, device):
    dev = generator.device if generator is not None else (device or "cpu")
    return torch.rand(n, generator=generator, device=dev, dtype=torch.float64)


def log_normal_sigma(n, P_mean=-1.2, P_std=1.2, *, generator=None, device=None):
    """EDM's ln σ ~ N(P_mean, P_std²).  float64 tensor [n]."""
    return torch.exp(P_mean + P_std * _normal(n, generator, device))


def uniform_t(n, t_min=0.0, t_max=1.0, *, generator=None, device=None):
    """t ~ U[t_min, t_max] (DDPM, rectified flow).  float64 tensor [n]."""
    return t_min + (t_max - t_min) * _uniform(n, generator, device)


def logit_normal_t(n, mean=0.0, std=1.0, *, generator=None, device=None):
    """logit t ~ N(mean, std²) (SD3's flow-matching schedule).  float64 tensor [n]."""
    return torch.sigmoid(mean + std * _normal(n, generator, device))


def log_uniform_sigma(n, sigma_min=0.02, sigma_max=100.0, *, generator=None, device=None):
    """ln σ ~ U[ln σ_min, ln σ_max] (NCSN/VE training).  float64 tensor [n]."""
    lo, hi = math.log(sigma_min), math.log(sigma_max)
    return torch.exp(lo + (hi - lo) * _uniform(n, generator, device))


def _std_normal_cdf(z):
    return 0.5 * torch.erfc(-z / math.sqrt(2))


def _std_normal_pdf(z):
    return torch.exp(-0.5 * z**2) / math.sqrt(2 * math.pi)


# --------------------------------------------------------------------------------------------------------
# 4. Variants: process + target + noise distribution + preconditioning, in VE coordinates
# --------------------------------------------------------------------------------------------------------

def c_noise(sigma):
    """The one noise-conditioning convention shared by all variants: ln(σ_VE)/4 (EDM's)."""
    return torch.log(to_tensor(sigma)) / 4


NOISE_KINDS = ("log-normal", "uniform-t", "logit-normal-t", "log-uniform")
INPUT_SCALINGS = ("unit", "raw")

# Per-name defaults. sigma_min / sigma_max bound the evaluation grid and sampler; for the t-distributions
# they are derived from t_min / t_max.
_VARIANT_DEFAULTS = {
    # EDM (Karras et al. 2022, Table 1 / CIFAR config): F-prediction, ln σ ~ N(−1.2, 1.2²), λ = 1/c_out².
    "edm": dict(process="edm", target="edm-F", noise="log-normal", sigma_min=0.002, sigma_max=80.0),
    # DDPM ε-prediction on the linear-β VP process, t ~ U[1e-5, 1] (EDM's VP column: ε_t = 1e-5).
    "vp-eps": dict(process="vp", target="eps", noise="uniform-t", t_min=1e-5, t_max=1.0),
    # NCSN-style ε-prediction on VE, ln σ ~ U[ln 0.02, ln 100] (EDM's VE column).
    "ve-eps": dict(process="ve", target="eps", noise="log-uniform", sigma_min=0.02, sigma_max=100.0),
    # Rectified flow, velocity u = ε − x0; t ~ U[1e-3, 0.99] (σ_VE ∈ [0.001, 99]; t → 1 means σ_VE → ∞).
    "fm-velocity": dict(process="fm", target="velocity", noise="uniform-t", t_min=1e-3, t_max=0.99),
}
VARIANTS = tuple(_VARIANT_DEFAULTS)


@dataclass
class Variant:
    """The "physics" of one trainable model: how σ enters (precond), how it is sampled, how the loss is weighted.

    D(x; σ) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x, c_noise(σ)) in VE coordinates x = x0 + σ·ε, for every variant.
    The network output F is trained towards `target_output(x0, noise, σ)`; that F-loss equals
    `loss_weight(σ)·‖D − x0‖²`, so the trainer can always compute the x0-loss and weight it."""

    name: str
    process: str
    target: str
    noise: str
    sigma_data: float = 0.5
    P_mean: float = -1.2          # log-normal σ
    P_std: float = 1.2
    logit_mean: float = 0.0       # logit-normal t
    logit_std: float = 1.0
    t_min: float | None = None    # uniform / logit-normal t (clipped to [t_min, t_max] range for σ bounds)
    t_max: float | None = None
    sigma_min: float | None = None
    sigma_max: float | None = None
    input_scaling: str = "unit"   # "unit": c_in ≈ 1/std(x); "raw": EDM Table 1's literal c_in for ve-eps (1)

    def __post_init__(self):
        if self.target not in TARGETS:
            raise ValueError(f"variant {self.name!r}: unknown target {self.target!r}; choose one of {list(TARGETS)}")
        if self.noise not in NOISE_KINDS:
            raise ValueError(f"variant {self.name!r}: unknown noise {self.noise!r}; choose one of {list(NOISE_KINDS)}")
        if self.input_scaling not in INPUT_SCALINGS:
            raise ValueError(f"variant {self.name!r}: input_scaling must be one of {INPUT_SCALINGS}, "
                             f"got {self.input_scaling!r}")
        if (self.process, self.target) not in {("edm", "edm-F"), ("ve", "edm-F"), ("vp", "eps"), ("ve", "eps"),
                                               ("vp-cosine", "eps"), ("fm", "velocity")}:
            raise ValueError(f"variant {self.name!r}: no preconditioning for process {self.process!r} with "
                             f"target {self.target!r}")
        if not self.sigma_data > 0:
            raise ValueError(f"variant {self.name!r}: sigma_data must be > 0, got {self.sigma_data}")
        proc = self.proc
        if self.noise in ("uniform-t", "logit-normal-t"):
            lo, hi = proc.t_range
            self.t_min = 0.0 if self.t_min is None else float(self.t_min)
            self.t_max = hi if self.t_max is None else float(self.t_max)
            if not (lo <= self.t_min < self.t_max <= hi) or not (self.t_max < math.inf):
                raise ValueError(f"variant {self.name!r}: need {lo} <= t_min < t_max <= {hi} (finite) for "
                                 f"process {self.process!r}, got t_min={self.t_min}, t_max={self.t_max}")
            if self.sigma_min is None:
                self.sigma_min = max(float(proc.sigma_ve(torch.tensor(self.t_min, dtype=torch.float64))), 1e-6)
            if self.sigma_max is None:
                self.sigma_max = float(proc.sigma_ve(torch.tensor(self.t_max, dtype=torch.float64)))
        if self.sigma_min is None or self.sigma_max is None:
            raise ValueError(f"variant {self.name!r}: sigma_min and sigma_max are required for noise {self.noise!r}")
        self.sigma_min, self.sigma_max = float(self.sigma_min), float(self.sigma_max)
        if not (0 < self.sigma_min < self.sigma_max < math.inf):
            raise ValueError(f"variant {self.name!r}: need 0 < sigma_min < sigma_max < inf, "
                             f"got [{self.sigma_min}, {self.sigma_max}]")

    # -- helpers --------------------------------------------------------------------------------------------
    @property
    def proc(self) -> Process:
        return get_process(self.process, sigma_data=self.sigma_data) if self.process == "edm" \
            else get_process(self.process)

    def kwargs(self) -> dict:
        """Everything but the name: `get_variant(v.name, **v.kwargs())` rebuilds `v` (snapshots store this)."""
        d = dataclasses.asdict(self)
        d.pop("name")
        return d

    def t_of(self, sigma):
        """Process time of a VE noise level."""
        return self.proc.t_from_sigma_ve(to_tensor(sigma))

    # -- where σ enters the network ------------------------------------------------------------------------
    def precond(self, sigma):
        """(c_skip, c_out, c_in, c_noise) at VE noise level σ: D = c_skip·x + c_out·F(c_in·x, c_noise)."""
        sigma = to_tensor(sigma)
        sd = self.sigma_data
        if self.target == "edm-F":
            # EDM Table 1: skip the part of x that is signal at this σ; unit-variance input and F-target.
            c_skip = sd**2 / (sigma**2 + sd**2)
            c_out = sigma * sd / torch.sqrt(sigma**2 + sd**2)
            c_in = 1 / torch.sqrt(sigma**2 + sd**2)
        elif self.target == "eps" and self.process in ("vp", "vp-cosine"):
            # DDPM: F ≈ ε, x̂0 = x − σ·ε̂; the network sees the VP sample x_t = x/sqrt(1 + σ²).
            c_skip = torch.ones_like(sigma)
            c_out = -sigma
            c_in = 1 / torch.sqrt(sigma**2 + 1)
        elif self.target == "eps":
            # NCSN / EDM Table 1 VE column: D = x + σ·F, so F ≈ −ε (= σ·score).  Table 1 feeds x raw (c_in = 1);
            # we default to c_in = 1/sqrt(σ² + σ_d²) because the shared EDM2 U-Net has no input normalisation
            # and σ reaches 100.  c_in changes neither the ideal F nor the loss; input_scaling="raw" restores 1.
            c_skip = torch.ones_like(sigma)
            c_out = sigma.clone()
            c_in = torch.ones_like(sigma) if self.input_scaling == "raw" else 1 / torch.sqrt(sigma**2 + sd**2)
        else:  # FM velocity: t = σ/(1+σ), x_t = (1−t)·x, x̂0 = x_t − t·û
            t = sigma / (1 + sigma)
            c_skip = 1 - t
            c_out = -t
            c_in = 1 - t  # exactly the rectified-flow network input x_t (its std ≤ max(σ_d, 1))
        return c_skip, c_out, c_in, c_noise(sigma)

    def target_output(self, x0, noise, sigma):
        """The ideal network output F for x = x0 + σ·noise: the solution of c_skip·x + c_out·F = x0."""
        sigma = to_tensor(sigma)
        c_skip, c_out, _, _ = self.precond(sigma)
        x = x0 + sigma * noise
        return (x0 - c_skip * x) / c_out

    # -- the loss ------------------------------------------------------------------------------------------
    def loss_weight(self, sigma):
        """λ(σ) with λ·‖D − x0‖² = ‖F − F_target‖² (the variant's own loss): 1/c_out².
        EDM: (σ² + σ_d²)/(σσ_d)²; ε-variants: 1/σ²; FM velocity: 1/t² with t = σ/(1 + σ)."""
        _, c_out, _, _ = self.precond(sigma)
        return 1 / c_out**2

    # -- where σ is sampled --------------------------------------------------------------------------------
    def sample_sigma(self, n, generator=None, device=None):
        """n training noise levels σ_VE (float32).  Uses `generator`'s device when one is given."""
        if self.noise == "log-normal":
            s = log_normal_sigma(n, self.P_mean, self.P_std, generator=generator, device=device)
        elif self.noise == "log-uniform":
            s = log_uniform_sigma(n, self.sigma_min, self.sigma_max, generator=generator, device=device)
        elif self.noise == "uniform-t":
            s = self.proc.sigma_ve(uniform_t(n, self.t_min, self.t_max, generator=generator, device=device))
        else:  # logit-normal t, truncated to [t_min, t_max] by rejection-free inverse-CDF sampling
            u = _uniform(n, generator, device)
            z_lo, z_hi = self._logit_z(self.t_min), self._logit_z(self.t_max)
            p_lo, p_hi = _std_normal_cdf(z_lo), _std_normal_cdf(z_hi)
            z = math.sqrt(2) * torch.erfinv(2 * (p_lo + (p_hi - p_lo) * u) - 1)
            t = torch.sigmoid(self.logit_mean + self.logit_std * z)
            s = self.proc.sigma_ve(t)
        s = s.to(torch.float32)
        return s.to(device) if device is not None else s

    def _logit_z(self, t):
        """Standardised logit of t under the logit-normal (±inf at the ends)."""
        t = to_tensor(t)
        return (torch.log(t) - torch.log1p(-t) - self.logit_mean) / self.logit_std

    def sigma_density(self, sigma):
        """Density of ln σ_VE under the training distribution (0 outside its support)."""
        sigma = to_tensor(sigma)
        ls = torch.log(sigma)
        if self.noise == "log-normal":
            return _std_normal_pdf((ls - self.P_mean) / self.P_std) / self.P_std
        if self.noise == "log-uniform":
            inside = (sigma >= self.sigma_min) & (sigma <= self.sigma_max)
            return inside.to(sigma.dtype) / (math.log(self.sigma_max) - math.log(self.sigma_min))
        # t-distributions: p(ln σ) = p_t(t)·dt/d ln σ = p_t(t)·σ / (dσ/dt)
        proc = self.proc
        t = proc.t_from_sigma_ve(sigma)
        jac = sigma / proc.dsigma_ve_dt(t)
        inside = (t >= self.t_min) & (t <= self.t_max)
        if self.noise == "uniform-t":
            p_t = torch.ones_like(t) / (self.t_max - self.t_min)
        else:
            z = self._logit_z(t)
            mass = _std_normal_cdf(self._logit_z(self.t_max)) - _std_normal_cdf(self._logit_z(self.t_min))
            p_t = _std_normal_pdf(z) / (self.logit_std * t * (1 - t)) / mass
        return torch.where(inside, p_t * jac, torch.zeros_like(p_t))

    def sigma_cdf(self, sigma):
        """P(σ_train ≤ σ) — the CDF matching `sample_sigma` (used by the tests' KS checks)."""
        sigma = to_tensor(sigma)
        if self.noise == "log-normal":
            return _std_normal_cdf((torch.log(sigma) - self.P_mean) / self.P_std)
        if self.noise == "log-uniform":
            lo, hi = math.log(self.sigma_min), math.log(self.sigma_max)
            return ((torch.log(sigma) - lo) / (hi - lo)).clamp(0, 1)
        t = self.proc.t_from_sigma_ve(sigma).clamp(self.t_min, self.t_max)
        if self.noise == "uniform-t":
            return (t - self.t_min) / (self.t_max - self.t_min)
        c = [_std_normal_cdf(self._logit_z(v)) for v in (self.t_min, t, self.t_max)]
        return (c[1] - c[0]) / (c[2] - c[0])


def get_variant(name: str, **overrides) -> Variant:
    """A named variant (`edm`, `vp-eps`, `ve-eps`, `fm-velocity`) with any field overridden.

    e.g. get_variant("edm", P_mean=-0.8, P_std=1.6) for EDM2 ImageNet-64;
         get_variant("fm-velocity", noise="logit-normal-t") for SD3-style flow matching."""
    if name not in _VARIANT_DEFAULTS:
        raise ValueError(f"unknown diffusion variant {name!r}; choose one of {list(VARIANTS)}")
    fields = {f.name for f in dataclasses.fields(Variant)} - {"name"}
    bad = sorted(set(overrides) - fields)
    if bad:
        raise ValueError(f"variant {name!r}: unknown override(s) {bad}; allowed: {sorted(fields)}")
    kw = {**_VARIANT_DEFAULTS[name], **overrides}
    return Variant(name=name, **kw)
