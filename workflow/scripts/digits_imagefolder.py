"""`python workflow/scripts/digits_imagefolder.py --out DIR [--resolution 16]` — an image folder of PNGs in class
folders (DIR/0 … DIR/9, one RGB PNG per image) made from sklearn's bundled 8×8 digits, upscaled.

The paper rehearsal (workflow/config/paper-rehearsal.yaml) reads it as `imagefolder:DIR`, the same reader and
class-folder labels as ImageNet's train folder, with nothing to download.  The folder appears whole or not at all
(written beside DIR, then renamed), so a killed job never leaves a partial dataset behind."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, for training.dataset (run as a script)
from training.dataset import load_dataset  # noqa: E402


def write_digits_imagefolder(out: Path, resolution: int = 16) -> int:
    """Write the folder; returns the number of images. Pixels: the digits resized (antialiased bilinear) to
    resolution², mapped to uint8 and copied to three channels."""
    ds = load_dataset("digits", resolution=resolution)
    x = np.clip(np.rint((ds.x.numpy() + 1.0) * 127.5), 0, 255).astype(np.uint8)   # [N, 1, H, W] → uint8
    labels = ds.labels.numpy()
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for k in np.unique(labels):
        (tmp / str(int(k))).mkdir(parents=True)
    for i, (img, k) in enumerate(zip(x, labels)):
        Image.fromarray(np.repeat(img[0][:, :, None], 3, axis=2)).save(tmp / str(int(k)) / f"{i:05d}.png")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return len(x)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder to create (replaced if it exists)")
    p.add_argument("--resolution", type=int, default=16, help="image side in pixels (default 16)")
    args = p.parse_args(argv)
    if args.resolution < 1:
        p.error(f"--resolution must be >= 1, got {args.resolution}")
    n = write_digits_imagefolder(Path(args.out), args.resolution)
    print(f"wrote {n} PNGs of {args.resolution}x{args.resolution} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
