"""A synthetic uint8 image set for memory measurements: N × H×W×C (default 200,000 × 32×32×3, 614 MB) as a
channels-last `.npy` (the form image dumps usually take; unlabelled, like the unconditional studies).

    python benchmarks/make_synthetic_dataset.py --out results/memory/source.npy [--n 200000] [--resolution 32]
    python benchmarks/make_synthetic_dataset.py --out DIR/images.npz --classes 1000 ...   # labelled, as .npz

An `.npz` output holds `x` (the same channels-last images) and, with --classes K, seeded random `labels` in
[0, K): a class-conditional stand-in (benchmarks/gpu_validate.py trains on one).

Written chunk by chunk into a memory-mapped file, so making it needs little memory. The images are seeded random
blobs (a coarse random field upsampled, plus pixel noise) rather than white noise, so the set has some structure;
their content does not matter for the memory numbers.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def make(out: Path, n: int, resolution: int, channels: int, seed: int, chunk: int = 4096, classes: int = 0) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npz":
        images = make(out.with_name(out.name + ".images.npy"), n, resolution, channels, seed, chunk)
        labels = np.random.default_rng(seed + 1).integers(0, classes, n) if classes else None
        tmp = out.with_name(out.name + ".tmp.npz")
        np.savez(tmp, x=np.load(images, mmap_mode="r"), **({"labels": labels} if classes else {}))
        images.unlink()
        tmp.replace(out)   # complete files only
        return out
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
    ap.add_argument("--out", required=True, type=Path, help="output .npy (uint8 [N, R, R, C]) or .npz (x, labels)")
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--channels", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--classes", type=int, default=0, help="random labels in [0, K) (.npz output only)")
    a = ap.parse_args(argv)
    if a.resolution % max(1, a.resolution // 8):
        ap.error("--resolution must be a multiple of resolution // 8")
    if a.classes and a.out.suffix != ".npz":
        ap.error("--classes needs an .npz --out (a .npy holds the images only)")
    out = make(a.out, a.n, a.resolution, a.channels, a.seed, classes=a.classes)
    print(f"wrote {out}: {a.n} × {a.resolution}×{a.resolution}×{a.channels} uint8 "
          f"({a.n * a.resolution ** 2 * a.channels / 1e6:.0f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
