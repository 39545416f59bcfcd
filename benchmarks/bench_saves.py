"""What a save costs the steps: a training state of --mb MiB of float32 tensors written as the trainer writes
state.pt, the first version's way and now's, interleaved so both see the same machine load:
  first version  torch.save to the temp file, then its sha256 by reading the file again (and the replaced file's
                 too), renamed into place; the steps wait for all of it
  now            run_folder.atomic_torch_save: sha256 taken from the bytes as torch.save writes them, the replaced
                 file matched by its sampled hash; the steps wait only for the copy to the host (saves.host_copy),
                 the write runs on the save thread
Prints median seconds of each (the write and, for now, the stall), and their ratios.

    python benchmarks/bench_saves.py [--mb 512] [--repeats 5] [--folder DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from study import integrity  # noqa: E402
from study.atomic import atomic_path  # noqa: E402
from training import run_folder
from training.saves import host_copy  # noqa: E402


def first_version_save(obj, path: Path) -> None:
    """state.pt as first written: torch.save to a path, the checksum by re-reading (integrity.record), the old
    file fully re-hashed to match its sidecar."""
    def finish(tmp, final):
        rec = integrity.record(tmp)
        rec["file"] = final.name
        if final.exists():
            old = integrity.read_record(final)
            if old is not None and integrity.file_sha256(final) == old["sha256"]:
                rec["previous"] = {k: old[k] for k in ("size", "sha256", "sample_sha256")}
        integrity.stamp(final, rec=rec)
        os.replace(tmp, final)

    with atomic_path(path, finish=finish) as tmp:
        torch.save(obj, tmp)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mb", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--folder", default=None, help="where to write (default: a temp folder)")
    args = p.parse_args(argv)
    n = args.mb * 2 ** 20 // 4 // 64
    state = {"net": {f"w{i}": torch.randn(n) for i in range(32)}, "ema": {f"w{i}": torch.randn(n) for i in range(32)},
             "images_seen": 0}
    times = {"first version": [], "now: write": [], "now: stall (host copy)": []}
    with tempfile.TemporaryDirectory(dir=args.folder) as tmp:
        for repeat in range(args.repeats + 1):
            t = time.perf_counter()
            first_version_save(state, Path(tmp) / "a" / "state.pt")
            first = time.perf_counter() - t
            t = time.perf_counter()
            copied = host_copy(state)
            stall = time.perf_counter() - t
            t = time.perf_counter()
            run_folder.atomic_torch_save(copied, Path(tmp) / "b" / "state.pt")
            write = time.perf_counter() - t
            if repeat:  # the first round warms the page cache and allocator
                for key, value in zip(times, (first, write, stall)):
                    times[key].append(value)
    med = {k: statistics.median(v) for k, v in times.items()}
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"state of {args.mb} MiB, medians of {args.repeats} (interleaved), load average {load}")
    for key, value in med.items():
        print(f"  {key:24s} {value:8.3f} s   {value / med['first version']:.3f}x the first version's stall")
    return 0


if __name__ == "__main__":
    sys.exit(main())
