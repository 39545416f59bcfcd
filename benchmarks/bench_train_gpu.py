"""Training throughput and model-FLOP utilisation (MFU) of the EDM2 family on one device.

Each size runs full training steps — EDM preconditioning, EDM2's uncertainty-weighted loss, backward, Adam step —
in bf16 autocast (GPU default) on random data of the ImageNet-512 latent shape (64×64×4, 1000 classes), and reports images/s and
MFU = images/s × counted training FLOPs per image / peak FLOP/s. The FLOPs are those of models.family (FlopCounterMode
forward + backward; elementwise work and the optimizer step are not counted, as usual for MFU).

    python benchmarks/bench_train_gpu.py --sizes xs,s,m,l,xl,xxl --batch 256            # on a GPU
    python benchmarks/bench_train_gpu.py --device cpu --sizes t0,t1 --steps 2            # CPU smoke check

Engines (--engine): `plain` (the net and Adam alone), `ddp` (what one training process of the DDP path holds:
the net, Adam and the fp32 EMA, updated every step; one process needs no DDP wrapper), `zero2` (DeepSpeed ZeRO-2
in one process with the trainer's ZeRO settings, training.train.DS_ZERO_TUNING, an fp32 engine under bf16 autocast,
plus the EMA). Every engine applies EDM2's forced weight normalisation after each step, as the trainer does. benchmarks/gpu_validate.py measures every paper model with `measure`.

The preconditioning is written out here (not imported from models.diffusion) so the benchmark measures the network
alone and runs without the rest of the pipeline.
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import os
import platform
import socket
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from models.family import build, count_params, training_flops_per_image  # noqa: E402
from models.sizes import SIZES  # noqa: E402
from models.weight_norm import forced_weights, normalize_forced_weights_  # noqa: E402
from study.checks import torch_autocast_section  # noqa: E402
from training.train import DS_ZERO_TUNING, promote_scalar_params, trainer_backends  # noqa: E402

SIGMA_DATA, P_MEAN, P_STD = 0.5, -0.4, 1.0  # EDM2's ImageNet-512 latent settings


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type}:{platform.processor() or platform.machine()}"


def edm2_loss(net, x0, labels):
    """One EDM2 training loss: log-normal σ, D = c_skip·x + c_out·F(c_in·x, ln σ / 4), weighted by λ(σ)/e^u + u.
    The net's input is cast to its parameter dtype."""
    sigma = (torch.randn(x0.shape[0], device=x0.device) * P_STD + P_MEAN).exp()
    s = sigma[:, None, None, None]
    x = x0 + s * torch.randn_like(x0)
    c_skip = SIGMA_DATA ** 2 / (s ** 2 + SIGMA_DATA ** 2)
    c_out = s * SIGMA_DATA / (s ** 2 + SIGMA_DATA ** 2).sqrt()
    c_in = 1 / (s ** 2 + SIGMA_DATA ** 2).sqrt()
    out, logvar = net((c_in * x).to(next(net.parameters()).dtype), sigma.log() / 4, labels)
    denoised = c_skip * x + c_out * out.float()
    weight = (s ** 2 + SIGMA_DATA ** 2) / (s * SIGMA_DATA) ** 2
    per_image = (weight * (denoised - x0) ** 2).mean(dim=(1, 2, 3))
    return (per_image / logvar.float().exp() + logvar.float()).mean()


ENGINES = ("plain", "ddp", "zero2")


def single_process_group() -> None:
    """A one-process torch.distributed group for DeepSpeed (a launcher would set these variables)."""
    if "RANK" in os.environ:
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def zero2_engine(net, opt, batch: int, precision: str = "bf16"):
    """DeepSpeed ZeRO-2 around `net` and its Adam, with the trainer's settings (training/train.py): an fp32 engine
    with DeepSpeed's torch_autocast on under bf16 (the forward's bf16 as under DDP, gradients reduced in fp32)."""
    import deepspeed  # optional package

    single_process_group()
    config = {"train_micro_batch_size_per_gpu": batch, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 2, **DS_ZERO_TUNING},
              "gradient_clipping": 0.0, "zero_allow_untested_optimizer": True,
              "torch_autocast": torch_autocast_section(precision)}  # the engine's forward re-enters autocast
    promote_scalar_params(net)  # as the trainer does: DeepSpeed cannot broadcast 0-dim parameters
    engine, opt, _, _ = deepspeed.initialize(model=net, optimizer=type(opt)(net.parameters(), **opt.defaults),
                                             config=config)
    return engine, opt


