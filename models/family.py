"""Named model sizes -> architectures of two families, with parameter and training-FLOP counts.

One table (SIZES) names every size; FAMILY says which network builds it: "edm2" (the EDM2 U-Net, models/edm2.py)
or "dit" (the diffusion transformer, models/dit.py). Both take (x, c_noise, labels) -> (F, logvar), so the
Denoiser, the trainer and every launcher treat them alike; a study's model table names any of them (`d3: {arch: d3}`).

EDM2 U-Net: two ladders of the same design, differing only in width:
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

DiT (adaLN-Zero, patch 2, MLP ratio 4): two ladders, each growing depth and width together.
  * paper sizes dit12 dit15 dit19 dit24 dit27 — the depth-scaled ladder of DiT scaling studies: width 64·depth,
    heads = depth (head width 64), depths 12, 15, 19, 24, 27. At 32×32×4 latents (ImageNet-256 through the SD VAE)
    with 1000 labels: 130.3M 253.1M 512.1M 1028.8M 1463.1M parameters (`--family dit`).
  * CPU sizes d0…d5 for 8×8 data — width 16·depth, heads = depth (head width 16), depths 3, 4, 5, 6, 8, 10:
    0.147M … 4.75M parameters on 8×8×1 digits (32×), 0.0088 … 0.31 GFLOPs per training image, t0…t5's range
    (0.010 … 0.37): with 16 tokens a DiT spends about as many FLOPs per parameter as the tiny U-Net.

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

from models.dit import DiT
from models.edm2 import EDM2UNet

# The tables (names, ladders, families) live in models.sizes, which imports no torch: the Snakefile reads them at
# DAG time.
from models.sizes import FAMILY, SIZES, family_of

FAMILIES = {"edm2": EDM2UNet, "dit": DiT}  # family -> constructor


def arch_kwargs(name: str, *, resolution: int, channels: int, label_dim: int = 0, logvar: bool = True,
                **overrides) -> dict:
    """The full constructor kwargs for size `name` on data [channels, resolution, resolution] with label_dim
    classes. `overrides` (e.g. dropout=0.1, num_blocks=1) replace table entries; `logvar=False` drops the
    uncertainty head. A DiT's kwargs carry family="dit" (EDM2's carry no marker, as before). Store the result in a
    snapshot and rebuild with net_from_kwargs."""
    fam = family_of(name)
    # Start from every constructor default, so a stored snapshot is fully self-describing.
    defaults = _defaults(FAMILIES[fam])
    kwargs = {**defaults, **SIZES[name]}
    unknown = set(overrides) - set(defaults)
    if unknown:
        raise KeyError(f"unknown architecture override(s) {sorted(unknown)} for size {name!r}; "
                       f"allowed: {', '.join(defaults)}")
    kwargs.update(overrides)
    kwargs.update(img_resolution=int(resolution), img_channels=int(channels), label_dim=int(label_dim))
    if not logvar:
        kwargs["logvar_channels"] = 0
    if fam != "edm2":
        kwargs["family"] = fam
    # Lists, not tuples, so the kwargs round-trip through YAML / JSON unchanged.
    return {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}


def net_from_kwargs(kwargs: dict, device="cpu") -> torch.nn.Module:
    """Build the net from stored arch kwargs (family from kwargs["family"], default "edm2"); on device "meta"
    nothing is allocated."""
    kwargs = dict(kwargs)
    fam = kwargs.pop("family", "edm2")
    if fam not in FAMILIES:
        raise ValueError(f"arch kwargs: unknown family {fam!r}; known: {', '.join(FAMILIES)}")
    with torch.device(device):
        return FAMILIES[fam](**kwargs)


def build(name: str, *, resolution: int, channels: int, label_dim: int = 0, device="meta", logvar: bool = True,
          **overrides) -> torch.nn.Module:
    """The raw network `net(x, c_noise, class_labels=None) -> (F, logvar)` of size `name` (see docs/internals.md):
    an EDM2 U-Net or a DiT. Default device "meta": shapes only, for counting; pass "cpu" / "cuda" to train."""
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
    return training_flops_of(kwargs)


def training_flops_of(kwargs: dict) -> int:
    """training_flops_per_image of a net given by its complete kwargs (a snapshot's / the trainer's arch kwargs):
    the one FLOP counter, used by the plan and recorded by the trainer."""
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


def _defaults(cls) -> dict:
    """A family constructor's keyword defaults (everything but the data shape)."""
    params = inspect.signature(cls.__init__).parameters
    return {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty and k != "label_dim"}


