"""Named model sizes -> EDM2 U-Net architectures, with parameter and training-FLOP counts.

Two ladders of the same design (models/edm2.py), differing only in width:
  * paper sizes xs s m l xl xxl — EDM2's family (model_channels 128…448, channel_mult [1,2,3,4], 3 blocks per
    level, attention at 16×16 and 8×8). At resolution 64, 4 channels, 1000 labels (EDM2's ImageNet-512 latent
    models) count_params gives 124.7M 280.2M 497.8M 777.5M 1119.3M 1523.2M: EDM2's published sizes, which count
    every trainable parameter of the network — U-Net, class embedding, the log-variance head (128 weights) and the
    scalar gains — but not the fixed Fourier-frequency buffers.
  * tiny sizes t0…t6 for 8×8 data (sklearn digits) that train on a CPU. Defaults, chosen for 8×8:
    channel_mult [1,2,2] (levels 8, 4, 2: three levels so the bottleneck still sees the whole digit), 2 blocks per
    level (paper: 3; fewer keeps t0 fast), attention at 4×4 (plus the decoder's first bottleneck block, always
    attended, as in EDM2), 32 channels per head (paper: 64, too wide for 8–128 channels; at least one head), widths
    8, 12, 16, 24, 32, 48, 64 (≈ 80× in parameters, so a scaling fit spans almost two decades).
Every size builds for any resolution divisible by 2^(levels−1) and any channel / label count (e.g. 32×32×3 CIFAR);
the attention resolutions are absolute, as in EDM2, so at other resolutions attention follows the feature-map size.

Dropout: EDM2's option, default 0 here for every size (EDM2 itself used 0.10 for its M and larger ImageNet models);
pass dropout=… through build(…, dropout=0.1) or a config's overrides.

FLOPs are counted, not estimated: torch.utils.flop_counter.FlopCounterMode over one forward + backward on the meta
device (no memory, no arithmetic), so they cover exactly the convolutions and matmuls the net runs (2 FLOPs per
multiply-add; EDM2's tables quote multiply-adds, half these numbers, for the forward pass only).
"""

from __future__ import annotations

import argparse
import functools
import inspect
import math
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

from models.edm2 import EDM2UNet

_PAPER = dict(channel_mult=(1, 2, 3, 4), num_blocks=3, attn_resolutions=(16, 8), channels_per_head=64)
_TINY = dict(channel_mult=(1, 2, 2), num_blocks=2, attn_resolutions=(4,), channels_per_head=32)

# name -> architecture (everything but the data shape). Only model_channels changes along each ladder.
SIZES: dict[str, dict] = {
    "xs": dict(model_channels=128, **_PAPER),
    "s": dict(model_channels=192, **_PAPER),
    "m": dict(model_channels=256, **_PAPER),
    "l": dict(model_channels=320, **_PAPER),
    "xl": dict(model_channels=384, **_PAPER),
    "xxl": dict(model_channels=448, **_PAPER),
    "t0": dict(model_channels=8, **_TINY),
    "t1": dict(model_channels=12, **_TINY),
    "t2": dict(model_channels=16, **_TINY),
    "t3": dict(model_channels=24, **_TINY),
    "t4": dict(model_channels=32, **_TINY),
    "t5": dict(model_channels=48, **_TINY),
    "t6": dict(model_channels=64, **_TINY),
}
PAPER_SIZES = ("xs", "s", "m", "l", "xl", "xxl")
TINY_SIZES = tuple(n for n in SIZES if n.startswith("t"))
# EDM2's published parameter counts (millions) of its ImageNet-512 latent models (64×64×4, 1000 classes).
PAPER_PARAMS_M = {"xs": 124.7, "s": 280.2, "m": 497.8, "l": 777.5, "xl": 1119.3, "xxl": 1523.2}


def arch_kwargs(name: str, *, resolution: int, channels: int, label_dim: int = 0, logvar: bool = True,
                **overrides) -> dict:
    """The full EDM2UNet kwargs for size `name` on data [channels, resolution, resolution] with label_dim classes.
    `overrides` (e.g. dropout=0.1, num_blocks=1) replace table entries; `logvar=False` drops the uncertainty head.
    Store the result in a snapshot and rebuild with net_from_kwargs."""
    if name not in SIZES:
        raise KeyError(f"unknown model size {name!r}; known sizes: {', '.join(SIZES)}")
    # Start from every EDM2UNet default, so a stored snapshot is fully self-describing.
    kwargs = {**_unet_defaults(), **SIZES[name]}
    unknown = set(overrides) - set(_unet_defaults())
    if unknown:
        raise KeyError(f"unknown architecture override(s) {sorted(unknown)} for size {name!r}; "
                       f"allowed: {', '.join(_unet_defaults())}")
    kwargs.update(overrides)
    kwargs.update(img_resolution=int(resolution), img_channels=int(channels), label_dim=int(label_dim))
    if not logvar:
        kwargs["logvar_channels"] = 0
    # Lists, not tuples, so the kwargs round-trip through YAML / JSON unchanged.
    return {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}


def net_from_kwargs(kwargs: dict, device="cpu") -> EDM2UNet:
    """Build the net from stored arch kwargs; on device "meta" nothing is allocated."""
    with torch.device(device):
        return EDM2UNet(**kwargs)


