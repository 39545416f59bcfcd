"""The optimal-loss training schedule: a loss weight and a noise distribution built from J*.

    w_σ  = a·min(1/J*_σ, w*) + N(ln σ; μ, ς²)·1[σ < σ*]          (loss weight on the per-dim x0-loss)
    p(σ) ∝ w_σ·(J_σ(θ) − J*_σ)                                     (density of ln σ, piecewise constant on bins)

Why this shape.  1/J*_σ turns the x0-loss into a *relative* loss J_σ/J*_σ, so every noise level counts by how far
the model is from the best possible denoiser there, not by the raw size of its loss (the raw loss is ~0 at small σ
and ~Var[x0] at large σ).  At large σ, 1/J* → 1/Var[x0] — the same limit as EDM's λ = 1/c_out² → 1/σ_data².  At
small σ a finite training set has J* → 0 (each noisy point identifies its source), so 1/J* is capped at w*; below
σ* the Gaussian bump in ln σ adds weight where, per the paper, the gap correlates positively with FID.
p(σ) then puts the training samples where the weighted gap is largest: with w ≈ 1/J*, where the *relative*
excess (J − J*)/J* is largest.

The paper leaves a, w*, μ, ς and the rule for σ* open.  Our choices (all overridable via the config's
`training.schedule` keys a, w_max, mu, std, or its `kwargs` for the rest):
  σ*   the smallest σ at which J*(σ) reaches `sigma_star_fraction` (default 1 %) of the data variance, read off
       the J* curve by log-log interpolation; the data variance is J* at the curve's largest σ (J* → Var as σ → ∞)
       unless `data_variance` is given.  This is "where J* leaves zero": on digits it gives σ* ≈ 0.47.  An
       alternative rule, "knee", takes the σ where the log-slope d ln J*/d ln σ falls to 2 (below it J* vanishes
       faster than the σ² of any smooth density: the memorisation regime).
  w*   1/J*(σ*): the weight stops growing exactly where J* leaves zero, so the bump alone shapes w below σ*.
  a    1/w*: the first term is then 1 on the plateau below σ* and J*(σ*)/J*_σ above it, and the bump (a normal
       density of ln σ, peak 1/(ς√2π)) is on the same scale — it raises the weight by 40 % at μ for ς = 1.  An
       overall constant on w does not change what Adam learns (only gradient clipping sees it).
  ς    1.0 (one e-fold of σ);  μ = ln σ* − ς, so the bump sits one e-fold below σ*, inside the region it is cut to.
  bump true; `bump: false` drops the second term (w = a·min(1/J*, w*) alone), to test whether it helps.
Sampling (`sample_sigma`): p lives on the trainer's σ bins (training.sigma_bins.SigmaBinTracker, log-spaced).  A bin
b is drawn with probability p_b = (1 − floor)·q_b + floor/B, q_b ∝ w̄_b·max(J_b(θ) − J̄*_b, 0), then ln σ is uniform
inside the bin.  w̄_b and J̄*_b are the averages of w and J* over the bin in ln σ (J* changes by orders of magnitude
across one bin near σ*, so the centre value would be biased).  The floor (default 0.1 of the mass spread evenly)
keeps every bin sampled, so J_b(θ) stays current everywhere and no bin starves; a bin the tracker has not seen yet
gets only the floor.  If every gap is ≤ 0 the q part falls back to ∝ w̄_b.
Refresh: p is recomputed from the tracker at each `set_model_loss(tracker)` call (the trainer calls it every
`training.schedule.update_every_images`, default its log interval) and held fixed in between; `state_dict()` holds
the p in use, so a resumed run draws as before.
Warm-up: until the tracker has seen `warmup_samples` examples in total (default 5000) and at least half of its bins
are non-empty, σ is drawn from the variant's own training distribution (so the first J_σ(θ) estimates are those of
the baseline); the loss weight is w_σ from the first step on.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch

from study.tables import read_jstar

SIGMA_STAR_RULES = ("fraction", "knee")
_SUBGRID = 16  # points per bin for the bin averages of w and J* (uniform in ln σ)


# --------------------------------------------------------------------------------------------------------------
# the J* curve
# --------------------------------------------------------------------------------------------------------------

def jstar_points(jstar_csv) -> tuple[np.ndarray, np.ndarray]:
    """(σ, J*) from an optimal_loss/jstar.csv, ascending σ, float64 (read and validated by study.tables.read_jstar:
    a missing or bad table is one error naming it)."""
    df = read_jstar(jstar_csv)
    return df["sigma"].to_numpy(np.float64), df["optimal_loss"].to_numpy(np.float64)


class JStarCurve:
    """J*(σ) by linear interpolation in (ln σ, ln J*), constant beyond the grid ends.

    J* values ≤ 0 (an exact estimator underflows to 0 at tiny σ) are floored at 1e-12 of the largest value so the
    log is finite; 1/J* is capped by w* anyway."""

    def __init__(self, sigma, jstar):
        sigma = np.asarray(sigma, np.float64).ravel()
        jstar = np.asarray(jstar, np.float64).ravel()
        if sigma.shape != jstar.shape or sigma.size < 2:
            raise ValueError(f"JStarCurve: need matching σ and J* arrays of >= 2 points, got {sigma.size}, "
                             f"{jstar.size}")
        order = np.argsort(sigma)
        self.sigma, self.jstar = sigma[order], jstar[order]
        if not np.all(self.sigma > 0) or not np.all(np.isfinite(self.jstar)):
            raise ValueError("JStarCurve: σ must be > 0 and J* finite")
        self.tiny = 1e-12 * max(float(self.jstar.max()), 1e-300)
        self._lns, self._lnj = np.log(self.sigma), np.log(np.maximum(self.jstar, self.tiny))

    @classmethod
    def from_csv(cls, jstar_csv) -> "JStarCurve":
        return cls(*jstar_points(jstar_csv))

    def __call__(self, sigma) -> np.ndarray:
        s = np.asarray(sigma, np.float64)
        return np.exp(np.interp(np.log(s), self._lns, self._lnj))

    @property
    def data_variance(self) -> float:
        """J* at the largest σ of the grid (≈ Var[x0] per dimension when σ_max ≫ the data scale)."""
        return float(self.jstar[-1])


def find_sigma_star(sigma, jstar, *, rule: str = "fraction", fraction: float = 0.01,
                    data_variance: float | None = None) -> float:
    """The critical noise level σ* of a J* curve.

    rule="fraction": the smallest σ with J*(σ) ≥ fraction·Var, Var = `data_variance` or J* at the largest σ;
      log-log interpolation between the two grid points that bracket the crossing.
    rule="knee": the largest σ at which the log-slope s(σ) = d ln J*/d ln σ is still ≥ 2, going down from above
      (finite differences on the grid, linear interpolation in ln σ for the crossing); only points with
      J* ≥ 1e-6·Var enter, since the slope of an underflowed curve is noise.
    """
    sig = np.asarray(sigma, np.float64).ravel()
    j = np.asarray(jstar, np.float64).ravel()
    order = np.argsort(sig)
    sig, j = sig[order], j[order]
    var = float(j[-1]) if data_variance is None else float(data_variance)
    if not var > 0:
        raise ValueError(f"find_sigma_star: data variance must be > 0, got {var}")
    if rule == "fraction":
        if not 0 < fraction < 1:
            raise ValueError(f"find_sigma_star: sigma_star_fraction must be in (0, 1), got {fraction}")
        level = fraction * var
        above = np.nonzero(j >= level)[0]
        if above.size == 0:
            raise ValueError(f"find_sigma_star: J* never reaches {fraction:g}·Var = {level:.3g} on σ ∈ "
                             f"[{sig[0]:.3g}, {sig[-1]:.3g}]")
        k = int(above[0])
        if k == 0:
            return float(sig[0])
        lo_j = max(j[k - 1], 1e-300)  # a J* of exactly 0 would make the log −inf: interpolate from a tiny value
        f = (math.log(level) - math.log(lo_j)) / (math.log(j[k]) - math.log(lo_j))
        return float(math.exp(math.log(sig[k - 1]) + f * (math.log(sig[k]) - math.log(sig[k - 1]))))
    if rule == "knee":
        keep = j >= 1e-6 * var
        s, jj = np.log(sig[keep]), np.log(j[keep])
        if s.size < 3:
            raise ValueError("find_sigma_star: rule 'knee' needs >= 3 grid points with J* >= 1e-6·Var")
        mid = 0.5 * (s[1:] + s[:-1])
        slope = np.diff(jj) / np.diff(s)
        steep = np.nonzero(slope >= 2.0)[0]
        if steep.size == 0:
            raise ValueError("find_sigma_star: rule 'knee': d ln J*/d ln σ never reaches 2 on the grid")
        k = int(steep[-1])
        if k == slope.size - 1:
            return float(math.exp(mid[k]))
        f = (slope[k] - 2.0) / (slope[k] - slope[k + 1])
        return float(math.exp(mid[k] + f * (mid[k + 1] - mid[k])))
    raise ValueError(f"find_sigma_star: unknown sigma_star_rule {rule!r}; choose one of {SIGMA_STAR_RULES}")


# --------------------------------------------------------------------------------------------------------------
# the weight and the sampling distribution
# --------------------------------------------------------------------------------------------------------------

def normal_pdf(x, mu: float, std: float):
    return np.exp(-0.5 * ((x - mu) / std) ** 2) / (std * math.sqrt(2 * math.pi))


def schedule_weight(sigma, jstar_of_sigma, *, a: float, w_max: float, mu: float, std: float,
                    sigma_star: float, bump: bool = True) -> np.ndarray:
    """w_σ = a·min(1/J*_σ, w*) + N(ln σ; μ, ς²)·1[σ < σ*] (float64 numpy; without the second term when `bump` is
    false).  `jstar_of_sigma` is J* at `sigma`."""
    s = np.asarray(sigma, np.float64)
    j = np.asarray(jstar_of_sigma, np.float64)
    with np.errstate(divide="ignore"):
        inv = np.where(j > 0, 1.0 / np.where(j > 0, j, 1.0), np.inf)
    base = a * np.minimum(inv, w_max)
    return base + normal_pdf(np.log(s), mu, std) * (s < sigma_star) if bump else base


def bin_probabilities(weight, model_loss, jstar, *, floor: float) -> np.ndarray:
    """p_b = (1 − floor)·q_b + floor/B with q_b ∝ w_b·max(J_b(θ) − J*_b, 0); NaN model loss (unseen bin) → q_b = 0.
    If no bin has a positive gap, q ∝ w (the schedule's weighting alone)."""
    w = np.asarray(weight, np.float64)
    gap = np.asarray(model_loss, np.float64) - np.asarray(jstar, np.float64)
    gap = np.where(np.isfinite(gap), np.maximum(gap, 0.0), 0.0)
    q = w * gap
    if not q.sum() > 0:
        q = np.where(np.isfinite(np.asarray(model_loss, np.float64)), w, 0.0)
        if not q.sum() > 0:
            q = np.ones_like(w)
    q = q / q.sum()
    return (1.0 - floor) * q + floor / q.size


class OptimalLossSchedule:
    """The trainer's σ-sampler and loss weight under `training.schedule.name: optimal-loss` (docs/internals.md).

    `OptimalLossSchedule(variant, jstar_csv, **kwargs)`; methods `sample_sigma(n, generator=None, device=None)`,
    `loss_weight(sigma)`, `set_model_loss(tracker)`.  See the module docstring for the formulas and defaults."""

    def __init__(self, variant, jstar_csv, *, a: float | None = None, w_max: float | None = None,
                 mu: float | None = None, std: float = 1.0, sigma_star: float | None = None,
                 sigma_star_rule: str = "fraction", sigma_star_fraction: float = 0.01,
                 data_variance: float | None = None, floor: float = 0.1, warmup_samples: int = 5000,
                 bump: bool = True, name: str = "optimal-loss", kwargs: dict | None = None, **ignored):
        if name != "optimal-loss":
            raise ValueError(f"OptimalLossSchedule: training.schedule.name must be 'optimal-loss', got {name!r}")
        if kwargs:  # the config's free-form `training.schedule.kwargs`: same keys as the named arguments
            named = dict(a=a, w_max=w_max, mu=mu, std=std, sigma_star=sigma_star, sigma_star_rule=sigma_star_rule,
                         sigma_star_fraction=sigma_star_fraction, data_variance=data_variance, floor=floor,
                         warmup_samples=warmup_samples, bump=bump)
            named.update(kwargs)
            self.__init__(variant, jstar_csv, **named, **ignored)
            return
        unknown = set(ignored) - {"update_every_images"}  # the trainer's key: how often it refreshes, not ours
        if unknown:
            raise TypeError(f"OptimalLossSchedule: unknown training.schedule key(s) {sorted(unknown)}")
        self.variant = variant
        self.curve = JStarCurve.from_csv(jstar_csv) if not isinstance(jstar_csv, JStarCurve) else jstar_csv
        if not std > 0:
            raise ValueError(f"training.schedule.std must be > 0, got {std}")
        if not 0 <= floor <= 1:
            raise ValueError(f"training.schedule floor must be in [0, 1], got {floor}")
        self.sigma_star = float(sigma_star) if sigma_star is not None else find_sigma_star(
            self.curve.sigma, self.curve.jstar, rule=sigma_star_rule, fraction=sigma_star_fraction,
            data_variance=data_variance)
        self.w_max = float(w_max) if w_max is not None else 1.0 / float(self.curve(self.sigma_star))
        if not self.w_max > 0:
            raise ValueError(f"training.schedule.w_max must be > 0, got {self.w_max}")
        self.std = float(std)
        self.mu = float(mu) if mu is not None else math.log(self.sigma_star) - self.std
        self.a = float(a) if a is not None else 1.0 / self.w_max
        self.floor = float(floor)
        if not isinstance(bump, bool):
            raise ValueError(f"training.schedule bump must be true or false, got {bump!r}")
        self.bump = bump
        self.warmup_samples = int(warmup_samples)
        self.tracker = None
        self._table = None  # bin table in use; None = warm-up (the variant's distribution)

    # -- the weight ------------------------------------------------------------------------------------------
    def weight_np(self, sigma) -> np.ndarray:
        s = np.asarray(sigma, np.float64)
        return schedule_weight(s, self.curve(s), a=self.a, w_max=self.w_max, mu=self.mu, std=self.std,
                               sigma_star=self.sigma_star, bump=self.bump)

    def loss_weight(self, sigma) -> torch.Tensor:
        """w_σ as a tensor like `sigma` (same device and float dtype)."""
        sig = torch.as_tensor(sigma)
        w = self.weight_np(sig.detach().to("cpu", torch.float64).numpy())
        dtype = sig.dtype if sig.is_floating_point() else torch.float32
        return torch.from_numpy(np.asarray(w)).to(device=sig.device, dtype=dtype)

    # -- the model's loss ------------------------------------------------------------------------------------
    def set_model_loss(self, tracker) -> None:
        """Take J_σ(θ) from `tracker` (a SigmaBinTracker): the bin probabilities are recomputed now and used by every
        draw until the next call (the trainer calls this every `training.schedule.update_every_images`)."""
        for attr in ("edges", "mean", "counts"):
            if not hasattr(tracker, attr):
                raise TypeError(f"OptimalLossSchedule.set_model_loss: tracker lacks .{attr}")
        self.tracker = tracker
        self._table = self.bin_table() if self.warmed_up else None

    def state_dict(self) -> dict:
        """The bin probabilities in use (so a resumed run draws exactly as before its next refresh)."""
        t = self._table
        return {"table": None if t is None else {k: t[k].to_numpy().tolist() for k in t.columns}}

    def load_state_dict(self, state: dict) -> None:
        t = (state or {}).get("table")
        self._table = None if t is None else pd.DataFrame(t)

    @property
    def warmed_up(self) -> bool:
        if self.tracker is None:
            return False
        counts = np.asarray(torch.as_tensor(self.tracker.counts).cpu(), np.float64)
        return counts.sum() >= self.warmup_samples and (counts > 0).mean() >= 0.5

    def bin_table(self) -> pd.DataFrame:
        """One row per tracker bin: edges, bin-averaged J* and w, tracked model loss, gap, and p (the bin's
        probability).  Needs a tracker."""
        if self.tracker is None:
            raise RuntimeError("OptimalLossSchedule.bin_table: call set_model_loss(tracker) first")
        edges = np.asarray(torch.as_tensor(self.tracker.edges).cpu(), np.float64)
        ln_e = np.log(edges)
        # _SUBGRID midpoints per bin, uniform in ln σ
        frac = (np.arange(_SUBGRID) + 0.5) / _SUBGRID
        sub = np.exp(ln_e[:-1, None] + frac[None, :] * np.diff(ln_e)[:, None])
        j_bar = self.curve(sub).mean(axis=1)
        w_bar = self.weight_np(sub).mean(axis=1)
        model = np.asarray(torch.as_tensor(self.tracker.mean).cpu(), np.float64)
        p = bin_probabilities(w_bar, model, j_bar, floor=self.floor)
        return pd.DataFrame({"sigma_lo": edges[:-1], "sigma_hi": edges[1:], "sigma": np.sqrt(edges[:-1] * edges[1:]),
                             "optimal_loss": j_bar, "weight": w_bar, "model_loss": model,
                             "gap": model - j_bar, "p": p})

    # -- the noise distribution ------------------------------------------------------------------------------
    def sample_sigma(self, n, generator=None, device=None) -> torch.Tensor:
        """n noise levels σ_VE (float32): the variant's distribution during warm-up, then p(σ) on the bins."""
        table = self._table
        if table is None:
            return self.variant.sample_sigma(n, generator=generator, device=device)
        gen_dev = generator.device if generator is not None else (device or "cpu")
        p = torch.as_tensor(table["p"].to_numpy().copy(), dtype=torch.float64, device=gen_dev)
        b = torch.multinomial(p, int(n), replacement=True, generator=generator)
        u = torch.rand(int(n), generator=generator, device=gen_dev, dtype=torch.float64)
        lo = torch.from_numpy(np.log(table["sigma_lo"].to_numpy())).to(gen_dev)[b]
        hi = torch.from_numpy(np.log(table["sigma_hi"].to_numpy())).to(gen_dev)[b]
        s = torch.exp(lo + u * (hi - lo)).to(torch.float32)
        return s.to(device) if device is not None else s

    def sigma_density(self, sigma) -> torch.Tensor:
        """Density of ln σ under the current p (the variant's during warm-up); 0 outside the bins."""
        table = self._table
        if table is None:
            return self.variant.sigma_density(sigma)
        s = torch.as_tensor(sigma, dtype=torch.float64)
        ln_e = np.log(np.append(table["sigma_lo"].to_numpy(), table["sigma_hi"].to_numpy()[-1]))
        dens = table["p"].to_numpy() / np.diff(ln_e)
        ls = np.log(s.cpu().numpy())
        idx = np.clip(np.searchsorted(ln_e, ls, side="right") - 1, 0, len(dens) - 1)
        out = np.where((ls >= ln_e[0]) & (ls <= ln_e[-1]), dens[idx], 0.0)
        return torch.from_numpy(out)

    def describe(self) -> dict:
        """The resolved constants (for logs and docs)."""
        return {"sigma_star": self.sigma_star, "w_max": self.w_max, "a": self.a, "mu": self.mu, "std": self.std,
                "floor": self.floor, "bump": self.bump, "warmup_samples": self.warmup_samples,
                "data_variance": self.curve.data_variance}
