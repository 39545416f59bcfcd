"""Where the exact estimator's time goes (torch.profiler), for one call at CIFAR-10 shape — not a test.

    python benchmarks/profile_optimal_loss.py [--device cuda] [--sigma 1.0] [--rows 15]

Prints, for posterior_mean (no hint) and estimate_optimal_loss(estimator="full"), the operators that took the
most device time (CUDA) or CPU time, after one warm-up call.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.optimal_loss import estimate_optimal_loss, posterior_mean  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--n", type=int, default=50_000)
    p.add_argument("--dim", type=int, default=3_072)
    p.add_argument("--queries", type=int, default=1_024)
    p.add_argument("--sigma", type=float, default=1.0)
    p.add_argument("--rows", type=int, default=15)
    a = p.parse_args(argv)
    dev = torch.device(a.device)
    g = torch.Generator().manual_seed(0)
    data = torch.rand(a.n, a.dim, generator=g).mul_(2).sub_(1).to(dev)
    src = torch.randint(0, a.n, (a.queries,), generator=g)
    x = data[src.to(dev)].double() + a.sigma * torch.randn(a.queries, a.dim, dtype=torch.float64, generator=g).to(dev)
    calls = {
        "posterior_mean": lambda: posterior_mean(data, x, a.sigma, device=dev),
        "estimate_full": lambda: estimate_optimal_loss(data, [a.sigma], estimator="full", n_samples=a.queries,
                                                       device=dev),
    }
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    sort = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    for name, fn in calls.items():
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with profile(activities=activities) as prof:
            fn()
            if dev.type == "cuda":
                torch.cuda.synchronize()
        print(f"== {name}  σ={a.sigma}  wall {1e3 * (time.perf_counter() - t0):.2f} ms (profiled)")
        print(prof.key_averages().table(sort_by=sort, row_limit=a.rows, max_name_column_width=48))
    return 0


if __name__ == "__main__":
    sys.exit(main())
