"""Running mean of the training x0-loss per σ bin — the trainer's estimate of J_σ(θ).

The optimal-loss schedule (docs/science.md) samples σ in proportion to w_σ·(J_σ(θ) − J*_σ); the natural reading of
"how J_σ(θ) is tracked" is a running per-bin mean of the (unweighted, per-dim) x0-loss of the training batches.

Bins are log-spaced between sigma_min and sigma_max (σ outside the range counts in the end bins).  Each update
first decays every bin's accumulated sum and weight by `decay`, then adds the new samples:
    S_b ← decay·S_b + Σ_{i in b} loss_i,   W_b ← decay·W_b + n_b,   mean_b = S_b / W_b.
So decay = 1 is the exact cumulative mean, decay < 1 forgets old batches with a per-step factor, and there is no
start-up bias toward zero (the ratio is normalised).  State is float64 on the CPU.
"""

from __future__ import annotations

import math

import torch


class SigmaBinTracker:
    def __init__(self, sigma_min: float, sigma_max: float, num_bins: int = 20, decay: float = 0.99):
        if not (0 < sigma_min < sigma_max < math.inf):
            raise ValueError(f"SigmaBinTracker: need 0 < sigma_min < sigma_max < inf, got [{sigma_min}, {sigma_max}]")
        if int(num_bins) < 1:
            raise ValueError(f"SigmaBinTracker: num_bins must be >= 1, got {num_bins}")
        if not 0 < decay <= 1:
            raise ValueError(f"SigmaBinTracker: decay must be in (0, 1], got {decay}")
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.num_bins, self.decay = int(num_bins), float(decay)
        self.edges = torch.logspace(math.log10(self.sigma_min), math.log10(self.sigma_max), self.num_bins + 1,
                                    dtype=torch.float64)
        self.centers = torch.sqrt(self.edges[:-1] * self.edges[1:])  # geometric centres (log-spaced bins)
        self._sum = torch.zeros(self.num_bins, dtype=torch.float64)
        self._weight = torch.zeros(self.num_bins, dtype=torch.float64)
        self.counts = torch.zeros(self.num_bins, dtype=torch.int64)  # samples ever seen per bin

    def bin_index(self, sigma) -> torch.Tensor:
        """Bin of each σ (clamped into the end bins)."""
        s = torch.as_tensor(sigma, dtype=torch.float64).detach().cpu().reshape(-1)
        idx = torch.bucketize(s, self.edges[1:-1], right=True)
        return idx.clamp_(0, self.num_bins - 1)

    @torch.no_grad()
    def update(self, sigma, loss) -> None:
        """Add one batch: sigma [n], loss [n] (per-example x0-loss)."""
        s = torch.as_tensor(sigma).detach().reshape(-1)
        l_ = torch.as_tensor(loss).detach().to(device="cpu", dtype=torch.float64).reshape(-1)
        if s.numel() != l_.numel():
            raise ValueError(f"SigmaBinTracker.update: {s.numel()} sigmas but {l_.numel()} losses")
        idx = self.bin_index(s)
        self._sum.mul_(self.decay).index_add_(0, idx, l_)
        self._weight.mul_(self.decay).index_add_(0, idx, torch.ones_like(l_))
        self.counts.index_add_(0, idx, torch.ones_like(idx))

    @property
    def mean(self) -> torch.Tensor:
        """Running mean x0-loss per bin (float64), NaN where the bin has seen nothing."""
        out = torch.full_like(self._sum, float("nan"))
        seen = self._weight > 0
        out[seen] = self._sum[seen] / self._weight[seen]
        return out

    def state_dict(self) -> dict:
        return {"sigma_min": self.sigma_min, "sigma_max": self.sigma_max, "num_bins": self.num_bins,
                "decay": self.decay, "sum": self._sum.clone(), "weight": self._weight.clone(),
                "counts": self.counts.clone()}

    def load_state_dict(self, state: dict) -> None:
        layout = (state["sigma_min"], state["sigma_max"], state["num_bins"])
        if layout != (self.sigma_min, self.sigma_max, self.num_bins):
            raise ValueError(f"SigmaBinTracker.load_state_dict: saved bins (σ_min, σ_max, n) = {layout} do not match "
                             f"{(self.sigma_min, self.sigma_max, self.num_bins)}")
        self.decay = float(state["decay"])
        self._sum = state["sum"].clone().to(torch.float64)
        self._weight = state["weight"].clone().to(torch.float64)
        self.counts = state["counts"].clone().to(torch.int64)

    def summary(self) -> dict:
        """JSON-ready view (NaN → None) for log.jsonl."""
        mean = self.mean.tolist()
        return {"sigma_bin_centers": [float(f"{c:.6g}") for c in self.centers.tolist()],
                "sigma_bin_x0_loss": [None if math.isnan(m) else m for m in mean],
                "sigma_bin_counts": self.counts.tolist()}