def measure(name: str, *, batch: int, steps: int, warmup: int, device: torch.device, engine: str = "plain",
            precision: str = "bf16", resolution: int = 64, channels: int = 4, label_dim: int = 1000,
            peak_tflops: float = 989.0, compile: bool = False, flops_per_image: float | None = None) -> dict:
    """Images/s, MFU and peak memory of full training steps of size `name` at `batch` images (see the engines in
    the module docstring). Peak memory: torch.cuda's allocated and reserved maxima over the timed steps (NaN on
    the CPU). FLOPs per image: counted (models.family) unless given; NaN skips the count (TFLOP/s and MFU NaN)."""
    if engine not in ENGINES:
        raise ValueError(f"engine {engine!r}: one of {ENGINES}")
    flops = flops_per_image if flops_per_image is not None else \
        training_flops_per_image(name, resolution=resolution, channels=channels, label_dim=label_dim)
    bf16 = precision == "bf16"
    net = model = opt = ema = None
    try:
        torch.manual_seed(0)
        net = build(name, resolution=resolution, channels=channels, label_dim=label_dim, device=device).train()
        params = count_params(net)
        ema = copy.deepcopy(net).eval().requires_grad_(False).float() if engine != "plain" else None
        opt = torch.optim.Adam(net.parameters(), lr=1e-4, betas=(0.9, 0.99), eps=1e-8)
        if engine == "zero2":
            model, opt = zero2_engine(net, opt, batch, "bf16" if bf16 else "no")
        else:
            model = torch.compile(net) if compile else net
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
        forced = forced_weights(net)  # EDM2's forced weight normalisation after every step, as the trainer's
        normalize_forced_weights_(forced)
        return _timed_steps(name, model, (net, forced), opt, ema, autocast, engine == "zero2", batch, steps, warmup,
                            device,
                            dict(name=name, engine=engine, params=params, batch=batch, gflops_per_img=flops / 1e9),
                            flops, peak_tflops, (channels, resolution, label_dim))
    finally:
        del net, model, opt, ema
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _timed_steps(name, model, weights, opt, ema, autocast, deepspeed, batch, steps, warmup, device, row, flops,
                 peak_tflops, shape) -> dict:
    (net, forced), (channels, resolution, label_dim) = weights, shape
    x0 = SIGMA_DATA * torch.randn(batch, channels, resolution, resolution, device=device)
    labels = torch.nn.functional.one_hot(torch.randint(0, max(label_dim, 1), (batch,), device=device),
                                         max(label_dim, 1)).float() if label_dim else None

    def step():
        with autocast:
            loss = edm2_loss(model, x0, labels)
        if deepspeed:
            model.backward(loss)
            model.step()
        else:
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if ema is not None:
            with torch.no_grad():
                for p_ema, p in zip(ema.parameters(), net.parameters()):
                    p_ema.lerp_(p.detach().float().reshape(p_ema.shape), 1e-3)
        normalize_forced_weights_(forced)
        return loss

    for _ in range(warmup):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync(device)
    elapsed = time.perf_counter() - start
    if not math.isfinite(loss.item()):
        raise FloatingPointError(f"size {name}: non-finite loss {loss.item()}")
    on_gpu = device.type == "cuda"
    images_per_s = batch * steps / elapsed
    tflops = images_per_s * flops / 1e12
    return {**row, "images_per_s": images_per_s, "tflops": tflops, "mfu": tflops / peak_tflops,
            "mem_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30 if on_gpu else float("nan"),
            "reserved_gib": torch.cuda.max_memory_reserved(device) / 2 ** 30 if on_gpu else float("nan"),
            "loss": float(loss.detach())}


def bench_size(name, args, device) -> dict:
    return measure(name, batch=args.batch, steps=args.steps, warmup=args.warmup, device=device,
                   engine=args.engine, precision=args.precision, resolution=args.resolution,
                   channels=args.channels, label_dim=args.label_dim, peak_tflops=args.peak_tflops,
                   compile=args.compile)


def fast_gpu_settings() -> None:
    """The trainer's own backend settings (training.train.trainer_backends: TF32 off, cuDNN autotuning): a step is
    timed as the trainer runs it."""
    trainer_backends()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic_set(folder: Path, n: int, channels: int, resolution: int, label_dim: int) -> Path:
    """n random uint8-valued images (as an image folder's) with labels 0 … label_dim − 1, as a training.dataset .npz."""
    from training.dataset import Dataset, save_npz

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, channels, resolution, resolution), generator=g).float() / 127.5 - 1
    labels = torch.arange(n) % label_dim if label_dim else None
    return save_npz(Dataset(x, labels, "synthetic"), folder / "synthetic.npz", compact=True)


