"""What the stream-keyed dropout (models/dropout.py) costs: one training forward + backward of an EDM2 net with
its masks hashed from the images' stream positions, against the same net with torch's dropout, timed side by side
(alternating, so all see the same machine load); `first version` is the first release's mask code (its keys made
tensors from host ints, a copy to the device per layer, and its hash 27 passes and a stacked copy), kept here to
compare with: both draw the same masks.

    python benchmarks/bench_dropout.py                               # t3 on 8×8×1, batch 128, CPU
    python benchmarks/bench_dropout.py --size xs --resolution 64 --channels 4 --batch 32 --device cuda --bf16
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from models import dropout
from models.dropout import dropout_stream, mix32
from models.family import build

_MASK32 = 0xFFFFFFFF


def _absorb_first_version(key, value):
    value = torch.as_tensor(value, dtype=torch.int64, device=key.device)
    key = mix32(key ^ (value & _MASK32))
    return mix32(key ^ (value >> 32 & _MASK32))


def keep_mask_first_version(seed, layer, positions, numel, p):
    """models.dropout.keep_mask as first released (the same masks)."""
    pairs = (numel + 1) // 2
    base = _absorb_first_version(_absorb_first_version(torch.zeros((), dtype=torch.int64, device=positions.device),
                                                       seed), layer)
    k1 = _absorb_first_version(base, positions.to(torch.int64))
    k2 = mix32(k1 ^ 0x9E3779B9)
    counter = torch.arange(pairs, dtype=torch.int64, device=positions.device)
    u = mix32(mix32(counter[None] ^ k1[:, None]) ^ k2[:, None])
    threshold = round(p * 65536)
    keep = torch.stack([(u & 0xFFFF) >= threshold, (u >> 16) >= threshold], dim=2)
    return keep.reshape(positions.shape[0], 2 * pairs)[:, :numel]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="t3")
    p.add_argument("--resolution", type=int, default=8)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast around the forward")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--mask-numel", type=int, default=256 * 16 * 16, help="elements per image, masks alone")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    torch.manual_seed(0)
    net = build(args.size, resolution=args.resolution, channels=args.channels, device=device,
                dropout=args.dropout).train()
    x = torch.randn(args.batch, args.channels, args.resolution, args.resolution, device=device)
    c_noise = torch.zeros(args.batch, device=device)
    positions = torch.arange(args.batch, device=device)

    current = dropout.keep_mask
    masks = {"torch": None, "first version": keep_mask_first_version, "current": current}

    def step(kind: str) -> float:
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        dropout.keep_mask = masks[kind] or current
        sync()
        t = time.perf_counter()
        stream = dropout_stream(net, 0, positions) if masks[kind] else contextlib.nullcontext()
        with stream, torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            out, logvar = net(x, c_noise)
        (out.float().square().mean() + logvar.float().mean()).backward()
        net.zero_grad(set_to_none=True)
        sync()
        dropout.keep_mask = current
        return time.perf_counter() - t

    assert torch.equal(keep_mask_first_version(3, 1, positions, 999, 0.1), current(3, 1, positions, 999, 0.1))
    for kind in masks:  # warm-up
        step(kind)
    times = {kind: [] for kind in masks}
    for _ in range(args.repeats):
        for kind in masks:
            times[kind].append(step(kind))
    med = {kind: statistics.median(t) for kind, t in times.items()}
    print(f"{args.size} {args.channels}x{args.resolution}x{args.resolution} batch {args.batch} on {device}"
          f"{' bf16' if args.bf16 else ''}, dropout {args.dropout}: forward+backward (medians of {args.repeats}, "
          "interleaved)")
    for kind in masks:
        print(f"  {kind:14s} {med[kind] * 1e3:8.1f} ms   {med[kind] / med['torch']:.3f}x torch's dropout")
    print(f"  current / first version: {med['current'] / med['first version']:.3f}")
    masks_alone(args, device)


def masks_alone(args, device) -> None:
    """The masks of one layer's activation alone (--mask-numel elements per image), both versions interleaved."""
    positions = torch.arange(args.batch, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = {"first version": [], "current": []}
    for repeat in range(args.repeats + 1):
        for kind, fn in (("first version", keep_mask_first_version), ("current", dropout.keep_mask)):
            sync()
            t = time.perf_counter()
            fn(0, 3, positions, args.mask_numel, args.dropout)
            sync()
            if repeat:  # the first round warms up
                times[kind].append(time.perf_counter() - t)
    first, current = (statistics.median(times[k]) for k in ("first version", "current"))
    print(f"  masks alone ({args.batch} x {args.mask_numel:,} elements): first version {first * 1e3:.2f} ms, "
          f"current {current * 1e3:.2f} ms (ratio {current / first:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
