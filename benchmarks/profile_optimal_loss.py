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
from benchmarks.bench_optimal_loss import _make as make_problem, add_shape_args  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_shape_args(p)
    p.add_argument("--rows", type=int, default=15)
    a = p.parse_args(argv)
    dev = torch.device(a.device)
    data, x = make_problem(a.n, a.dim, a.queries, a.sigma, dev)
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
