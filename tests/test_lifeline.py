"""A trainer never outlives the job that started it, and one run folder has one trainer (training/lifeline.py): the
two ties on bare processes (fast), snakemake SIGKILLed alone during a plain and a 2-process DDP training, and two
trainers started on one folder."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_workflow import REPO, SNAKEMAKE, load_cfg, run_module, write_cfg

from study.checks import module_missing
from training import lifeline


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie does not: it has stopped and waits for its parent to reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def processes_in(folder: Path, text: str = "") -> list[int]:
    """Live processes working in `folder` (their current directory) whose command line holds `text`."""
    found, folder = [], os.path.realpath(folder)
    for entry in Path("/proc").iterdir():
        try:
            here = os.readlink(entry / "cwd")
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if here == folder and text in cmdline and alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(0.2)


def kill_all(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# a process that binds itself to its job or launcher, says so, and would then sleep for a minute
BOUND = ("import sys, time; sys.path.insert(0, {root!r}); from training import lifeline; lifeline.bind_to_job(); "
         "print('bound', flush=True); time.sleep(60)")


def start_bound(shell_line: str, env: dict) -> tuple[subprocess.Popen, int]:
    """`sh -c shell_line` whose line starts the BOUND python in the background (its pid on the first output line),
    then sleeps: (the shell, the bound process's pid) once the bound process has bound itself."""
    code = BOUND.format(root=str(REPO))
    sh = subprocess.Popen(["sh", "-c", shell_line.format(python=sys.executable, code=code)], env=env,
                          stdout=subprocess.PIPE, text=True, start_new_session=True)
    pid = int(sh.stdout.readline())
    assert sh.stdout.readline().strip() == "bound"
    return sh, pid


def test_the_watchdog_stops_a_trainer_whose_job_is_gone():
    job = subprocess.Popen(["sleep", "60"])
    env = {**os.environ, lifeline.JOB_PID_ENV: f"{job.pid}@{socket.gethostname()}"}
    env.pop("LOCAL_RANK", None)
    sh, pid = start_bound("{python} -c \"{code}\" & echo $!; wait", env)
    try:
        time.sleep(1)
        assert alive(pid)  # bound, and its job is alive
        job.kill()  # not reaped yet: a zombie is gone too
        wait_until(lambda: not alive(pid), 5, "the bound process to stop")
        job.wait()
    finally:
        kill_all([pid, sh.pid])
        sh.wait()


def test_a_job_on_another_host_is_not_watched():
    assert lifeline.watched_job({lifeline.JOB_PID_ENV: f"{os.getpid()}@not-{socket.gethostname()}"}) is None
    assert lifeline.watched_job({lifeline.JOB_PID_ENV: f"{os.getpid()}@{socket.gethostname()}"}) == os.getpid()


def test_a_rank_dies_with_its_launcher():
    """Under a launcher (LOCAL_RANK set) the parent-death signal ends the process when its parent is killed."""
    env = {**os.environ, "LOCAL_RANK": "0"}
    env.pop(lifeline.JOB_PID_ENV, None)
    # the launcher: a shell that starts the rank and waits (it stays its parent)
    sh, pid = start_bound("{python} -c \"{code}\" & echo $!; wait", env)
    try:
        assert alive(pid)
        os.kill(sh.pid, signal.SIGKILL)
        sh.wait()
        wait_until(lambda: not alive(pid), 5, "the rank to die with its launcher")
    finally:
        kill_all([pid])


def test_a_second_trainer_of_one_folder_is_refused(tmp_path):
    cfg = load_cfg("smoke")
    cfg["models"] = {"t0": {"arch": "t0"}}
    cfg["training"].update(total_images=10_000_000, snapshots={"count": 1}, log_every_images=64)
    config = write_cfg(cfg, tmp_path / "long.yaml")
    out = tmp_path / "run"
    args = ["--config", str(config), "--model", "t0", "--data", "digits", "--out", str(out), "--no-progress"]
    first = subprocess.Popen([sys.executable, "-m", "training.train", *args], cwd=REPO, stderr=subprocess.DEVNULL,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        wait_until(lambda: (out / "log.jsonl").exists(), 120, "the first trainer to train")
        rc, text = run_module("training.train", *args, "--stop-after-images", "64")
        (line,) = [line for line in text.splitlines() if line.startswith("error:")]
        assert rc == 2 and f"{out}: another trainer is writing this run folder (pid {first.pid} on" in line
        rc, text = run_module("training.lifeline", "free", out)  # the train rule's check before it clears a folder
        assert rc == 2 and f"pid {first.pid}" in text
        assert first.poll() is None  # the first one trains on
    finally:
        first.kill()
        first.wait()
    assert run_module("training.lifeline", "free", out)[0] == 0  # the kernel drops a dead holder's lock


LAUNCHES = {"t0": {"accelerate_config": "workflow/accelerate/cpu.yaml", "num_processes": 1},
            "t1": {"accelerate_config": "workflow/accelerate/ddp-bf16.yaml", "num_processes": 2},
            "t2": {"accelerate_config": "workflow/accelerate/deepspeed-zero2.yaml", "num_processes": 2}}


@pytest.mark.slow
def test_killing_snakemake_alone_stops_its_trainers(tmp_path):
    """SIGKILL to the snakemake process only (as a batch system or the OOM killer may), while it trains one model
    plainly, one with 2-process DDP and one with 2-process DeepSpeed ZeRO-2 (where installed): 15 s later no process
    of the study runs (each rank watches the job's snakemake process; torchrun's agents end with their ranks)."""
    launches = {m: launch for m, launch in LAUNCHES.items() if m != "t2" or not module_missing("deepspeed")}
    cfg = load_cfg("smoke")
    cfg["study"] = "orphans"
    cfg["models"] = {m: {"arch": "t0", "training": {"launch": launch}} for m, launch in launches.items()}
    cfg["training"].update(total_images=10_000_000, snapshots={"count": 1}, log_every_images=64)
    config = write_cfg(cfg, tmp_path / "orphans.yaml")
    runs = tmp_path / "results" / "orphans" / "runs"
    cmd = SNAKEMAKE + ["--directory", str(tmp_path), "--configfile", str(config), "--cores", "8",
                       *(f"results/orphans/runs/{m}/done.json" for m in launches)]
    smk = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    trainers = []
    try:
        wait_until(lambda: all((runs / m / "log.jsonl").exists() for m in launches), 400, "every model to train")
        ranks = sum(launch["num_processes"] for launch in launches.values())
        wait_until(lambda: len(processes_in(tmp_path, "-m training.train ")) >= ranks, 60, "every rank to start")
        trainers = processes_in(tmp_path, "-m training.train ")
        os.kill(smk.pid, signal.SIGKILL)
        smk.wait()
        try:
            wait_until(lambda: not processes_in(tmp_path), 15, "the job's processes to end")
        except AssertionError:
            raise AssertionError(f"still running 15 s after snakemake was killed: {processes_in(tmp_path)} "
                                 f"(the trainers were {trainers})") from None
    finally:
        kill_all(processes_in(tmp_path))
