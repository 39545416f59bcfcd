"""Training throughput and model-FLOP utilisation (MFU) of the EDM2 family on one device.

Each size runs full training steps — EDM preconditioning, EDM2's uncertainty-weighted loss, backward, Adam step —
in bf16 autocast (GPU default) on random data of the ImageNet-512 latent shape (64×64×4, 1000 classes), and reports images/s and
MFU = images/s × counted training FLOPs per image / peak FLOP/s. The FLOPs are those of models.family (FlopCounterMode
forward + backward; elementwise work and the optimizer step are not counted, as usual for MFU).

    python benchmarks/bench_train_gpu.py --sizes xs,s,m,l,xl,xxl --batch 256            # on a GPU
    python benchmarks/bench_train_gpu.py --device cpu --sizes t0,t1 --steps 2            # CPU smoke check

The preconditioning is written out here (not imported from models.diffusion) so the benchmark measures the network
alone and runs without the rest of the pipeline.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from models.family import SIZES, build, count_params, training_flops_per_image  # noqa: E402
from models.weight_norm import forced_weights, normalize_forced_weights_  # noqa: E402

SIGMA_DATA, P_MEAN, P_STD = 0.5, -0.4, 1.0  # EDM2's ImageNet-512 latent settings


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type}:{platform.processor() or platform.machine()}"


def edm2_loss(net, x0, labels):
    """One EDM2 training loss: log-normal σ, D = c_skip·x + c_out·F(c_in·x, ln σ / 4), weighted by λ(σ)/e^u + u."""
    sigma = (torch.randn(x0.shape[0], device=x0.device) * P_STD + P_MEAN).exp()
    s = sigma[:, None, None, None]
    x = x0 + s * torch.randn_like(x0)
    c_skip = SIGMA_DATA ** 2 / (s ** 2 + SIGMA_DATA ** 2)
    c_out = s * SIGMA_DATA / (s ** 2 + SIGMA_DATA ** 2).sqrt()
    c_in = 1 / (s ** 2 + SIGMA_DATA ** 2).sqrt()
    out, logvar = net(c_in * x, sigma.log() / 4, labels)
    denoised = c_skip * x + c_out * out.float()
    weight = (s ** 2 + SIGMA_DATA ** 2) / (s * SIGMA_DATA) ** 2
    per_image = (weight * (denoised - x0) ** 2).mean(dim=(1, 2, 3))
    return (per_image / logvar.float().exp() + logvar.float()).mean()


def bench_size(name, args, device) -> dict:
    torch.manual_seed(0)
    net = build(name, resolution=args.resolution, channels=args.channels, label_dim=args.label_dim,
                device=device).train()
    params = count_params(net)
    flops = training_flops_per_image(name, resolution=args.resolution, channels=args.channels,
                                     label_dim=args.label_dim)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4, betas=(0.9, 0.99), eps=1e-8)
    forced = forced_weights(net)
    model = torch.compile(net) if args.compile else net
    b = args.batch
    x0 = SIGMA_DATA * torch.randn(b, args.channels, args.resolution, args.resolution, device=device)
    labels = torch.nn.functional.one_hot(torch.randint(0, max(args.label_dim, 1), (b,), device=device),
                                         max(args.label_dim, 1)).float() if args.label_dim else None
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def step():
        with autocast:
            loss = edm2_loss(model, x0, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        normalize_forced_weights_(forced)
        return loss

    for _ in range(args.warmup):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    sync(device)
    elapsed = time.perf_counter() - start
    if not math.isfinite(loss.item()):
        raise FloatingPointError(f"size {name}: non-finite loss {loss.item()}")
    images_per_s = b * args.steps / elapsed
    tflops = images_per_s * flops / 1e12
    mem = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else float("nan")
    return dict(name=name, params=params, batch=b, gflops_per_img=flops / 1e9, images_per_s=images_per_s,
                tflops=tflops, mfu=tflops / args.peak_tflops, mem_gib=mem)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="EDM2 family training throughput and MFU (bf16 autocast, Adam).")
    p.add_argument("--sizes", default="xs,s,m,l,xl,xxl", help="comma-separated sizes from models.family.SIZES")
    p.add_argument("--batch", type=int, default=None, help="images per step (default 256 on GPU, 2 on CPU)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per size")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5 on GPU, 1 on CPU)")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="peak dense bf16 TFLOP/s of the card for MFU (989 = H100 SXM; H200 also 989)")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--channels", type=int, default=4)
    p.add_argument("--label-dim", type=int, default=1000)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile the net first")
    p.add_argument("--precision", choices=("bf16", "fp32"), default=None,
                   help="bf16 autocast (default on GPU) or plain fp32 (default on CPU, where bf16 is emulated and slow)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible (use --device cpu for the smoke check)")
    on_gpu = device.type == "cuda"
    args.batch = args.batch or (256 if on_gpu else 2)
    args.precision = args.precision or ("bf16" if on_gpu else "fp32")
    args.warmup = args.warmup if args.warmup is not None else (5 if on_gpu else 1)
    names = [n.strip() for n in args.sizes.split(",") if n.strip()]
    unknown = [n for n in names if n not in SIZES]
    if unknown:
        p.error(f"--sizes: unknown size(s) {unknown}; known: {','.join(SIZES)}")
    if on_gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True

    card = device_name(device)
    precision = "bf16 autocast" if args.precision == "bf16" else "fp32"
    print(f"# card: {card} | {precision} | {args.resolution}x{args.resolution}x{args.channels}, "
          f"{args.label_dim} labels | batch {args.batch} | {args.steps} timed steps | peak {args.peak_tflops} TFLOP/s"
          f" | torch {torch.__version__}")
    header = (f"{'size':<5} {'params (M)':>10} {'batch':>6} {'train GFLOP/img':>16} {'img/s':>10} "
              f"{'TFLOP/s':>9} {'MFU':>7} {'peak mem GiB':>12}  card")
    print(header)
    print("-" * len(header))
    for name in names:
        try:
            r = bench_size(name, args, device)
        except torch.cuda.OutOfMemoryError:
            print(f"{name:<5} {'out of memory at batch ' + str(args.batch):>60}  {card}")
            torch.cuda.empty_cache()
            continue
        print(f"{r['name']:<5} {r['params'] / 1e6:>10.3f} {r['batch']:>6} {r['gflops_per_img']:>16.3f} "
              f"{r['images_per_s']:>10.1f} {r['tflops']:>9.2f} {100 * r['mfu']:>6.2f}% {r['mem_gib']:>12.1f}  {card}",
              flush=True)
        if on_gpu:
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
