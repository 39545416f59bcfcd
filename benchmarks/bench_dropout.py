"""What the stream-keyed dropout (models/dropout.py) costs: one training forward + backward of an EDM2 net with
its masks hashed from the images' stream positions, against the same net with torch's dropout, timed side by side
(alternating, so both see the same machine load).

    python benchmarks/bench_dropout.py                               # t3 on 8×8×1, batch 128, CPU
    python benchmarks/bench_dropout.py --size xs --resolution 64 --channels 4 --batch 32 --device cuda --bf16
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from models.dropout import dropout_stream
from models.family import build


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

    def step(keyed: bool) -> float:
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        t = time.perf_counter()
        stream = dropout_stream(net, 0, positions) if keyed else torch.autograd.graph.saved_tensors_hooks(
            lambda a: a, lambda a: a)
        with stream, torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            out, logvar = net(x, c_noise)
        (out.float().square().mean() + logvar.float().mean()).backward()
        net.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - t

    for keyed in (True, False):  # warm-up
        step(keyed)
    times = {True: [], False: []}
    for _ in range(args.repeats):
        for keyed in (True, False):
            times[keyed].append(step(keyed))
    keyed, plain = statistics.median(times[True]), statistics.median(times[False])
    print(f"{args.size} {args.channels}x{args.resolution}x{args.resolution} batch {args.batch} on {device}"
          f"{' bf16' if args.bf16 else ''}, dropout {args.dropout}: forward+backward {plain * 1e3:.1f} ms with "
          f"torch's dropout, {keyed * 1e3:.1f} ms with stream-keyed masks (ratio {keyed / plain:.3f}; medians "
          f"of {args.repeats})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
