"""Checksums of the files a study writes and reads again (the dataset, the evaluation set, J*, D*, snapshots, the
evaluation tables, the collected losses, the training state), and the one safe way to read a torch file, so a
truncated, corrupted or crafted file fails with one error that names the file and the command that rebuilds it,
never with a reader's own crash ("PytorchStreamReader failed reading zip archive", "BadZipFile") deep inside a job,
and never by running code.

A checked file FILE has a sidecar FILE.sha256 (JSON): its size, its sha256 and, for files over FULL_HASH_BYTES,
the sha256 of its first and last SAMPLE_BYTES; and optionally `rebuild`, the command that makes it again, and
`previous`, the record of the file it replaces (a file rewritten in place, state.pt: the sidecar is written before
the file is renamed into place, so a kill between the two leaves a file that matches one of the two records).
`verify(FILE)` compares the size always, the full hash for files up to FULL_HASH_BYTES and the sampled hash above
(a multi-GB dataset is read by every evaluation job only where it needs rows; hashing it whole each time would
read it all), and raises IntegrityError on a mismatch. A file without a sidecar is not checked here (files made
before checksums existed keep working); the workflow declares every sidecar as an output of the job that writes
the file, so within a study a missing sidecar reruns that job. `invalid(FILE, problem)` is the same one-line error
for a file whose contents fail a reader's own checks (rows, columns, σ grid, non-finite values).

`load_torch(FILE)` is how every torch file is read: verified, then `torch.load(weights_only=True)`, which builds
tensors, plain containers and numbers only; a file whose pickle names anything else (a payload that would run
code) is refused with UnsafeFileError, never executed.

    python -m study.integrity stamp FILE... [--rebuild CMD]    write FILE.sha256 for each FILE
    python -m study.integrity verify FILE...                   exit 2 with the error on a bad file
    python -m study.integrity publish SRC DST [--rebuild CMD]  verify SRC, copy it to DST (read-only) + sidecar

A CLI that writes study files stamps them itself (add_stamp_options, stamp_outputs): `--rebuild CMD` (or `--stamp`)
writes each output's sidecar once the outputs are written, so each workflow job is one command. A training run
folder's own checks (its snapshots and state.pt) are training.run_folder's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import re
import shutil
import sys
from pathlib import Path

import numpy as np

from study.atomic import atomic_path

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct

# torch is imported only where a torch file is read (load_torch): the jobs that stamp their outputs and verify their
# inputs with this module mostly never read one.

SUFFIX = ".sha256"
FULL_HASH_BYTES = 1 << 30   # files up to 1 GiB are hashed whole on every read
SAMPLE_BYTES = 4 << 20      # larger ones: size + the hash of their first and last 4 MiB on read


class IntegrityError(ValueError):
    """A file does not match its recorded checksum or fails a reader's checks; the message names the file and how
    to rebuild it."""


class UnsafeFileError(IntegrityError):
    """A torch file whose pickle holds more than tensors and plain data: refused without running any of it."""


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


class HashingWriter:
    """A binary file's `write` that also feeds the bytes to sha256 and counts them: the checksum of a file is
    had as it is written (torch.save writes its zip sequentially through `write`), not by reading it again."""

    def __init__(self, f):
        self.f, self.sha256, self.size = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.size += len(memoryview(data).cast("B"))
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()

    def written(self) -> dict:
        """{"size", "sha256"} of the bytes written so far."""
        return {"size": self.size, "sha256": self.sha256.hexdigest()}


def replace_stamped(tmp, path, *, rebuild: str | None = None, written: dict | None = None) -> dict:
    """Move the finished file `tmp` onto `path` with its sidecar, so that a kill at any moment leaves a `path` that
    matches its sidecar: the sidecar (the new record, and the old file's as `previous`) is written first, then
    the file is renamed into place.  `written`: the size and sha256 of tmp as a HashingWriter wrote it (only its
    first and last SAMPLE_BYTES are read then, for the sampled hash)."""
    path = Path(path)
    if written is not None and int(written["size"]) == Path(tmp).stat().st_size:
        rec = {"file": path.name, **written, "sample_sha256": sample_sha256(tmp, int(written["size"]))}
        if rebuild:
            rec["rebuild"] = rebuild
    else:
        rec = record(tmp, rebuild=rebuild)
    rec["file"] = path.name
    previous = _current_record(path)
    if previous is not None:
        rec["previous"] = {k: previous[k] for k in ("size", "sha256", "sample_sha256") if k in previous}
    stamp(path, rec=rec)
    os.replace(tmp, path)
    return rec


def _current_record(path: Path) -> dict | None:
    """The record that `path` as it is now matches: its sidecar's (or the sidecar's `previous`), a fresh one for
    a file without a sidecar, None for a missing file or one that matches neither (a damaged file stays refused).
    Matched by size and sampled hash: the record keeps the recorded sha256, which every full check compares, so
    a multi-GB file being replaced is not read whole to choose its record."""
    if not path.exists():
        return None
    try:
        rec = read_record(path)
    except IntegrityError:
        return None
    if rec is None:
        return record(path)
    return next((r for r in (rec, rec.get("previous")) if isinstance(r, dict)
                 and _matches(path, r, full=False if "sample_sha256" in r else None)),
                None)


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


GENERIC_REBUILD = "delete it and rerun the step that made it (in a study: `snakemake` with its --configfile)"


def rebuild_hint(path, rec: dict | None = None) -> str:
    """'rebuild it with:  CMD' from FILE's sidecar, or the generic way to rebuild a file that has none."""
    if rec is None:
        try:
            rec = read_record(path)
        except IntegrityError:
            rec = None
    how = (rec or {}).get("rebuild")
    return f"rebuild it with:  {how}" if plain_rebuild_command(how) else GENERIC_REBUILD


