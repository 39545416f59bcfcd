"""A trainer never outlives the job that started it, and a run folder has one trainer at a time.

Killing only `snakemake` (SIGKILL from a batch system or the OOM killer) kills no job: each job's process lives on
with parent 1, and so would its trainer, writing into a run folder that the next `snakemake` trains into again. Two
ties prevent it (Linux; elsewhere they are left out):

- The job. The train rule sets TRAINER_JOB_PID=<pid>@<host> for its command (training.run_job, which launches the
  trainer and waits for it): the snakemake process that runs the job (the job shell's parent). Every training
  process on that host (each rank of a torchrun / accelerate / DeepSpeed launch inherits the variable) watches it
  from a daemon thread and exits at once when it is gone or its pid now names another process (its start time
  differs); the job's command then ends with it. Written files stay whole: every write is atomic, and the next run
  resumes from the last state.pt. Processes on other nodes of a multi-node job are stopped by srun
  (--kill-on-bad-exit) when the first node's ranks end.
- The launcher. Under a launcher (LOCAL_RANK set: the parent is torchrun's agent) the kernel's parent-death signal
  (prctl PR_SET_PDEATHSIG) sends SIGTERM when the parent dies; the parent is checked right after setting it, in case
  it died just before. A trainer started by hand from a shell has neither tie (nohup keeps working).

The run folder's lock: the global main process holds an exclusive flock on RUN/.trainer.lock (its pid, host and
start time inside) while it trains; a second trainer of the same folder stops with one line naming the folder and
the process that holds it. The kernel drops the lock when its holder dies, however it dies.

    python -m training.lifeline free RUN_DIR     exit 2, naming the holder, if a trainer holds RUN_DIR's lock
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

JOB_PID_ENV = "TRAINER_JOB_PID"
LOCK_NAME = ".trainer.lock"
POLL_SECONDS = 0.5
PR_SET_PDEATHSIG = 1


class RunFolderBusyError(RuntimeError):
    """Another trainer holds the run folder's lock; the message names the folder and that process."""


# ----------------------------------------------------------------------------------------------------------------
# the job and the launcher
# ----------------------------------------------------------------------------------------------------------------

def start_time(pid: int) -> str | None:
    """The kernel's start time of process `pid` (field 22 of /proc/PID/stat), None when there is no such process
    or it has ended (a zombie waiting for its parent counts as gone): a pid that names another process than before
    has another start time."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def watched_job(env=os.environ) -> int | None:
    """The pid of TRAINER_JOB_PID when it names a process of this host, else None."""
    value = env.get(JOB_PID_ENV, "")
    pid, _, host = value.partition("@")
    if not pid.isdigit() or (host and host != socket.gethostname()):
        return None
    return int(pid)


def _stop(why: str) -> None:
    print(f"train: {why}: stopping (the run resumes from its last state.pt)", file=sys.stderr, flush=True)
    os._exit(143)


def watch_job(pid: int, *, poll: float = POLL_SECONDS) -> threading.Thread:
    """A daemon thread that ends this process as soon as process `pid` is gone (or replaced by another)."""
    born = start_time(pid)
    if born is None:
        _stop(f"the job that started this trainer (pid {pid}) is gone")

    def watch():
        while start_time(pid) == born:
            time.sleep(poll)
        _stop(f"the job that started this trainer (pid {pid}) is gone")

    thread = threading.Thread(target=watch, name="job-watchdog", daemon=True)
    thread.start()
    return thread


def die_with_parent(sig: int = signal.SIGTERM) -> bool:
    """Ask the kernel for `sig` when the parent process dies (Linux); stop at once if it died already. Returns
    whether the signal is set."""
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent:  # reparented before the signal was set: the launcher is gone
        _stop(f"the launcher that started this trainer (pid {parent}) is gone")
    return True


def bind_to_job(env=os.environ) -> None:
    """Both ties of the module docstring, where they apply to this process."""
    if sys.platform != "linux":
        return
    if "LOCAL_RANK" in env:
        die_with_parent()
    pid = watched_job(env)
    if pid is not None:
        watch_job(pid)


# ----------------------------------------------------------------------------------------------------------------
# the run folder's lock
# ----------------------------------------------------------------------------------------------------------------

def _busy(out: Path, path: Path, f) -> RunFolderBusyError:
    f.seek(0)
    holder = f.read().strip() or "a process that wrote no name"
    return RunFolderBusyError(f"{out}: another trainer is writing this run folder ({holder}; lock {path}); wait for "
                              "it to finish or stop that process")


@contextlib.contextmanager
def run_folder_lock(out):
    """Hold RUN/.trainer.lock for the block; RunFolderBusyError naming the holder when another process has it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_NAME
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _busy(out, path, f) from None
        try:
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()} on {socket.gethostname()} since "
                    f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n")
            f.flush()
            yield path
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def check_free(out) -> None:
    """RunFolderBusyError when a trainer holds RUN's lock (a folder without one is free)."""
    path = Path(out) / LOCK_NAME
    if not path.exists():
        return
    with open(path) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _busy(out, path, f) from None


def main(argv=None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2 or args[0] != "free":
        print("usage: python -m training.lifeline free RUN_DIR", file=sys.stderr)
        return 2
    try:
        check_free(args[1])
    except RunFolderBusyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
