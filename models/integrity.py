"""Checksums of the files a study rebuilds at a cost (snapshots, the dataset), so a truncated or corrupted file
fails with one error that names the file and the command that rebuilds it, never with a reader's own crash
("PytorchStreamReader failed reading zip archive", "BadZipFile") deep inside a job.

A checked file FILE has a sidecar FILE.sha256 (JSON): its size, its sha256 and, for files over FULL_HASH_BYTES,
the sha256 of its first and last SAMPLE_BYTES; and optionally `rebuild`, the command that makes it again.
`verify(FILE)` compares the size always, the full hash for files up to FULL_HASH_BYTES and the sampled hash above
(a multi-GB dataset is read by every evaluation job only where it needs rows; hashing it whole each time would
read it all), and raises IntegrityError on a mismatch. A file without a sidecar is not checked (files made before
checksums existed keep working).

    python -m models.integrity stamp FILE [--rebuild CMD]       write FILE.sha256
    python -m models.integrity verify FILE...                   exit 2 with the error on a bad file
    python -m models.integrity publish SRC DST [--rebuild CMD]  verify SRC, copy it to DST (read-only) + sidecar
    python -m models.integrity check-run RUNDIR                 exit 3 if a snapshot of a run folder is bad
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

from models.atomic import atomic_path

SUFFIX = ".sha256"
FULL_HASH_BYTES = 1 << 30   # files up to 1 GiB are hashed whole on every read
SAMPLE_BYTES = 4 << 20      # larger ones: size + the hash of their first and last 4 MiB on read


class IntegrityError(ValueError):
    """A file does not match its recorded checksum; the message names the file and how to rebuild it."""


def sidecar(path) -> Path:
    path = Path(path)
    return path.with_name(path.name + SUFFIX)


def _hash_range(f, start: int, length: int, h) -> None:
    f.seek(start)
    left = length
    while left > 0:
        block = f.read(min(left, 8 << 20))
        if not block:
            break
        h.update(block)
        left -= len(block)


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        _hash_range(f, 0, os.fstat(f.fileno()).st_size, h)
    return h.hexdigest()


def sample_sha256(path, size: int) -> str:
    """sha256 of the first and last SAMPLE_BYTES (the whole file when it is smaller than twice that)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= 2 * SAMPLE_BYTES:
            _hash_range(f, 0, size, h)
        else:
            _hash_range(f, 0, SAMPLE_BYTES, h)
            _hash_range(f, size - SAMPLE_BYTES, SAMPLE_BYTES, h)
    return h.hexdigest()


def record(path, *, rebuild: str | None = None) -> dict:
    path = Path(path)
    size = path.stat().st_size
    rec = {"file": path.name, "size": size, "sha256": file_sha256(path), "sample_sha256": sample_sha256(path, size)}
    if rebuild:
        rec["rebuild"] = rebuild
    return rec


def stamp(path, *, rebuild: str | None = None, rec: dict | None = None) -> dict:
    """Write FILE.sha256 for FILE as it is now (atomically); returns the record."""
    rec = dict(rec) if rec is not None else record(path, rebuild=rebuild)
    if rebuild:
        rec["rebuild"] = rebuild
    with atomic_path(sidecar(path)) as tmp:
        tmp.write_text(json.dumps(rec, indent=1) + "\n")
    return rec


def read_record(path) -> dict | None:
    side = sidecar(path)
    if not side.exists():
        return None
    try:
        rec = json.loads(side.read_text())
        int(rec["size"]), str(rec["sha256"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise IntegrityError(f"{side}: unreadable checksum file ({e}); delete it and rebuild {path}") from e
    return rec


def _fail(path, rec: dict, what: str) -> IntegrityError:
    how = rec.get("rebuild")
    hint = f"; rebuild it with:  {how}" if how else "; rebuild it (or delete it and rerun the step that made it)"
    return IntegrityError(f"{path}: {what} — the file is corrupt or truncated{hint}")


def verify(path, *, full: bool | None = None) -> dict | None:
    """Check FILE against FILE.sha256; returns the record (None when there is no sidecar). Raises IntegrityError
    naming the file and its rebuild command on a missing file, another size or another hash. `full`: hash the
    whole file (default: only up to FULL_HASH_BYTES, the first and last SAMPLE_BYTES above)."""
    path = Path(path)
    rec = read_record(path)
    if rec is None:
        return None
    if not path.exists():
        raise _fail(path, rec, "missing")
    size = path.stat().st_size
    if size != int(rec["size"]):
        raise _fail(path, rec, f"{size} bytes, expected {int(rec['size'])}")
    if full is None:
        full = size <= FULL_HASH_BYTES or "sample_sha256" not in rec
    if full:
        if file_sha256(path) != rec["sha256"]:
            raise _fail(path, rec, "sha256 differs from the recorded one")
    elif sample_sha256(path, size) != rec["sample_sha256"]:
        raise _fail(path, rec, "sha256 of its first/last bytes differs from the recorded one")
    return rec


def publish(src, dst, *, rebuild: str | None = None) -> dict:
    """Verify SRC (against its sidecar, where it has one) and copy it to DST as a read-only file with its own
    sidecar: a copy, not a hard link, so a corrupted published file never corrupts the run folder's (from which
    a rerun publishes again). A file system that supports it makes the copy a reflink (copy_file_range)."""
    src, dst = Path(src), Path(dst)
    rec = verify(src) or record(src)
    with atomic_path(dst, mode=0o444) as tmp:
        shutil.copyfile(src, tmp)
    rec = {**rec, "file": dst.name}
    return stamp(dst, rebuild=rebuild, rec=rec)


def bad_snapshots(rundir) -> list[str]:
    """The errors of a run folder's snapshots (snapshots/*.pt against their sidecars); empty when all are fine."""
    errors = []
    snaps = Path(rundir) / "snapshots"
    for side in sorted(snaps.glob(f"*.pt{SUFFIX}")):  # a snapshot deleted but still recorded
        if not side.with_name(side.name[: -len(SUFFIX)]).exists():
            errors.append(f"{side.with_name(side.name[: -len(SUFFIX)])}: missing (its checksum is recorded)")
    for snap in sorted(snaps.glob("*.pt")):
        try:
            verify(snap, full=True)
        except IntegrityError as e:
            errors.append(str(e))
    return errors


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m models.integrity", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("stamp", help="write FILE.sha256")
    p.add_argument("file")
    p.add_argument("--rebuild", default=None, help="the command that rebuilds FILE (shown when it is bad)")
    p = sub.add_parser("verify", help="check files against their sidecars")
    p.add_argument("files", nargs="+")
    p = sub.add_parser("publish", help="verify SRC, copy it read-only to DST with a sidecar")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--rebuild", default=None)
    p = sub.add_parser("check-run", help="exit 3 (listing the errors) if a run folder's snapshot is bad")
    p.add_argument("rundir")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "stamp":
            stamp(args.file, rebuild=args.rebuild)
        elif args.cmd == "verify":
            for f in args.files:
                verify(f, full=True)
        elif args.cmd == "publish":
            publish(args.src, args.dst, rebuild=args.rebuild)
        else:
            errors = bad_snapshots(args.rundir)
            for e in errors:
                print(e, file=sys.stderr)
            return 3 if errors else 0
    except IntegrityError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