def build(name: str, *, resolution: int, channels: int, label_dim: int = 0, device="meta", logvar: bool = True,
          **overrides) -> EDM2UNet:
    """The raw EDM2 U-Net `net(x, c_noise, class_labels=None) -> (F, logvar)` of size `name` (see docs/internals.md).
    Default device "meta": shapes only, for counting; pass "cpu" / "cuda" for a trainable net."""
    kwargs = arch_kwargs(name, resolution=resolution, channels=channels, label_dim=label_dim, logvar=logvar,
                         **overrides)
    return net_from_kwargs(kwargs, device=device)


def count_params(net: torch.nn.Module) -> int:
    """Trainable parameters (EDM2's convention: buffers such as Fourier frequencies are not counted)."""
    return sum(p.numel() for p in net.parameters())


def training_flops_per_image(name: str, *, resolution: int, channels: int, label_dim: int = 0, logvar: bool = True,
                             **overrides) -> int:
    """FLOPs of one training step's forward + backward per image, counted by FlopCounterMode on the meta device
    (the optimizer step is elementwise and not counted). Cached per architecture."""
    kwargs = arch_kwargs(name, resolution=resolution, channels=channels, label_dim=label_dim, logvar=logvar,
                         **overrides)
    return _counted_flops(_freeze(kwargs), training=True)


def forward_flops_per_image(name: str, *, resolution: int, channels: int, label_dim: int = 0, logvar: bool = True,
                            **overrides) -> int:
    """FLOPs of one forward pass per image (sampling / evaluation cost), counted like training_flops_per_image."""
    kwargs = arch_kwargs(name, resolution=resolution, channels=channels, label_dim=label_dim, logvar=logvar,
                         **overrides)
    return _counted_flops(_freeze(kwargs), training=False)


_FLOP_BATCH = 2  # count on two images and divide, so no batch-1 special case can skew the per-image number


@functools.lru_cache(maxsize=None)
def _counted_flops(frozen_kwargs: tuple, training: bool) -> int:
    kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in frozen_kwargs}
    net = net_from_kwargs(kwargs, device="meta")
    # eval(): the forced weight renormalisation (elementwise, uncounted) is skipped, which makes meta tracing
    # twice as fast; the counted convolutions and matmuls are the same as in train mode.
    net.eval()
    b, c, r, k = _FLOP_BATCH, kwargs["img_channels"], kwargs["img_resolution"], kwargs["label_dim"]
    x = torch.zeros(b, c, r, r, device="meta")
    c_noise = torch.zeros(b, device="meta")
    labels = torch.zeros(b, k, device="meta") if k else None
    with FlopCounterMode(display=False) as counter, torch.set_grad_enabled(training):
        out, logvar = net(x, c_noise, labels)
        if training:
            loss = out.sum() + (logvar.sum() if logvar is not None else 0)
            loss.backward()
    return counter.get_total_flops() // b


def _freeze(kwargs: dict) -> tuple:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in kwargs.items()))


def _unet_defaults() -> dict:
    """EDM2UNet's keyword defaults (everything but the data shape)."""
    params = inspect.signature(EDM2UNet.__init__).parameters
    return {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty and k != "label_dim"}


# ----------------------------------------------------------------------------------------------------------------
# CLI


def size_table(names, *, resolution: int, channels: int, label_dim: int, flops: bool = True) -> list[dict]:
    rows = []
    for name in names:
        net = build(name, resolution=resolution, channels=channels, label_dim=label_dim, device="meta")
        row = dict(name=name, model_channels=SIZES[name]["model_channels"], params=count_params(net))
        if flops:
            row["train_gflops"] = training_flops_per_image(
                name, resolution=resolution, channels=channels, label_dim=label_dim) / 1e9
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    has_flops = rows and "train_gflops" in rows[0]
    if has_flops:  # one decimal count for the column, enough that its smallest entry keeps 4 significant figures
        smallest = min(r["train_gflops"] for r in rows)
        decimals = max(2, 3 - math.floor(math.log10(smallest))) if smallest > 0 else 2
    head = f"{'name':<5} {'channels':>8} {'parameters':>15} {'params (M)':>11}"
    head += f" {'train GFLOPs/img':>17}" if has_flops else ""
    lines = [head, "-" * len(head)]
    for r in rows:
        line = f"{r['name']:<5} {r['model_channels']:>8} {r['params']:>15,} {r['params'] / 1e6:>11.3f}"
        line += f" {r['train_gflops']:>17,.{decimals}f}" if has_flops else ""
        lines.append(line)
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.family",
                                     description="EDM2 family sizes: parameters and training FLOPs per image "
                                                 "for one data shape.")
    parser.add_argument("--resolution", type=int, required=True, help="image side (e.g. 8, 32, 64)")
    parser.add_argument("--channels", type=int, required=True, help="image channels (e.g. 1, 3, 4)")
    parser.add_argument("--label-dim", type=int, default=0, help="number of classes (0 = unconditional)")
    parser.add_argument("--names", default=",".join(SIZES),
                        help=f"comma-separated sizes (default: all: {','.join(SIZES)})")
    parser.add_argument("--no-flops", action="store_true", help="skip FLOP counting (parameters only, instant)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.names.split(",") if n.strip()]
    unknown = [n for n in names if n not in SIZES]
    if unknown:
        parser.error(f"--names: unknown size(s) {unknown}; known: {','.join(SIZES)}")
    try:
        rows = size_table(names, resolution=args.resolution, channels=args.channels, label_dim=args.label_dim,
                          flops=not args.no_flops)
    except ValueError as e:  # e.g. a resolution the channel_mult cannot halve down to
        parser.error(str(e))
    print(f"EDM2 family at resolution {args.resolution}, {args.channels} channels, {args.label_dim} labels")
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
