"""A synthetic uint8 image set for memory measurements: N × H×W×C (default 200,000 × 32×32×3, 614 MB) as a
channels-last `.npy` (the form image dumps usually take; unlabelled, like the unconditional studies).

    python benchmarks/make_synthetic_dataset.py --out results/memory/source.npy [--n 200000] [--resolution 32]

Written chunk by chunk into a memory-mapped file, so making it needs little memory. The images are seeded random
blobs (a coarse random field upsampled, plus pixel noise) rather than white noise, so the set has some structure;
their content does not matter for the memory numbers.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def make(out: Path, n: int, resolution: int, channels: int, seed: int, chunk: int = 4096) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    x = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, resolution, resolution, channels))
    rng = np.random.default_rng(seed)
    coarse = max(1, resolution // 8)
    for lo in range(0, n, chunk):
        b = min(chunk, n - lo)
        field = rng.normal(0, 60, (b, coarse, coarse, channels))
        field = field.repeat(resolution // coarse, axis=1).repeat(resolution // coarse, axis=2)
        img = 128 + field + rng.normal(0, 20, (b, resolution, resolution, channels))
        x[lo:lo + b] = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    x.flush()
    del x
    tmp.replace(out)   # complete files only
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="output .npy (uint8 [N, R, R, C])")
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--channels", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if a.resolution % max(1, a.resolution // 8):
        ap.error("--resolution must be a multiple of resolution // 8")
    out = make(a.out, a.n, a.resolution, a.channels, a.seed)
    print(f"wrote {out}: {a.n} × {a.resolution}×{a.resolution}×{a.channels} uint8 "
          f"({a.n * a.resolution ** 2 * a.channels / 1e6:.0f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