# A sidecar is no signature (whoever rewrites a file can rewrite its sidecar): a recorded command is shown only when
# it has the form the workflow writes — `snakemake` and quoted or plain words, nothing a shell would run besides.
_PLAIN_COMMAND = re.compile(r"snakemake( ('[^'\n]*'|[A-Za-z0-9_./=:@%+,-]+))+")


def plain_rebuild_command(how) -> bool:
    """Whether a sidecar's `rebuild` is a plain `snakemake …` command (no ;, |, $, backquotes, redirections)."""
    return isinstance(how, str) and _PLAIN_COMMAND.fullmatch(how) is not None


def _delete_and_rebuild(path) -> str:
    """'delete it and rebuild it with:  CMD' (the sidecar's command), or GENERIC_REBUILD without one."""
    hint = rebuild_hint(path)
    return hint if hint == GENERIC_REBUILD else f"delete it and {hint}"


def invalid(path, problem: str) -> IntegrityError:
    """The one-line error for a file whose contents fail a reader's check: the file, the problem, the fix."""
    return IntegrityError(f"{path}: {problem}; {rebuild_hint(path)}")


def _fail(path, rec: dict, what: str) -> IntegrityError:
    return IntegrityError(f"{path}: {what} — the file is corrupt or truncated; {rebuild_hint(path, rec)}")


def _mismatch(path, rec: dict, full: bool | None) -> str | None:
    """Why FILE does not match the record `rec` (None when it does)."""
    size = path.stat().st_size
    if size != int(rec["size"]):
        return f"{size} bytes, expected {int(rec['size'])}"
    if full is None:
        full = size <= FULL_HASH_BYTES or "sample_sha256" not in rec
    if full:
        if file_sha256(path) != rec["sha256"]:
            return "sha256 differs from the recorded one"
    elif sample_sha256(path, size) != rec["sample_sha256"]:
        return "sha256 of its first/last bytes differs from the recorded one"
    return None


def _matches(path, rec: dict, full: bool | None = None) -> bool:
    return _mismatch(Path(path), rec, full) is None


def verify(path, *, full: bool | None = None) -> dict | None:
    """Check FILE against FILE.sha256; returns the record (None when there is no sidecar). Raises IntegrityError
    naming the file and its rebuild command on a missing file, another size or another hash (a file that matches
    the sidecar's `previous` record passes). `full`: hash the whole file (default: only up to FULL_HASH_BYTES, the
    first and last SAMPLE_BYTES above)."""
    path = Path(path)
    rec = read_record(path)
    if rec is None:
        return None
    if not path.exists():
        raise _fail(path, rec, "missing")
    why = _mismatch(path, rec, full)
    if why is not None and not (isinstance(rec.get("previous"), dict) and _matches(path, rec["previous"], full)):
        raise _fail(path, rec, why)
    return rec


# ----------------------------------------------------------------------------------------------------------------
# a folder of files recorded elsewhere (DeepSpeed's checkpoint, recorded in state.pt)
# ----------------------------------------------------------------------------------------------------------------

def folder_records(folder) -> dict:
    """{path relative to folder: record} for every file below `folder`."""
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): {k: v for k, v in record(p).items() if k != "file"}
            for p in sorted(folder.rglob("*")) if p.is_file()}


