"""Benchmark of the exact optimal denoiser (analysis.optimal_loss) — not a test.

In one run on one machine it times, each case in its own subprocess (so peak memory is its own):
  matmul   a plain float32 torch matmul with the distance GEMM's FLOPs, [Q×D]·[D×N] or [N×D]·[D×Q] (no TF32),
           whichever orientation runs faster here (on MKL the second, by ~10%)
  exact    the exact estimator, estimate_optimal_loss(estimator="full", n_samples=Q) at one σ: the streaming,
           chunked, precision-checked D* for Q noisy points (it knows each point's source and seeds the running
           max with it, so chunks far from x skip the value GEMM), plus ‖D* − x0‖²; on CUDA with its bfloat16
           screen (analysis.posterior._screened_posterior), on the CPU screened only where float64 is needed
  exact-noscreen  the same with the screen switched off (every row through the float32/float64 streaming GEMM)
  exact-amortised (--amortised K) K·Q samples in one call, time per Q: the steady state of a real run
  posterior  posterior_mean(data, x, σ) on the same Q points without that hint
  naive64  the straightforward exact version: all Q×N distances at once (torch.cdist in float64, float64 because
           float32 distances are wrong by many nats at small σ), softmax, dense weights @ data
  naive32  the same in float32 (fast but not exact at small σ; shown for reference)
  cdol     estimate_optimal_loss(estimator="cdol") for N = 1,000,000, D = 64, one σ
Default shape: CIFAR-10 (N = 50,000, D = 3,072 random data in [−1, 1], Q = 1,024 noisy points at one σ).
Memory: peak RSS increase over the data already in memory (resource.getrusage maxrss) on CPU,
torch.cuda.max_memory_allocated on CUDA.  The machines are shared: the timings are noisy.

    python benchmarks/bench_optimal_loss.py [--device cuda] [--sigma 1.0] [--skip-naive]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import analysis.posterior as posterior  # noqa: E402
from analysis.optimal_loss import estimate_optimal_loss, posterior_mean  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _make(n, dim, q, sigma, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    data = torch.rand(n, dim, generator=g).mul_(2).sub_(1).to(device)   # in place: no temporaries in the RSS baseline
    src = torch.randint(0, n, (q,), generator=g).to(device)
    x = data[src].double() + sigma * torch.randn(q, dim, generator=g, dtype=torch.float64).to(device)
    return data, x


def _peak_bytes(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _faster_orientation(f1, f2, device):
    """The faster of two equivalent products (BLAS speed depends on the output layout)."""
    best = None
    for f in (f1, f2):
        f()
        _sync(device)
        t0 = time.perf_counter()
        f()
        _sync(device)
        t = time.perf_counter() - t0
        if best is None or t < best[0]:
            best = (t, f)
    return best[1]


def run_case(a) -> dict:
    """One measurement (runs inside the subprocess)."""
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    if a.case == "cdol":
        data, _ = _make(a.cdol_n, a.cdol_dim, 1, a.sigma, device)
        fn = lambda: estimate_optimal_loss(data, [a.sigma], estimator="cdol", n_samples=a.cdol_samples,
                                           device=device)
        flops = None
    else:
        data, x = _make(a.n, a.dim, a.queries, a.sigma, device)
        x32 = x.float()
        flops = 2.0 * a.queries * a.dim * a.n
        if a.case == "matmul":
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.set_float32_matmul_precision("highest")
            fn = _faster_orientation(lambda: x32 @ data.T, lambda: data @ x32.T, device)
        elif a.case in ("exact", "exact-noscreen"):
            posterior._SCREEN = "off" if a.case == "exact-noscreen" else "auto"
            fn = lambda: estimate_optimal_loss(data, [a.sigma], estimator="full", n_samples=a.queries,
                                               device=device)
        elif a.case == "exact-amortised":     # K·Q samples in one call; reported per Q (see main)
            fn = lambda: estimate_optimal_loss(data, [a.sigma], estimator="full", n_samples=a.amortised * a.queries,
                                               device=device)
        elif a.case == "posterior":
            fn = lambda: posterior_mean(data, x, a.sigma, device=device)
        elif a.case in ("naive64", "naive32"):
            dt = torch.float64 if a.case == "naive64" else torch.float32

            def fn():
                d = data.to(dt)
                dist = torch.cdist(x.to(dt), d) ** 2                   # [Q, N] materialised
                w = torch.softmax(-dist / (2 * a.sigma ** 2), dim=1)
                return w @ d
        else:
            raise ValueError(f"unknown case {a.case!r}")
    if device.type == "cuda":
        fn()  # warm-up (kernels, allocator); CPU BLAS needs none worth its minutes
        _sync(device)
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if device.type == "cuda" else _peak_bytes(device)
    times = []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    value = float(out["optimal_loss"].iloc[0]) if hasattr(out, "columns") else None
    del out
    peak = _peak_bytes(device) - base
    per = a.amortised if a.case == "exact-amortised" else 1
    res = {"case": a.case, "seconds": min(times) / per, "peak_extra_mib": peak / 2 ** 20, "threads": torch.get_num_threads(),
           "jstar": value}
    if flops:
        res["gflops"] = flops / res["seconds"] / 1e9
    if a.case == "cdol":
        res["samples_per_s"] = a.cdol_samples / min(times)
    return res


def add_shape_args(p: argparse.ArgumentParser) -> None:
    """--device and the problem's shape (CIFAR-10 by default): shared with profile_optimal_loss.py."""
    p.add_argument("--device", default="cpu")
    p.add_argument("--n", type=int, default=50_000)
    p.add_argument("--dim", type=int, default=3_072)
    p.add_argument("--queries", type=int, default=1_024)
    p.add_argument("--sigma", type=float, default=1.0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_shape_args(p)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--skip-naive", action="store_true")
    p.add_argument("--skip-cdol", action="store_true")
    p.add_argument("--amortised", type=int, default=0, metavar="K",
                   help="also time K·Q samples in one call and report the time per Q (the data preparation — "
                        "mean, norms, centred copy — is then paid once, as in a real multi-batch run)")
    p.add_argument("--cdol-n", type=int, default=1_000_000)
    p.add_argument("--cdol-dim", type=int, default=64)
    p.add_argument("--cdol-samples", type=int, default=65_536)
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)   # internal: run one case
    a = p.parse_args(argv)
    if a.case:
        print(json.dumps(run_case(a)))
        return 0
    cases = ["matmul", "exact", "exact-noscreen", "posterior"] + ([] if a.skip_naive else ["naive64", "naive32"])
    cases += ["exact-amortised"] if a.amortised > 1 else []
    cases += [] if a.skip_cdol else ["cdol"]
    passthrough = [f"--{k.replace('_', '-')}={v}" for k, v in vars(a).items()
                   if k not in ("case", "skip_naive", "skip_cdol")]
    card = torch.cuda.get_device_name(0) if a.device.startswith("cuda") and torch.cuda.is_available() else \
        _cpu_name()
    print(f"card: {card}")
    print(f"device={a.device}  N={a.n} D={a.dim} Q={a.queries} σ={a.sigma}  torch {torch.__version__}  "
          f"cpus={os.cpu_count()} threads={a.threads or torch.get_num_threads()}  "
          f"load avg {os.getloadavg()[0]:.1f}  (shared machine: timings are noisy)")
    results = {}
    for case in cases:
        proc = subprocess.run([sys.executable, __file__, f"--case={case}", *passthrough],
                              capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            print(f"{case:14s} FAILED: {proc.stderr.strip().splitlines()[-1] if proc.stderr else proc.returncode}")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        results[case] = r
        extra = f"  {r['gflops']:.1f} GFLOP/s(distance GEMM)" if "gflops" in r else ""
        if case == "cdol":
            extra = (f"  N={a.cdol_n} D={a.cdol_dim} M={a.cdol_samples}: "
                     f"{r['samples_per_s']:.0f} noisy samples/s")
        if r.get("jstar") is not None and case != "cdol":
            extra += f"  J* = {r['jstar']:.6e}"
        print(f"{case:14s} {r['seconds']:9.4f} s   peak +{r['peak_extra_mib']:8.1f} MiB{extra}")
    if "matmul" in results and "exact" in results:
        m, e = results["matmul"]["seconds"], results["exact"]["seconds"]
        print(f"exact speed / same-FLOP matmul speed = {m / e:.2f}  (target ≥ 0.6)")
        if "exact-amortised" in results:
            print(f"exact, amortised over {a.amortised}×{a.queries} samples: speed / matmul speed = "
                  f"{m / results['exact-amortised']['seconds']:.2f}")
        if "exact-noscreen" in results:
            print(f"exact without the screen: speed / matmul speed = "
                  f"{m / results['exact-noscreen']['seconds']:.2f}")
        if "posterior" in results:
            print(f"posterior_mean (no source hint) speed / matmul speed = {m / results['posterior']['seconds']:.2f}")
        for naive in ("naive64", "naive32"):
            if naive in results:
                print(f"exact speed-up over {naive} = {results[naive]['seconds'] / e:.2f}×  (target ≥ 5 vs the "
                      f"exact naive64);  memory {results[naive]['peak_extra_mib']:.0f} vs "
                      f"{results['exact']['peak_extra_mib']:.0f} MiB")
                if "exact-amortised" in results:
                    print(f"   amortised: {results[naive]['seconds'] / results['exact-amortised']['seconds']:.2f}×")
    return 0


if __name__ == "__main__":
    sys.exit(main())