# ----------------------------------------------------------------------------------------------------------------
# CLI


def size_table(names, *, resolution: int, channels: int, label_dim: int, flops: bool = True) -> list[dict]:
    rows = []
    for name in names:
        net = build(name, resolution=resolution, channels=channels, label_dim=label_dim, device="meta")
        row = dict(name=name, family=FAMILY[name], params=count_params(net))
        if FAMILY[name] == "edm2":
            row["model_channels"] = SIZES[name]["model_channels"]
        else:
            row.update(depth=SIZES[name]["depth"], width=SIZES[name]["hidden_size"], heads=SIZES[name]["num_heads"])
        if flops:
            row["train_gflops"] = training_flops_per_image(
                name, resolution=resolution, channels=channels, label_dim=label_dim) / 1e9
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    """The U-Net table (name, channels, …) or, when every row is a DiT, (name, depth, width, heads, …)."""
    has_flops = rows and "train_gflops" in rows[0]
    if has_flops:  # one decimal count for the column, enough that its smallest entry keeps 4 significant figures
        smallest = min(r["train_gflops"] for r in rows)
        decimals = max(2, 3 - math.floor(math.log10(smallest))) if smallest > 0 else 2
    dit = bool(rows) and all(r["family"] == "dit" for r in rows)
    arch_head = f"{'depth':>5} {'width':>5} {'heads':>5}" if dit else f"{'channels':>8}"
    head = f"{'name':<5} {arch_head} {'parameters':>15} {'params (M)':>11}"
    head += f" {'train GFLOPs/img':>17}" if has_flops else ""
    lines = [head, "-" * len(head)]
    for r in rows:
        arch = (f"{r['depth']:>5} {r['width']:>5} {r['heads']:>5}" if dit
                else f"{r.get('model_channels', r['family']):>8}")
        line = f"{r['name']:<5} {arch} {r['params']:>15,} {r['params'] / 1e6:>11.3f}"
        line += f" {r['train_gflops']:>17,.{decimals}f}" if has_flops else ""
        lines.append(line)
    return "\n".join(lines)


_TITLES = {"edm2": "EDM2 family", "dit": "DiT family (patch 2, MLP ratio 4)"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.family",
                                     description="Model sizes of one family: parameters and training FLOPs per "
                                                 "image for one data shape.")
    parser.add_argument("--resolution", type=int, required=True, help="image side (e.g. 8, 32, 64)")
    parser.add_argument("--channels", type=int, required=True, help="image channels (e.g. 1, 3, 4)")
    parser.add_argument("--label-dim", type=int, default=0, help="number of classes (0 = unconditional)")
    parser.add_argument("--family", choices=sorted(FAMILIES), default="edm2",
                        help="which family's sizes to list (default edm2: the U-Net)")
    parser.add_argument("--names", default=None,
                        help="comma-separated sizes of that family (default: all of them; known: "
                             f"{','.join(SIZES)})")
    parser.add_argument("--no-flops", action="store_true", help="skip FLOP counting (parameters only, instant)")
    args = parser.parse_args(argv)
    members = [n for n in SIZES if FAMILY[n] == args.family]
    names = [n.strip() for n in args.names.split(",") if n.strip()] if args.names is not None else members
    unknown = [n for n in names if n not in SIZES]
    if unknown:
        parser.error(f"--names: unknown size(s) {unknown}; known: {','.join(SIZES)}")
    other = [n for n in names if FAMILY[n] != args.family]
    if other:
        parser.error(f"--names: size(s) {other} are not of family {args.family!r} (pass --family {FAMILY[other[0]]})")
    try:
        rows = size_table(names, resolution=args.resolution, channels=args.channels, label_dim=args.label_dim,
                          flops=not args.no_flops)
    except ValueError as e:  # e.g. a resolution the channel_mult cannot halve down to
        parser.error(str(e))
    print(f"{_TITLES[args.family]} at resolution {args.resolution}, {args.channels} channels, "
          f"{args.label_dim} labels")
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