def check_folder(folder, records: dict) -> None:
    """The files below `folder` are exactly those of `records` (folder_records) and each matches its record;
    IntegrityError naming the first that does not."""
    folder = Path(folder)
    hint = GENERIC_REBUILD
    found = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} if folder.is_dir() else set()
    for name in sorted(set(records) | found):
        path = folder / name
        if name not in records:
            raise IntegrityError(f"{path}: not among the files recorded for {folder}; {hint}")
        if name not in found:
            raise IntegrityError(f"{path}: missing (recorded for {folder}); {hint}")
        why = _mismatch(path, records[name], None)
        if why is not None:
            raise IntegrityError(f"{path}: {why} — the file is corrupt or truncated; {hint}")


# ----------------------------------------------------------------------------------------------------------------
# reading torch files
# ----------------------------------------------------------------------------------------------------------------

def numpy_array_globals() -> list:
    """What torch.load needs to rebuild a numpy array of a plain dtype (np.random.get_state()'s uint32 key, in
    training state written before it was stored as a list): constructors of data, no code."""
    return [_reconstruct, (_reconstruct, "numpy.core.multiarray._reconstruct"),
            (_reconstruct, "numpy._core.multiarray._reconstruct"), np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def _unpickling_problem(err: Exception) -> str:
    """The part of torch's weights-only refusal that says what the file holds (its first offending global)."""
    text = str(err)
    m = re.search(r"GLOBAL (\S+)", text) or re.search(r"but got (<class '[^']+'>)", text)
    if m:
        return m.group(1)
    m = re.search(r"WeightsUnpickler error: ([^\n]+)", text)
    return m.group(1).strip() if m else text.strip().splitlines()[0]


def load_torch(path, *, map_location="cpu", mmap: bool = False, numpy_arrays: bool = False):
    """Read a torch file safely: verify it against its sidecar, then torch.load(weights_only=True) — tensors,
    plain containers, numbers and strings only (`numpy_arrays`: also numpy arrays of plain dtypes). A file whose
    pickle holds anything else is refused (UnsafeFileError) without running any of it, and an unreadable one is
    an IntegrityError: one line naming the file and how to rebuild it."""
    import torch  # deferred: see the imports

    path = Path(path)
    verify(path)
    try:
        with torch.serialization.safe_globals(numpy_array_globals() if numpy_arrays else []):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise UnsafeFileError(
            f"{path}: refused to load: it holds {_unpickling_problem(e)}, not only tensors and plain data (this "
            f"project never writes such a file: it was made or changed elsewhere and is not read); "
            f"{_delete_and_rebuild(path)}") from None
    except FileNotFoundError:
        raise
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise IntegrityError(f"{path}: not a readable torch file ({first}) — the file is corrupt or truncated; "
                             f"{rebuild_hint(path)}") from None


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


# ----------------------------------------------------------------------------------------------------------------
# a CLI that stamps its own outputs
# ----------------------------------------------------------------------------------------------------------------

def add_stamp_options(parser: argparse.ArgumentParser) -> None:
    """--stamp and --rebuild CMD on the parser of a CLI that writes study files (stamp_outputs then stamps them)."""
    parser.add_argument("--stamp", action="store_true", help="write each output's checksum sidecar (FILE.sha256)")
    parser.add_argument("--rebuild", metavar="CMD", default=None,
                        help="the command that rebuilds the outputs, recorded in their sidecars (implies --stamp)")


def stamp_outputs(args: argparse.Namespace, *paths) -> None:
    """Stamp each written output (None: an optional output not asked for) when `args` asks for it (--stamp or
    --rebuild CMD, add_stamp_options); a (sub)command without those options stamps nothing."""
    rebuild = getattr(args, "rebuild", None)
    if getattr(args, "stamp", False) or rebuild is not None:
        for path in paths:
            if path is not None:
                stamp(path, rebuild=rebuild)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m study.integrity", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("stamp", help="write FILE.sha256 for each FILE")
    p.add_argument("files", nargs="+")
    p.add_argument("--rebuild", default=None, help="the command that rebuilds FILE (shown when it is bad)")
    p = sub.add_parser("verify", help="check files against their sidecars")
    p.add_argument("files", nargs="+")
    p = sub.add_parser("publish", help="verify SRC, copy it read-only to DST with a sidecar")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--rebuild", default=None)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "stamp":
            for f in args.files:
                stamp(f, rebuild=args.rebuild)
        elif args.cmd == "verify":
            for f in args.files:
                verify(f, full=True)
        else:
            publish(args.src, args.dst, rebuild=args.rebuild)
    except IntegrityError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
