"""The denoiser D(x; σ) in VE-x0 coordinates: a raw network F wrapped in a variant's preconditioning.

    D(x; σ) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x, c_noise(σ), labels)

Evaluation, sampling and diagnosis only ever call this (docs/internals.md).  `Denoiser.from_snapshot` rebuilds the
network (models.family.build from the snapshot's `arch`) and the variant (models.diffusion.get_variant from its
`variant`) and loads the EMA weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F_nn
from torch import nn

from models import family
from models.diffusion import get_variant
from study.integrity import load_torch


class Denoiser(nn.Module):
    def __init__(self, net: nn.Module, variant, label_dim: int | None = None):
        super().__init__()
        self.net = net
        self.variant = variant
        self.label_dim = int(label_dim if label_dim is not None else getattr(net, "label_dim", 0) or 0)

    def one_hot(self, labels, batch: int, device) -> torch.Tensor | None:
        """Labels as the net wants them: one-hot float [B, label_dim], or None for an unconditional net.
        Accepts class indices [B] (int) or one-hot [B, label_dim]."""
        if self.label_dim == 0:
            if labels is not None:
                raise ValueError("Denoiser: labels given but the network is unconditional (label_dim = 0)")
            return None
        if labels is None:
            return None  # the net's own "no label" convention (EDM2: zeros)
        labels = torch.as_tensor(labels, device=device)
        if labels.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):
            if labels.shape != (batch,):
                raise ValueError(f"Denoiser: class indices must have shape [{batch}], got {list(labels.shape)}")
            if batch and (int(labels.min()) < 0 or int(labels.max()) >= self.label_dim):
                raise ValueError(f"Denoiser: class indices must lie in [0, {self.label_dim}), got "
                                 f"[{int(labels.min())}, {int(labels.max())}]")
            return F_nn.one_hot(labels.long(), self.label_dim).to(torch.float32)
        if labels.shape != (batch, self.label_dim):
            raise ValueError(f"Denoiser: one-hot labels must have shape [{batch}, {self.label_dim}], "
                             f"got {list(labels.shape)}")
        return labels.to(torch.float32)

    def forward(self, x: torch.Tensor, sigma, labels=None, *, return_logvar: bool = False):
        """D(x; σ) for x [B, C, H, W] and σ a scalar or [B] (VE).  With return_logvar, also the net's learned
        log-variance [B] (or None)."""
        b = x.shape[0]
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(b)
        sigma = sigma.reshape(b)
        if sigma.device.type != "meta" and not bool(torch.all(sigma > 0)):
            raise ValueError(f"Denoiser: σ must be > 0, got min {float(sigma.min())}")
        x32 = x.to(torch.float32)
        c_skip, c_out, c_in, c_noise = (c.to(torch.float32) for c in self.variant.precond(sigma))
        view = (b,) + (1,) * (x.ndim - 1)
        # the net's input in its own parameter dtype (float32 in training, where bf16 is autocast; a net cast to
        # half precision for evaluation gets half-precision inputs); c_skip·x and the output stay in float32
        net_in = (c_in.reshape(view) * x32).to(self._param_dtype())
        F_x, logvar = self.net(net_in, c_noise.reshape(b), self.one_hot(labels, b, x.device))
        D = c_skip.reshape(view) * x32 + c_out.reshape(view) * F_x.to(torch.float32)
        return (D, logvar) if return_logvar else D

    def _param_dtype(self) -> torch.dtype:
        p = next(self.net.parameters(), None)
        return p.dtype if p is not None and p.dtype.is_floating_point else torch.float32

    # ------------------------------------------------------------------------------------------------------
    @classmethod
    def from_snapshot(cls, path, device="cpu", *, weights: str = "ema") -> "Denoiser":
        """Rebuild a snapshot's denoiser (EMA weights by default) in eval mode on `device`."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"snapshot not found: {path}")
        # checked against its sidecar and read as tensors and plain data only: a truncated, corrupted or crafted
        # snapshot is one error naming it and its rebuild command
        snap = load_torch(path)
        missing = [k for k in ("arch", "variant", weights) if not isinstance(snap, dict) or k not in snap]
        if missing:
            raise ValueError(f"{path}: not a training snapshot (missing {', '.join(missing)})")
        net = build_net(snap["arch"], device=device)
        net.load_state_dict(snap[weights])
        variant = get_variant(snap["variant"]["name"], **(snap["variant"].get("kwargs") or {}))
        den = cls(net, variant, label_dim=snap["arch"].get("label_dim", 0))
        den.snapshot_info = {k: snap.get(k) for k in ("model", "images_seen", "flops", "params")}
        den.snapshot_arch = dict(snap["arch"])
        return den.to(device).eval()


def build_net(arch: dict, device="cpu") -> nn.Module:
    """The raw network of a snapshot's `arch` record {name, resolution, channels, label_dim, ...}."""
    if arch.get("kwargs"):  # the exact constructor arguments the run used
        return family.net_from_kwargs(dict(arch["kwargs"]), device=device)
    try:
        return family.build(arch["name"], resolution=int(arch["resolution"]), channels=int(arch["channels"]),
                            label_dim=int(arch.get("label_dim", 0)), device=device)
    except KeyError as e:
        raise ValueError(f"snapshot arch record {arch} lacks {e}") from None
