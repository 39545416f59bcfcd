"""A workflow training job from start to end: the run folder's lifecycle around one launch of the trainer (the train
rule's one command).

    python -m training.run_job --model M --run-dir RUN --config CFG --data DATA [--jstar CSV] --threads N
        --launch LAUNCH [--machines K] --log LOG --publish SNAPSHOT... [--rebuild CMD]

In order, every line going to LOG (appended, as the trainer's output is):
1. A trainer holds RUN's lock (training.lifeline): exit 2, naming it; nothing is cleared.
2. RUN's settings stamp (RUN/.study-config.yaml, a copy of the resolved config it was started with) trains another
   model than CFG (training.run_folder.same_settings): RUN is cleared and training starts afresh.
3. A snapshot, state.pt or DeepSpeed checkpoint file of RUN fails its checksum (training.run_folder.bad_run_files):
   cleared, afresh (training is deterministic: the retrained model is the same). A state.pt that holds more than
   tensors and plain data stops the job (exit 2): it is a file to look at, not one to train over.
4. A multi-node launch (K > 1) runs under SLURM's srun: exit 1 where there is none.
5. CFG copied to the stamp, then `OMP_NUM_THREADS=N MKL_NUM_THREADS=N LAUNCH --config CFG --model M --data DATA
   --out RUN [--jstar CSV] --no-progress` run by bash (LAUNCH is the rule's shell text: the `accelerate launch …`,
   srun or plain python line, whose rendezvous port is picked as it starts); a failed trainer's exit status is the
   job's (128 + the signal for one killed by a signal, as a shell reports it).
6. Each SNAPSHOT published: RUN/snapshots/<its name> verified and copied read-only with a sidecar that records CMD
   (study.integrity.publish); exit 2 on one that fails its checksum.

A trainer never outlives its job: the rule sets TRAINER_JOB_PID to its snakemake process, which every training
process watches (training.lifeline), and this process only waits for the launch it started. It never imports torch
(step 3 runs `python -m training.run_folder check-run RUN` in a process of its own): while the trainer runs, the job
holds little memory besides it.
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

from study import integrity
from training import lifeline, run_folder

SETTINGS_STAMP = ".study-config.yaml"
EXIT_CORRUPT = 3  # `training.run_folder check-run`: a file of the run folder fails its checksum


def exit_status(returncode: int) -> int:
    """A child's exit status as a shell reports it: 128 + the signal's number for one killed by a signal."""
    return 128 - returncode if returncode < 0 else returncode


def run_logged(log: Path, command) -> int:
    """`command` (argv, or shell text for bash) with its stdout and stderr appended to `log`: its exit status."""
    argv = ["bash", "-c", command] if isinstance(command, str) else command
    with open(log, "ab") as f:
        return exit_status(subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, check=False).returncode)


def logged(log: Path, step, *args) -> int:
    """step(*args) with its stdout and stderr appended to `log`; an uncaught exception is written there as the
    interpreter would and gives 1, as a failed `python -m` step would."""
    with open(log, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        try:
            return int(step(*args) or 0)
        except Exception:
            traceback.print_exc()
            return 1


def note(log: Path, line: str) -> None:
    with open(log, "a") as f:
        f.write(line + "\n")


def settings_changed(stamp: Path, config) -> bool:
    """Whether the run folder's settings stamp trains another model than `config` (an unreadable stamp does)."""
    try:
        return not run_folder.same_settings(stamp, config)
    except Exception:
        traceback.print_exc()
        return True


def start_clean(args, log: Path) -> int:
    """Steps 1-3 of the module docstring: 0 when training may (re)start in the run folder (cleared where it must
    start afresh), else the job's exit status."""
    run_dir, stamp = Path(args.run_dir), Path(args.run_dir) / SETTINGS_STAMP
    if run_dir.is_dir() and logged(log, lifeline.main, ["free", str(run_dir)]) != 0:
        return 2
    if stamp.exists() and settings_changed(stamp, args.config):
        note(log, f"train {args.model}: settings changed since {run_dir} was started: starting afresh")
        shutil.rmtree(run_dir)
    if run_dir.is_dir():  # a process of its own: it reads state.pt with torch, which this waiting one never holds
        check = run_logged(log, [sys.executable, "-m", "training.run_folder", "check-run", str(run_dir)])
        if check == EXIT_CORRUPT:
            note(log, f"train {args.model}: a file in {run_dir} fails its checksum: starting afresh")
            shutil.rmtree(run_dir)
        elif check != 0:
            return check
    return 0


def launcher_missing(args, log: Path) -> bool:
    """A multi-node job without srun: says so in the log."""
    if args.machines > 1 and shutil.which("srun") is None:
        note(log, f"train {args.model}: training.launch.num_machines = {args.machines} runs under SLURM (srun not "
                  "found): use --profile workflow/profiles/slurm")
        return True
    return False


def train(args, log: Path) -> int:
    """The trainer launched on the run folder (step 5), its output appended to the log: its exit status."""
    words = ["--config", args.config, "--model", args.model, "--data", args.data, "--out", args.run_dir,
             *(["--jstar", args.jstar] if args.jstar else []), "--no-progress"]
    return run_logged(log, f"OMP_NUM_THREADS={args.threads} MKL_NUM_THREADS={args.threads} {args.launch} "
                           f"{shlex.join(words)}")


def publish(run_dir, snapshots, rebuild) -> int:
    """Each declared snapshot copied read-only from the run folder with its sidecar (step 6)."""
    for dst in snapshots:
        try:
            integrity.publish(Path(run_dir) / "snapshots" / Path(dst).name, dst, rebuild=rebuild)
        except integrity.IntegrityError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    return 0


def run_job(args) -> int:
    log = Path(args.log)
    rc = start_clean(args, log)
    if rc != 0:
        return rc
    if launcher_missing(args, log):
        return 1
    Path(args.run_dir).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(args.config, Path(args.run_dir) / SETTINGS_STAMP)
    rc = train(args, log)
    if rc != 0:
        return rc
    return logged(log, publish, args.run_dir, args.publish, args.rebuild)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.run_job", description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--run-dir", required=True, help="the trainer's run folder (results/<study>/runs/<model>)")
    ap.add_argument("--config", required=True, help="the model's resolved config (results/<study>/configs/)")
    ap.add_argument("--data", required=True, help="the dataset .npz")
    ap.add_argument("--jstar", default=None, help="jstar.csv, for the optimal-loss noise schedule")
    ap.add_argument("--threads", type=int, required=True, help="OMP_NUM_THREADS of each training process")
    ap.add_argument("--launch", required=True, help="shell text that starts the trainer, up to its module name")
    ap.add_argument("--machines", type=int, default=1, help="nodes of the launch (more than 1: under srun)")
    ap.add_argument("--log", required=True, help="the job's log, appended to")
    ap.add_argument("--publish", nargs="+", required=True, metavar="SNAPSHOT",
                    help="the published copies to make, each of the run folder's snapshot of the same name")
    ap.add_argument("--rebuild", default=None, metavar="CMD", help="the command that rebuilds the published copies")
    return run_job(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