def trainer_row(name: str, args, config: dict, data: Path) -> dict:
    """The trainer's own step (bench_train_step.time_training: training.train.train with the study's settings for
    `name` — its batch_gpu, dropout, precision, EMA — on the device, data path included) as a row of the table."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_train_step import time_training

    from study.spec import model_spec

    training = model_spec({**config, "models": {name: config["models"].get(name, {"arch": name})}}, name).training
    batch = args.batch or int(training.get("batch_gpu") or training["batch_size"])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    r = time_training(name, args.steps, args.warmup, False, config=config, data=str(data), batch_size=batch)
    flops = r["flops"] / batch
    tflops = r["images_per_s"] * flops / 1e12
    return {"name": name, "params": count_params(build(name, resolution=args.resolution, channels=args.channels,
                                                       label_dim=args.label_dim, device="meta")),
            "batch": batch, "gflops_per_img": flops / 1e9, "images_per_s": r["images_per_s"], "tflops": tflops,
            "mfu": tflops / args.peak_tflops, "mem_gib": r["mem_gib"], "dropout": r["dropout"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="EDM2 family training throughput and MFU (bf16 autocast, Adam).")
    p.add_argument("--sizes", default="xs,s,m,l,xl,xxl", help="comma-separated sizes from models.sizes.SIZES")
    p.add_argument("--batch", type=int, default=None, help="images per step (default 256 on GPU, 2 on CPU)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per size")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5 on GPU, 1 on CPU)")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="peak dense bf16 TFLOP/s of the card for MFU (989 = H100 SXM; H200 also 989)")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--channels", type=int, default=4)
    p.add_argument("--label-dim", type=int, default=1000)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile the net first (not with zero2)")
    p.add_argument("--engine", choices=ENGINES, default="plain",
                   help="plain: net + Adam; ddp: + the fp32 EMA (one DDP-path process); zero2: DeepSpeed ZeRO-2")
    p.add_argument("--trainer", default=None, metavar="CONFIG",
                   help="time the trainer's own step (training.train.train) with this study config's settings for "
                        "each size (its batch_gpu as the batch unless --batch, its dropout and precision) on "
                        "synthetic uint8 images of --resolution/--channels/--label-dim; --engine is then unused")
    p.add_argument("--precision", choices=("bf16", "fp32"), default=None,
                   help="bf16 autocast (default on GPU) or plain fp32 (default on CPU, where bf16 is emulated and slow)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible (use --device cpu for the smoke check)")
    on_gpu = device.type == "cuda"
    args.batch = args.batch or (None if args.trainer else 256 if on_gpu else 2)
    args.precision = args.precision or ("bf16" if on_gpu else "fp32")
    args.warmup = args.warmup if args.warmup is not None else (5 if on_gpu else 1)
    names = [n.strip() for n in args.sizes.split(",") if n.strip()]
    unknown = [n for n in names if n not in SIZES]
    if unknown:
        p.error(f"--sizes: unknown size(s) {unknown}; known: {','.join(SIZES)}")
    if on_gpu:
        fast_gpu_settings()

    card = device_name(device)
    precision = "bf16 autocast" if args.precision == "bf16" else "fp32"
    print(f"# card: {card} | {precision} | {args.resolution}x{args.resolution}x{args.channels}, "
          f"{args.label_dim} labels | {'the trainer: ' + args.trainer if args.trainer else 'engine ' + args.engine}"
          f" | batch {args.batch or 'batch_gpu'} | {args.steps} timed steps | "
          f"peak {args.peak_tflops} TFLOP/s | torch {torch.__version__}")
    header = (f"{'size':<5} {'params (M)':>10} {'batch':>6} {'train GFLOP/img':>16} {'img/s':>10} "
              f"{'TFLOP/s':>9} {'MFU':>7} {'peak mem GiB':>12}  card")
    print(header)
    print("-" * len(header))
    config, tmp = None, None
    if args.trainer:
        import tempfile

        from study.config import load_config

        config, tmp = load_config(args.trainer), tempfile.TemporaryDirectory()
        n = max(args.label_dim, 256)  # the trainer's stream cycles through seeded epochs of it
        data = synthetic_set(Path(tmp.name), n, args.channels, args.resolution, args.label_dim)
    for name in names:
        try:
            r = trainer_row(name, args, config, data) if config is not None else bench_size(name, args, device)
        except torch.cuda.OutOfMemoryError:
            print(f"{name:<5} {'out of memory at batch ' + str(args.batch):>60}  {card}")
            torch.cuda.empty_cache()
            continue
        print(f"{r['name']:<5} {r['params'] / 1e6:>10.3f} {r['batch']:>6} {r['gflops_per_img']:>16.3f} "
              f"{r['images_per_s']:>10.1f} {r['tflops']:>9.2f} {100 * r['mfu']:>6.2f}% {r['mem_gib']:>12.1f}  {card}",
              flush=True)
        if on_gpu:
            torch.cuda.empty_cache()
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
