"""DiT: a diffusion transformer with adaLN-Zero conditioning (Peebles & Xie, "Scalable Diffusion Models with
Transformers", 2023), as the raw network F of models/denoiser.py's preconditioning.

Same interface as models/edm2.py's EDM2UNet, so the Denoiser, the trainer, FLOP counting and every launcher use
it unchanged:  net(x, c_noise, class_labels=None) -> (F [B, C, H, W], logvar [B] or None).

Layout (the paper's Fig. 3):
  patchify   a p×p stride-p convolution turns [B, C, H, W] into T = (H/p)·(W/p) tokens of width `hidden_size`,
             plus fixed 2-D sin-cos positions (not learned);
  condition  c = TimestepEmbedder(c_noise) + LabelEmbedder(labels), one vector per image;
  blocks     `depth` × [x += gate·Attn(modulate(LN(x))); x += gate·MLP(modulate(LN(x)))], where shift, scale and
             gate come from a linear map of SiLU(c) (adaLN); LayerNorms have no affine parameters of their own;
  final      modulate(LN(x)) -> linear to p·p·C values per token -> unpatchify.
Zero init of every modulation map and the output ("adaLN-Zero"): at step 0 each block is the identity and F = 0,
so D(x; σ) starts as the preconditioning's c_skip·x baseline, as the EDM2 U-Net does with its zero output gain.

Differences from the reference implementation, each for this pipeline:
  * the timestep embedder reads c_noise = ln(σ)/4 (models.diffusion) scaled by `noise_scale` = 250, so the
    σ range 0.002…80 spans ~660 "timesteps", like DiT's 1000 discrete steps (same sinusoid frequencies);
  * labels arrive one-hot (the Denoiser's convention), so the label table is a bias-free linear map of the one-hot
    vector — the same numbers as DiT's nn.Embedding; an all-zero row ("no label") embeds to 0. No class-dropout
    token: this trainer does no classifier-free guidance;
  * the MLP's dropout draws its masks from the images' stream positions (models/dropout.py), like the U-Net's;
  * no learned-σ output channels: the uncertainty is EDM2's per-σ log-variance head (logvar_channels Fourier
    features -> one linear unit), the same module the U-Net uses, so both families train with the same loss.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.dropout import StreamDropout
from models.edm2 import MPConv, MPFourier, check_net_inputs, label_matrix


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features [cos(t·ω_i), sin(t·ω_i)] with ω_i = max_period^(−i/half), i < dim/2 (DiT/GLIDE)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.to(torch.float32)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def sincos_pos_embed_2d(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D positions [grid·grid, dim]: half the channels encode the row, half the column, each as 1-D
    sin-cos features with frequencies 10000^(−k/(dim/4)) (MAE / DiT)."""
    if dim % 4:
        raise ValueError(f"DiT: hidden_size must be divisible by 4 for 2-D sin-cos positions, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    coords = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def one_axis(pos):
        out = pos.reshape(-1, 1) * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([one_axis(rows), one_axis(cols)], dim=1).to(torch.float32)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: per-image affine map of normalised tokens x [B, T, D]; scale is around 1 (0 -> identity)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    """Scalar noise level -> sinusoidal features -> Linear, SiLU, Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256, noise_scale: float = 250.0):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.noise_scale = noise_scale
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(c_noise * self.noise_scale, self.frequency_embedding_size)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class Attention(nn.Module):
    """Multi-head self-attention over tokens [B, T, D] (biased qkv and output projections, as in ViT)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)  # [B, heads, T, head_dim], softmax(q·kᵀ/√head_dim)·v
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class DiTBlock(nn.Module):
    """Transformer block whose LayerNorms are modulated, and whose residual branches are gated, by the condition."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden_size, mlp_hidden), nn.GELU(approximate="tanh"),
                                 StreamDropout(dropout), nn.Linear(mlp_hidden, hidden_size))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """Modulated LayerNorm, then a linear map of each token to its p·p·C output values."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """DiT F(x, c_noise, class_labels) -> (F, logvar) on [B, img_channels, img_resolution, img_resolution]."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, *, patch_size: int = 2,
                 hidden_size: int = 384, depth: int = 12, num_heads: int = 6, mlp_ratio: float = 4.0,
                 frequency_embedding_size: int = 256, noise_scale: float = 250.0, logvar_channels: int = 128,
                 dropout: float = 0.0):
        super().__init__()
        _check_args(img_resolution, img_channels, label_dim, patch_size, hidden_size, depth, num_heads, dropout)
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.patch_size = patch_size
        self.grid = img_resolution // patch_size

        self.x_embedder = nn.Conv2d(img_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        # Fixed positions: a buffer, not a parameter (never trained, not counted), rebuilt from the shape on load.
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden_size, self.grid)[None], persistent=False)
        self.t_embedder = TimestepEmbedder(hidden_size, frequency_embedding_size, noise_scale)
        self.y_embedder = nn.Linear(label_dim, hidden_size, bias=False) if label_dim else None
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio, dropout) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, img_channels)

        # Uncertainty head u(σ): EDM2's (its own Fourier features of c_noise -> one linear unit), see models/edm2.py.
        if logvar_channels:
            self.logvar_fourier = MPFourier(logvar_channels)
            self.logvar_linear = MPConv(logvar_channels, 1, kernel=())
        else:
            self.logvar_fourier = self.logvar_linear = None
        self._init_weights()

    def _init_weights(self):
        # Every linear map: Xavier-uniform weights, zero bias (the ViT default DiT keeps).
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        # The patch convolution is a linear map of each flattened patch, so it gets the same Xavier init.
        w = self.x_embedder.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        # Embedding tables start small (std 0.02, as in ViT/DiT) so the condition does not swamp the first steps.
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: zero modulation -> shift = scale = gate = 0, so every block starts as the identity map.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        # Zero output layer: the untrained net outputs F = 0 (D starts as the c_skip·x baseline).
        for p in (*self.final_layer.adaLN_modulation[-1].parameters(), *self.final_layer.linear.parameters()):
            nn.init.zeros_(p)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, class_labels: torch.Tensor | None = None):
        c_noise = self._check_inputs(x, c_noise)
        b, p, g = x.shape[0], self.patch_size, self.grid
        tokens = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed.to(x.dtype)  # [B, T, D]
        c = self.t_embedder(c_noise)
        if self.y_embedder is not None:
            c = c + self.y_embedder(self._label_matrix(class_labels, x).to(c.dtype))
        for block in self.blocks:
            tokens = block(tokens, c)
        out = self.final_layer(tokens, c)  # [B, T, p·p·C]
        # unpatchify: token (i, j) holds the p×p×C values of rows i·p…, columns j·p…
        out = out.reshape(b, g, g, p, p, self.img_channels).permute(0, 5, 1, 3, 2, 4)
        out = out.reshape(b, self.img_channels, g * p, g * p)

        logvar = None
        if self.logvar_linear is not None:
            logvar = self.logvar_linear(self.logvar_fourier(c_noise)).reshape(-1)
        return out, logvar

    # -- input handling (the same rules as EDM2UNet) ---------------------------------------------------------------

    def _check_inputs(self, x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        return check_net_inputs(x, c_noise, (self.img_channels, self.img_resolution, self.img_resolution), "DiT")

    def _label_matrix(self, class_labels: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        return label_matrix(class_labels, x, self.label_dim)


def _check_args(img_resolution, img_channels, label_dim, patch_size, hidden_size, depth, num_heads, dropout):
    if img_channels < 1 or label_dim < 0 or patch_size < 1 or depth < 1 or num_heads < 1:
        raise ValueError(f"DiT: need img_channels>=1, label_dim>=0, patch_size>=1, depth>=1, num_heads>=1; got "
                         f"img_channels={img_channels}, label_dim={label_dim}, patch_size={patch_size}, "
                         f"depth={depth}, num_heads={num_heads}")
    if img_resolution < 1 or img_resolution % patch_size:
        raise ValueError(f"DiT: resolution {img_resolution} must be divisible by patch_size {patch_size}")
    if hidden_size % num_heads or hidden_size % 4:
        raise ValueError(f"DiT: hidden_size {hidden_size} must be divisible by num_heads {num_heads} and by 4")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"DiT: dropout must be in [0, 1), got {dropout}")
