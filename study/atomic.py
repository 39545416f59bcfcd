"""Atomic writes: a crash or a kill never leaves a half-written result where a finished one is expected.

    with atomic_path("results/x.csv") as tmp:
        df.to_csv(tmp, index=False)

The temp file sits in the target's folder (so the final rename is atomic on POSIX) and keeps the target's
suffix (so numpy, matplotlib and pandas pick the right format and append nothing)."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path, *, mode: int = 0o644, finish=os.replace):
    """Yield a temp path beside `path`; rename it onto `path` when the block succeeds, delete it when it fails.
    `finish(tmp, path)` does the rename (study.integrity.replace_stamped also writes the checksum first)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + path.suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, mode)  # mkstemp makes 0600; results are meant to be read by every later step
        finish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
