"""Training throughput (images/s) of the model family on this CPU — what the study configs' lengths rest on.

    python benchmarks/bench_train_cpu.py                 # tiny ladder on digits (8×8×1, batch 128) + xs (32×32×3)
    python benchmarks/bench_train_cpu.py --members t0 t2 --steps 10 --threads 1

Run it with --threads 1 to get the per-job rate of a `snakemake --cores 2` study (two 1-thread jobs in parallel).
One step = what models/train.py does per batch: noise, forward through the preconditioned denoiser, EDM loss with
the learned log-variance, backward, gradient clipping, Adam, EMA update, forced weight normalisation.  The first
`--warmup` steps are not timed.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from models import family
from models.data import load_dataset
from models.denoiser import Denoiser
from models.diffusion import get_variant
from models.loop import per_example_losses
from models.weight_norm import forced_weights, normalize_forced_weights_


def bench(name: str, x_all: torch.Tensor, batch: int, steps: int, warmup: int) -> dict:
    _, c, h, _ = x_all.shape
    net = family.build(name, resolution=h, channels=c, device="cpu").train()
    ema = copy.deepcopy(net).requires_grad_(False)
    forced = forced_weights(net)
    variant = get_variant("edm")
    den = Denoiser(net, variant)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, betas=(0.9, 0.99), eps=1e-8)
    g = torch.Generator().manual_seed(0)

    def step():
        idx = torch.randint(0, x_all.shape[0], (batch,), generator=g)
        x0 = x_all[idx]
        sigma = variant.sample_sigma(batch, generator=g)
        noise = torch.randn(x0.shape, generator=g)
        loss, _ = per_example_losses(den, variant, x0, sigma, noise, None)
        loss.mean().backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), net.parameters()):
                pe.lerp_(p, 0.01)
        normalize_forced_weights_(forced)

    for _ in range(warmup):
        step()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    flops = family.training_flops_per_image(name, resolution=h, channels=c)
    return {"name": name, "shape": f"{c}x{h}x{h}", "batch": batch, "params": family.count_params(net),
            "gflops_per_img": flops / 1e9, "s_per_step": dt / steps, "img_per_s": steps * batch / dt,
            "img_per_cpu_s": steps * batch / cpu}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--members", nargs="*", default=["t0", "t1", "t2", "t3", "t4", "t5", "t6"])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--xs", default="32x3", help="xs data as RESxCHANNELS (e.g. 32x3, 64x4); 'none' to skip")
    p.add_argument("--xs-batch", type=int, default=2)
    p.add_argument("--xs-steps", type=int, default=2)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    digits = load_dataset("digits").x
    rows = [bench(m, digits, args.batch, args.steps, args.warmup) for m in args.members]
    if args.xs != "none":
        res, ch = (int(v) for v in args.xs.lower().split("x"))
        xs_data = torch.randn(16, ch, res, res)
        rows.append(bench("xs", xs_data, args.xs_batch, args.xs_steps, 1))

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'model':6} {'data':8} {'batch':>5} {'params':>12} {'GFLOP/img':>10} {'s/step':>8} {'img/s':>9} "
          f"{'img/cpu-s':>10} {'min/100k img':>13}")
    for r in rows:
        print(f"{r['name']:6} {r['shape']:8} {r['batch']:5d} {r['params']:12,d} {r['gflops_per_img']:10.4f} "
              f"{r['s_per_step']:8.3f} {r['img_per_s']:9.1f} {r['img_per_cpu_s']:10.1f} "
              f"{1e5 / r['img_per_s'] / 60:13.1f}")
    print("img/s is wall-clock (slowed by anything else running); img/cpu-s is images per CPU-second of this "
          "process — with one thread, the rate on an otherwise idle core.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
