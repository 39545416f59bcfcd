"""The EDM2 magnitude-preserving U-Net (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of
Diffusion Models", arXiv 2312.02696), written from the paper's design (its Fig. 21 and Appendix B).

Every layer is built so that unit-magnitude inputs give unit-magnitude outputs at init and throughout training:
  * MPConv   — conv / linear with no bias; its weight is normalised to unit norm per output channel in the graph
               (and kept there by the trainer: forced weight normalisation) and scaled by 1/sqrt(fan_in), so the
               layer preserves the magnitude.
  * mp_silu  — SiLU divided by its output RMS under a unit Gaussian (0.596).
  * mp_sum   — a weighted sum (lerp) rescaled so that two independent unit-magnitude inputs give unit magnitude.
  * mp_cat   — concatenation whose two halves are weighted so the result has unit magnitude and the given balance.
  * pixel norm in the encoder; cosine attention (q, k, v pixel-normalised per head).
  * learned scalar gains, initialised at zero, wherever a signal may need to grow beyond unit magnitude (the class/
    noise embedding's effect on each block and the final output), so the network starts as F = 0.

Preconditioning (c_skip, c_out, c_in, c_noise) is NOT here: this module is the raw network
    net(x, c_noise, class_labels=None) -> (F, logvar)
and models/diffusion.py + models/denoiser.py wrap it (docs/internals.md). `logvar` [B] is EDM2's learned per-σ
log-variance u(σ) (the uncertainty head), or None when built with logvar_channels=0.

Forced weight normalisation (EDM2's unit-norm stored weights) is not done here: the forward only normalises in the
graph and never writes a weight.  The trainer renormalises the weights the optimizer owns after every step
(models/weight_norm.py), which under DeepSpeed ZeRO are its fp32 master partitions, not these parameters.
Dropout draws its masks from the images' positions in the training stream (models/dropout.py).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from models.dropout import StreamDropout

SILU_RMS = 0.596  # sqrt(E[silu(z)^2]) for z ~ N(0, 1): dividing by it keeps unit magnitude (paper Eq. 81)
NORM_EPS = 1e-4   # normalize()'s eps: keeps an all-zero slice finite


# ----------------------------------------------------------------------------------------------------------------
# Magnitude-preserving primitives


def rms_norm(x: torch.Tensor, dim=None, eps: float = NORM_EPS) -> torch.Tensor:
    """eps + the RMS of x over `dim` (default: all but the first), kept as size-1 dims, in float32 even under
    autocast: what `normalize` divides by."""
    if dim is None:
        dim = list(range(1, x.ndim))
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    # vector_norm is sqrt(n)·RMS; dividing by sqrt(n) turns it into the RMS, so the result has unit RMS.
    return eps + norm * math.sqrt(norm.numel() / x.numel())


def normalize(x: torch.Tensor, dim=None, eps: float = NORM_EPS) -> torch.Tensor:
    """Scale x to unit RMS over `dim` (default: all but the first); eps keeps an all-zero slice finite."""
    return x / rms_norm(x, dim, eps).to(x.dtype)


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x) / SILU_RMS


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """(1-t)·a + t·b, divided by the magnitude that sum has when a, b are independent with unit RMS (Eq. 88)."""
    return a.lerp(b.to(a.dtype), t) / math.sqrt((1 - t) ** 2 + t ** 2)


def mp_cat(a: torch.Tensor, b: torch.Tensor, dim: int = 1, t: float = 0.5) -> torch.Tensor:
    """Concatenate so the result has unit RMS and b contributes fraction t of it (Eq. 103): each part is weighted
    by its balance over sqrt(its own channel count), times a common factor restoring unit magnitude."""
    na, nb = a.shape[dim], b.shape[dim]
    scale = math.sqrt((na + nb) / ((1 - t) ** 2 + t ** 2))
    wa = scale / math.sqrt(na) * (1 - t)
    wb = scale / math.sqrt(nb) * t
    return torch.cat([wa * a, (wb * b).to(a.dtype)], dim=dim)


def resample(x: torch.Tensor, mode: str = "keep") -> torch.Tensor:
    """2× down (2×2 box average) or up (nearest) — EDM2's [1,1] filter, depthwise, so it carries no parameters and
    keeps the magnitude of smooth signals."""
    if mode == "keep":
        return x
    if mode == "down":
        return F.avg_pool2d(x, 2)
    if mode == "up":
        return F.interpolate(x, scale_factor=2, mode="nearest")
    raise ValueError(f"resample mode must be 'keep', 'down' or 'up', got {mode!r}")


class MPFourier(nn.Module):
    """Fourier features of a scalar: sqrt(2)·cos(2π(f·x + φ)) with random fixed f ~ N(0, bandwidth²), φ ~ U[0, 1)
    (Eq. 75). The sqrt(2) makes each feature unit-RMS. Frequencies are buffers: saved with the weights, not trained."""

    def __init__(self, num_channels: int, bandwidth: float = 1.0):
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer("phases", 2 * math.pi * torch.rand(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.outer(x.to(torch.float32), self.freqs.to(torch.float32)) + self.phases.to(torch.float32)
        return (y.cos() * math.sqrt(2)).to(x.dtype)


class MPConv(nn.Module):
    """Magnitude-preserving convolution (kernel (k, k)) or linear layer (kernel ()), without bias (Eq. 47, 66)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: tuple[int, ...]):
        super().__init__()
        self.out_channels = out_channels
        # Unit-Gaussian init: forced normalisation fixes the scale anyway, only the direction matters.
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    def forward(self, x: torch.Tensor, gain=1.0) -> torch.Tensor:
        # Normalised in the graph, so gradients are those of a normalised weight (projected onto the sphere's
        # tangent).  Keeping the stored weight itself on the unit sphere (forced weight normalisation, so the
        # effective learning rate does not decay as norms grow) is the trainer's job: models/weight_norm.py.
        w = normalize(self.weight.to(torch.float32))
        w = w * (gain / math.sqrt(w[0].numel()))  # 1/sqrt(fan_in): unit-RMS input -> unit-RMS output
        w = w.to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return F.conv2d(x, w, padding=w.shape[-1] // 2)


# ----------------------------------------------------------------------------------------------------------------
# Encoder / decoder block (paper Fig. 21)


class Block(nn.Module):
    """One U-Net block: [resample] -> (enc: [1x1 skip conv] -> pixel norm) -> residual branch modulated by the
    embedding -> mp_sum with the main branch -> [cosine self-attention, mp_sum] -> clip."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, *, flavor: str = "enc",
                 resample_mode: str = "keep", attention: bool = False, channels_per_head: int = 64,
                 dropout: float = 0.0, res_balance: float = 0.3, attn_balance: float = 0.3,
                 clip_act: float | None = 256):
        super().__init__()
        if flavor not in ("enc", "dec"):
            raise ValueError(f"Block flavor must be 'enc' or 'dec', got {flavor!r}")
        self.out_channels = out_channels
        self.flavor = flavor
        self.resample_mode = resample_mode
        # EDM2 uses out_channels // channels_per_head heads; at least one, so narrow (tiny) nets keep their attention.
        self.num_heads = max(1, out_channels // channels_per_head) if attention else 0
        if self.num_heads and out_channels % self.num_heads:
            raise ValueError(f"attention: {out_channels} channels do not split into {self.num_heads} heads "
                             f"(channels_per_head={channels_per_head})")
        self.res_balance = res_balance
        self.attn_balance = attn_balance
        self.clip_act = clip_act
        # Zero-init gain: the embedding starts with no effect (modulation factor exactly 1) and learns its strength.
        self.emb_gain = nn.Parameter(torch.zeros([]))
        # An encoder block changes width on its main branch (skip conv first); a decoder block inside the residual.
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, kernel=(3, 3))
        self.emb_linear = MPConv(emb_channels, out_channels, kernel=())
        self.conv_res1 = MPConv(out_channels, out_channels, kernel=(3, 3))
        self.conv_skip = MPConv(in_channels, out_channels, kernel=(1, 1)) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, kernel=(1, 1)) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, kernel=(1, 1)) if self.num_heads else None
        self.drop = StreamDropout(dropout)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # Main branch.
        x = resample(x, self.resample_mode)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)  # pixel norm: each pixel's feature vector to unit RMS (no normalisation layers)

        # Residual branch; the embedding modulates multiplicatively around 1 (no additive bias anywhere).
        y = self.conv_res0(mp_silu(x))
        c = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = mp_silu(y * c[:, :, None, None].to(y.dtype))
        y = self.drop(y)
        y = self.conv_res1(y)

        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)

        if self.num_heads:
            x = mp_sum(x, self._attention(x), t=self.attn_balance)

        # Clip rare huge activations (a guard for fp16 training; a no-op in normal operation).
        if self.clip_act is not None:
            x = x.clamp(-self.clip_act, self.clip_act)
        return x

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        """Cosine attention: q, k, v are pixel-normalised per head, so logits are cosines scaled by 1/sqrt(d)."""
        b, c, h, w = x.shape
        qkv = self.attn_qkv(x).reshape(b, self.num_heads, -1, 3, h * w)  # [B, heads, head_dim, 3, HW]
        q, k, v = normalize(qkv, dim=2).unbind(3)
        logits = torch.einsum("bhcq,bhck->bhqk", q, k / math.sqrt(q.shape[2]))
        y = torch.einsum("bhqk,bhck->bhcq", logits.softmax(dim=3).to(v.dtype), v)
        return self.attn_proj(y.reshape(b, c, h, w))


# ----------------------------------------------------------------------------------------------------------------
# The U-Net


class EDM2UNet(nn.Module):
    """EDM2 U-Net F(x, c_noise, class_labels) -> (F, logvar).

    Levels run at img_resolution >> level with model_channels·channel_mult[level] channels. The encoder has an
    input conv then num_blocks blocks per level (a downsampling block first on levels > 0); the decoder has two
    blocks at the bottom (the first with attention), an upsampling block on the other levels, and num_blocks + 1
    blocks per level each consuming one encoder skip through mp_cat. Attention sits in blocks whose resolution is
    in attn_resolutions.
    """

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, *,
                 model_channels: int = 192, channel_mult=(1, 2, 3, 4), channel_mult_noise: int | None = None,
                 channel_mult_emb: int | None = None, num_blocks: int = 3, attn_resolutions=(16, 8),
                 label_balance: float = 0.5, concat_balance: float = 0.5, logvar_channels: int = 128,
                 channels_per_head: int = 64, dropout: float = 0.0, res_balance: float = 0.3,
                 attn_balance: float = 0.3, clip_act: float | None = 256):
        super().__init__()
        _check_shape_args(img_resolution, img_channels, label_dim, model_channels, channel_mult, num_blocks, dropout)
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.label_balance = label_balance
        self.concat_balance = concat_balance
        cblock = [model_channels * m for m in channel_mult]
        cnoise = model_channels * channel_mult_noise if channel_mult_noise is not None else cblock[0]
        cemb = model_channels * channel_mult_emb if channel_mult_emb is not None else max(cblock)
        block_kw = dict(channels_per_head=channels_per_head, dropout=dropout, res_balance=res_balance,
                        attn_balance=attn_balance, clip_act=clip_act)
        # Zero-init output gain: the untrained net outputs F = 0, so D starts as the c_skip·x baseline.
        self.out_gain = nn.Parameter(torch.zeros([]))

        # Embedding: Fourier features of c_noise -> linear; class one-hot -> linear; mp_sum; mp_silu.
        self.emb_fourier = MPFourier(cnoise)
        self.emb_noise = MPConv(cnoise, cemb, kernel=())
        self.emb_label = MPConv(label_dim, cemb, kernel=()) if label_dim else None

        # Encoder. The input gets a constant-1 channel so the first conv (no bias) can still see an offset and the
        # image borders (zero padding makes the ones channel drop at the edge).
        self.enc = nn.ModuleDict()
        cout = img_channels + 1
        for level, width in enumerate(cblock):
            res = img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = MPConv(cout, width, kernel=(3, 3))
                cout = width
            else:
                self.enc[f"{res}x{res}_down"] = Block(cout, cout, cemb, flavor="enc", resample_mode="down",
                                                      **block_kw)
            for i in range(num_blocks):
                self.enc[f"{res}x{res}_block{i}"] = Block(cout, width, cemb, flavor="enc",
                                                          attention=res in attn_resolutions, **block_kw)
                cout = width

        # Decoder: every encoder output is a skip, consumed in reverse order.
        skips = [m.out_channels for m in self.enc.values()]
        self.dec = nn.ModuleDict()
        for level, width in reversed(list(enumerate(cblock))):
            res = img_resolution >> level
            if level == len(cblock) - 1:
                self.dec[f"{res}x{res}_in0"] = Block(cout, cout, cemb, flavor="dec", attention=True, **block_kw)
                self.dec[f"{res}x{res}_in1"] = Block(cout, cout, cemb, flavor="dec", **block_kw)
            else:
                self.dec[f"{res}x{res}_up"] = Block(cout, cout, cemb, flavor="dec", resample_mode="up", **block_kw)
            for i in range(num_blocks + 1):
                self.dec[f"{res}x{res}_block{i}"] = Block(cout + skips.pop(), width, cemb, flavor="dec",
                                                          attention=res in attn_resolutions, **block_kw)
                cout = width
        self.out_conv = MPConv(cout, img_channels, kernel=(3, 3))

        # Uncertainty head u(σ): its own Fourier features of c_noise -> one linear unit (EDM2 Eq. 21).
        if logvar_channels:
            self.logvar_fourier = MPFourier(logvar_channels)
            self.logvar_linear = MPConv(logvar_channels, 1, kernel=())
        else:
            self.logvar_fourier = self.logvar_linear = None

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, class_labels: torch.Tensor | None = None):
        c_noise = self._check_inputs(x, c_noise)
        emb = self.emb_noise(self.emb_fourier(c_noise))
        if self.emb_label is not None:
            labels = self._label_matrix(class_labels, x)
            # One-hot times sqrt(label_dim) has unit RMS, as every MPConv input should.
            emb = mp_sum(emb, self.emb_label(labels * math.sqrt(labels.shape[1])), t=self.label_balance)
        emb = mp_silu(emb)

        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for name, block in self.enc.items():
            x = block(x) if name.endswith("_conv") else block(x, emb)
            skips.append(x)
        for name, block in self.dec.items():
            if "_block" in name:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = block(x, emb)
        out = self.out_conv(x, gain=self.out_gain)

        logvar = None
        if self.logvar_linear is not None:
            logvar = self.logvar_linear(self.logvar_fourier(c_noise)).reshape(-1)
        return out, logvar

    # -- input handling ------------------------------------------------------------------------------------------

    def _check_inputs(self, x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        return check_net_inputs(x, c_noise, (self.img_channels, self.img_resolution, self.img_resolution), "EDM2UNet")

    def _label_matrix(self, class_labels: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        return label_matrix(class_labels, x, self.label_dim).to(torch.float32)


def check_net_inputs(x: torch.Tensor, c_noise, expect: tuple, who: str) -> torch.Tensor:
    """Check a raw net's input x [B, C, H, W] against `expect` (C, H, W); c_noise as one value per image [B]."""
    if x.ndim != 4 or tuple(x.shape[1:]) != expect:
        raise ValueError(f"{who} input x must have shape [B, {expect[0]}, {expect[1]}, {expect[2]}], "
                         f"got {list(x.shape)}")
    c_noise = torch.as_tensor(c_noise, device=x.device).reshape(-1)
    if c_noise.numel() == 1:
        c_noise = c_noise.expand(x.shape[0])
    if c_noise.shape[0] != x.shape[0]:
        raise ValueError(f"c_noise must have one value per image ([{x.shape[0]}]), got {c_noise.shape[0]}")
    return c_noise


def label_matrix(class_labels: torch.Tensor | None, x: torch.Tensor, label_dim: int) -> torch.Tensor:
    """One-hot labels [B, label_dim] for a batch like x. None means 'no label': zeros (float32), as EDM2 does for
    its unconditional fallback. Integer class indices [B] are one-hot encoded (float32); one-hot input is checked
    and returned as given."""
    b = x.shape[0]
    if class_labels is None:
        return torch.zeros(b, label_dim, device=x.device, dtype=torch.float32)
    if not class_labels.is_floating_point():
        if class_labels.ndim != 1 or class_labels.shape[0] != b:
            raise ValueError(f"integer class_labels must have shape [{b}], got {list(class_labels.shape)}")
        checkable = b and class_labels.device.type != "meta"  # meta tensors have no values to check
        if checkable and (class_labels.min() < 0 or class_labels.max() >= label_dim):
            raise ValueError(f"class_labels must lie in [0, {label_dim}), got "
                             f"[{int(class_labels.min())}, {int(class_labels.max())}]")
        return F.one_hot(class_labels, label_dim).to(torch.float32)
    if tuple(class_labels.shape) != (b, label_dim):
        raise ValueError(f"class_labels must be one-hot [{b}, {label_dim}], got {list(class_labels.shape)}")
    return class_labels


def _check_shape_args(img_resolution, img_channels, label_dim, model_channels, channel_mult, num_blocks, dropout):
    if img_channels < 1 or model_channels < 1 or label_dim < 0 or num_blocks < 1 or not channel_mult:
        raise ValueError(f"EDM2UNet: need img_channels>=1, model_channels>=1, label_dim>=0, num_blocks>=1 and a "
                         f"non-empty channel_mult; got img_channels={img_channels}, model_channels={model_channels}, "
                         f"label_dim={label_dim}, num_blocks={num_blocks}, channel_mult={list(channel_mult)}")
    levels = len(channel_mult)
    if img_resolution < 1 or img_resolution % (1 << (levels - 1)):
        raise ValueError(f"EDM2UNet: resolution {img_resolution} must be divisible by 2^{levels - 1} = "
                         f"{1 << (levels - 1)} for channel_mult {list(channel_mult)} ({levels} levels)")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"EDM2UNet: dropout must be in [0, 1), got {dropout}")
