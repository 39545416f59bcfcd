"""The Snakemake workflow: dry-runs of every config, incremental model sizes, resumption of a killed training job,
bad config keys (the finished smoke study's tests: tests/test_damaged_study.py).

Fast tests are dry-runs (`snakemake -n`, no job runs). The @slow ones run real studies in a temporary working
directory (`snakemake --directory TMP`), so the repository's results/ is never touched."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "workflow" / "config"
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def smk(*args, directory, timeout=1800, check=True):
    """Run snakemake from the repository root with its working directory elsewhere."""
    cmd = SNAKEMAKE + ["--directory", str(directory)] + [str(a) for a in args]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    out = p.stdout + p.stderr
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{out[-6000:]}")
    return p.returncode, out


def run_module(module: str, *args) -> tuple[int, str]:
    """`python -m module args` in this process: its exit status and its stdout and stderr together. An uncaught
    exception gives status 1 and its traceback, as the interpreter would. For the CLIs whose own start-up a test
    does not need (the workflow starts them as `python -m`; the smoke study runs that path end to end)."""
    import contextlib
    import importlib
    import io
    import traceback

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            rc = importlib.import_module(module).main([str(a) for a in args])
        except SystemExit as e:  # argparse's errors, sys.exit(...)
            rc = e.code if isinstance(e.code, int) or e.code is None else 1
            if not isinstance(e.code, (int, type(None))):
                print(e.code, file=sys.stderr)
        except Exception:
            traceback.print_exc()
            rc = 1
    return int(rc or 0), out.getvalue()


def descendants(pid: int) -> list[int]:
    """Every live descendant of `pid` (Linux /proc)."""
    children = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_when_written(cmd, path, *, timeout, settle=2.0, env=None):
    """Start `cmd` (snakemake; environment `env`, default this one) in a session of its own, wait until `path`
    exists (and `settle` seconds more), then SIGKILL it and every descendant, as if the node died (torchrun starts
    each rank in a session of its own, so the ranks are found as descendants, not by the process group)."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env=env)
    try:
        deadline = time.time() + timeout
        while not path.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert path.exists(), f"{path} was never written"
        time.sleep(settle)
    finally:
        tree = descendants(proc.pid)
        os.killpg(proc.pid, signal.SIGKILL)
        for pid in tree:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()


def job_counts(out: str) -> dict:
    """The 'Job stats' table of a dry-run as {rule: count} (without the total)."""
    counts, in_table = {}, False
    for line in out.splitlines():
        if line.startswith("job ") and "count" in line:
            in_table = True
            continue
        if in_table:
            m = re.match(r"^(\S+)\s+(\d+)\s*$", line)
            if m and m.group(1) != "total":
                counts[m.group(1)] = int(m.group(2))
            elif m:
                break
    return counts


def load_cfg(name):
    with open(CONFIGS / f"{name}.yaml") as f:
        return yaml.safe_load(f)


def write_cfg(cfg, path):
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def marks_of(cfg, model):
    sys.path.insert(0, str(REPO))
    from study.config import load_config
    from study.spec import model_training, snapshot_marks

    return snapshot_marks(model_training(load_config(cfg), model))


# ---------------------------------------------------------------------------------------------------------------
# dry-runs (fast)
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["default", "smoke", "paper-img64", "paper-img512"])
def test_dry_run_every_config(name, tmp_path):
    cfg = load_cfg(name)
    _, out = smk("-n", "-p", "--configfile", CONFIGS / f"{name}.yaml", directory=tmp_path)
    counts = job_counts(out)
    models = list(cfg["models"])
    assert {f"train_{m}" for m in models} <= set(counts), counts
    assert all(counts[f"evaluate_{m}"] == 1 for m in models)  # one job evaluates all of a model's snapshots
    assert counts["model_config"] == len(models)
    for rule in ("dataset", "eval_set", "optimal_denoiser", "jstar", "collect_losses", "models_table", "scaling",
                 "figures", "all"):
        assert counts[rule] == 1, rule
    assert counts["optimal_loss_estimator"] == len(set(cfg["optimal_loss"]["compare_estimators"])
                                                   | {cfg["optimal_loss"]["estimator"]})
    # the statistics read the EMA sweep's exponents exactly when the study has one (exponents.md's side-by-side)
    (scaling,) = [line for line in out.splitlines() if "-m analysis.scaling --losses" in line]
    sweep = f"--ema-exponents results/{cfg['study']}/analysis/ema_exponents.csv"
    assert (sweep in scaling) == ("ema_sweep" in cfg) and counts.get("ema_sweep", 0) == ("ema_sweep" in cfg)
    if name.startswith("paper"):
        check_paper_launch(out, cfg)


def test_seeds_on_an_entry_add_its_replicate_runs_to_the_dag(tmp_path):
    """`seeds: 3` on t1 adds train_t1_s1 and train_t1_s2 and their evaluations; models.json tells the statistics
    that they are seeds of t1."""
    cfg = load_cfg("default")
    cfg["models"]["t1"]["seeds"] = 3
    _, out = smk("-n", "-p", "--configfile", write_cfg(cfg, tmp_path / "seeds.yaml"), directory=tmp_path)
    counts = job_counts(out)
    assert counts["train_t1_s1"] == 1 and counts["train_t1_s2"] == 1 and counts["model_config"] == 8
    assert counts["evaluate_t1_s1"] == 1 and counts["evaluate_t1_s2"] == 1
    assert "--models results/default/analysis/models.json" in out
    cfg["models"]["t1_s2"] = {"arch": "t2"}
    code, out = smk("-n", "--configfile", write_cfg(cfg, tmp_path / "clash.yaml"), directory=tmp_path, check=False)
    assert code != 0 and "models.t1.seeds: 3 makes a run named t1_s2" in out


@pytest.mark.parametrize("name,target,min_seeds", [("diagnose", "diagnose", 1), ("schedule", "schedule", 3),
                                                   ("schedule-sweep", "schedule_sweep", 2)])
def test_dry_run_diagnose_and_schedule_studies(name, target, min_seeds, tmp_path):
    """The diagnosis and schedule studies: every model trained, evaluated once (final snapshot) and, for the schedule
    studies, scored; every arm has its seeds and a baseline of the same arch, variant and logvar to pair with."""
    sys.path.insert(0, str(REPO))
    from analysis.weighting_study import arm_of
    from study.config import load_config
    from study.spec import model_training

    cfg = load_config(CONFIGS / f"{name}.yaml")
    models = list(cfg["models"])
    _, out = smk(target, "-n", "--configfile", CONFIGS / f"{name}.yaml", directory=tmp_path)
    counts = job_counts(out)
    assert {f"train_{m}" for m in models} <= set(counts), counts
    assert all(counts[f"evaluate_{m}"] == 1 for m in models)
    assert all(len(marks_of(cfg, m)) == 1 for m in models)  # the final snapshot only: nothing else is evaluated
    assert counts.get("sample_quality", 0) == (0 if name == "diagnose" else len(models))
    assert counts[{"diagnose": "diagnosis"}.get(name, "schedule_comparison")] == 1
    training = {m: model_training(cfg, m) for m in models}
    if name == "diagnose":   # the paper's baselines have no learned log-variance
        assert not any(t["logvar"] for t in training.values())
        return
    arms = {}
    for m, t in training.items():
        key = (cfg["models"][m]["arch"], cfg["models"][m]["variant"]["name"], t["logvar"])
        arms.setdefault(arm_of(m), {"key": key, "schedule": t["schedule"]["name"], "seeds": set()})
        assert arms[arm_of(m)]["key"] == key and arms[arm_of(m)]["schedule"] == t["schedule"]["name"], m
        arms[arm_of(m)]["seeds"].add(t["seed"])
    base_seeds = {a["key"]: a["seeds"] for a in arms.values() if a["schedule"] == "baseline"}
    for arm, a in arms.items():
        assert len(a["seeds"]) >= min_seeds, arm
        assert a["seeds"] <= base_seeds[a["key"]], f"{arm}: no baseline seed to pair with"
    if name == "schedule":   # both blocks, logvar off and on, for EDM and FM
        assert {(v, lv) for _, v, lv in base_seeds} == {(v, lv) for v in ("edm", "fm-velocity") for lv in (False, True)}


def test_default_study_spans_the_ladder():
    cfg = load_cfg("default")
    archs = [m["arch"] for m in cfg["models"].values()]
    assert len(archs) >= 5 and cfg["dataset"]["spec"] == "digits"
    assert all(len(marks_of(cfg, m)) >= 3 for m in cfg["models"])
    # parameter span from models.family's table (≥ 30×): t0 … t5
    assert archs[0] == "t0" and "t5" in archs


def check_paper_launch(out, cfg):
    """Paper studies: DDP for xs/s/m, DeepSpeed ZeRO-2 for l/xl/xxl, 8 processes per node, a rendezvous port per
    job; a multi-node model's launch runs one `accelerate launch` per node under srun."""
    cmds = [line for line in out.splitlines() if "--config results/" in line and "accelerate" in line]
    assert len(cmds) == 6, cmds
    for line in cmds:
        model = re.search(r"configs/(\w+)\.yaml", line).group(1)
        launch = cfg["models"][model].get("training", {}).get("launch", {})
        machines, processes = launch.get("num_machines", 1), launch.get("num_processes", 8)
        assert processes == 8 * machines
        assert "accelerate launch" in line and f"--num_processes {processes} --num_machines {machines}" in line
        assert "--main_process_port" in line or "node_launch.sh $(" in line
        assert (f"srun --nodes={machines} --ntasks={machines} --ntasks-per-node=1" in line) == (machines > 1)
        expected = "deepspeed-zero2.yaml" if model in ("l", "xl", "xxl") else "ddp-bf16.yaml"
        assert expected in line, (model, line)
    assert cfg["training"]["batch_size"] == 2048 and cfg["variant"]["kwargs"]["sigma_data"] == 0.5
    expected_noise = {"paper-img64": (-0.8, 1.6), "paper-img512": (-0.4, 1.0)}[cfg["study"]]
    assert (cfg["variant"]["kwargs"]["P_mean"], cfg["variant"]["kwargs"]["P_std"]) == expected_noise


def rule_resources_of(out: str, rule: str) -> dict:
    """The `resources:` of a rule's first job in a dry run's output."""
    block = next(b for b in out.split("\nrule ") if b.startswith(f"{rule}:"))
    line = next(x for x in block.splitlines() if x.strip().startswith("resources:"))
    pairs = re.findall(r"(\w+)=(.*?)(?=, \w+=|$)", line.split("resources:", 1)[1].strip())
    return {k: int(v) if v.isdigit() else v for k, v in pairs}


class PluginJob:
    """What the SLURM executor plugin reads from a job: resources (attribute and get) and threads."""

    def __init__(self, resources, threads):
        self.resources = type("Resources", (dict,), {"__getattr__": dict.__getitem__})(resources)
        self.threads = threads


def test_slurm_profile_dry_run_has_gpu_resources(tmp_path):
    _, out = smk("-n", "--profile", "workflow/profiles/slurm", "--configfile", CONFIGS / "paper-img512.yaml",
                 directory=tmp_path)
    train = rule_resources_of(out, "train_xs")
    assert train["gpu"] == 8 and train["cpus_per_gpu"] == 8 and train["runtime"] == 2880
    assert rule_resources_of(out, "evaluate_xs")["gpu"] == 1


def test_multi_node_job_is_submitted_as_one_task_per_node(tmp_path):
    """The sbatch line the SLURM executor plugin builds from a multi-node train rule's resources: 4 nodes, one
    task per node with one node's CPUs, 8 GPUs on every node; its `mpi` resource makes the plugin's job step run
    the rule's shell once (the shell's srun then starts the nodes' launchers)."""
    pytest.importorskip("snakemake_executor_plugin_slurm")
    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string
    from snakemake_executor_plugin_slurm.validation import validate_slurm_extra

    _, out = smk("-n", "-p", "--profile", "workflow/profiles/slurm", "--configfile", CONFIGS / "paper-img512.yaml",
                 directory=tmp_path)
    assert "srun --nodes=4 --ntasks=4 --ntasks-per-node=1" in out and "--num_machines 4" in out
    resources = rule_resources_of(out, "train_xxl")
    assert resources["mpi"] == "srun" and "gpu" not in resources
    job = PluginJob(resources, threads=resources["cpus_per_task"])
    validate_slurm_extra(job)  # none of the options the plugin manages itself
    params = {"run_uuid": "u", "slurm_logfile": "log", "comment_str": "c", "account": "", "partition": "",
              "workdir": ""}
    sbatch = get_submit_command(job, params) + set_gres_string(job)
    for flag in ("--nodes=4", "--ntasks=4", "--cpus-per-task=64", "--ntasks-per-node=1", "--gpus-per-node=8",
                 "--mem 480000", "-t 2880"):
        assert re.search(re.escape(flag) + r"(\s|$)", sbatch), (flag, sbatch)
    assert "--gpus=" not in sbatch and "--ntasks-per-gpu" not in sbatch, sbatch


def test_adding_a_model_adds_exactly_its_jobs(tmp_path):
    cfg = load_cfg("smoke")
    _, before = smk("-n", "--configfile", write_cfg(cfg, tmp_path / "a.yaml"), directory=tmp_path)
    cfg["models"]["t3"] = {"arch": "t3"}
    _, after = smk("-n", "--configfile", write_cfg(cfg, tmp_path / "b.yaml"), directory=tmp_path)
    a, b = job_counts(before), job_counts(after)
    diff = {k: b.get(k, 0) - a.get(k, 0) for k in set(a) | set(b) if b.get(k, 0) != a.get(k, 0)}
    assert diff == {"train_t3": 1, "model_config": 1, "evaluate_t3": 1}


@pytest.mark.parametrize("where,bad", [("training", "batch_szie"), (None, "trainig"), ("evaluation", "sigmas")])
def test_bad_config_key_is_named(where, bad, tmp_path):
    cfg = load_cfg("smoke")
    (cfg.setdefault(where, {}) if where else cfg)[bad] = 3
    rc, out = smk("-n", "--configfile", write_cfg(cfg, tmp_path / "bad.yaml"), directory=tmp_path, check=False)
    assert rc != 0
    assert bad in out and "unknown key" in out


def test_bad_model_name_is_named(tmp_path):
    cfg = load_cfg("smoke")
    cfg["models"]["t-9"] = {"arch": "t0"}
    rc, out = smk("-n", "--configfile", write_cfg(cfg, tmp_path / "bad.yaml"), directory=tmp_path, check=False)
    assert rc != 0 and "t-9" in out


@pytest.mark.parametrize("change,named", [
    (lambda c: c["models"]["t1"].update(arch="t99"), ["models.t1.arch", "'t99'"]),
    (lambda c: c["evaluation"].update(sigma_min=50), ["evaluation.sigma_min", "50", "40"]),
    (lambda c: c["training"]["launch"].update(accelerate_config="workflow/accelerate/nope.yaml"),
     ["training.launch.accelerate_config", "nope.yaml"]),
    (lambda c: c["training"]["launch"].update(num_processes=3), ["training.batch_size", "64"]),
    (lambda c: c["training"].update(total_images=32, snapshots={"count": 2, "first_images": 16}),
     ["training.total_images", "32", "64"]),
    (lambda c: c["models"].update(T1={"arch": "t1"}), ["models.T1", "models.t1"]),
], ids=["arch", "sigma", "accelerate", "batch", "length", "case"])
def test_bad_value_fails_the_dry_run_naming_it(change, named, tmp_path):
    """A representative few of study/checks.py's checks (tests/test_checks.py has every kind) through `-n`: each
    line names the key, the config's own value and the config file."""
    cfg = load_cfg("smoke")
    change(cfg)
    bad = write_cfg(cfg, tmp_path / "bad.yaml")
    rc, out = smk("-n", "--configfile", bad, directory=tmp_path, check=False)
    assert rc != 0
    assert all(s in out for s in named), out[-3000:]
    lines = [line for line in out.splitlines() if named[0] in line]
    assert lines and all(str(bad) in line for line in lines), out[-3000:]
    assert not (tmp_path / "results").exists()


def test_plan_reads_no_dataset(tmp_path):
    """`snakemake plan` on a study whose data is not there: the table, the CSV, nothing trained or read."""
    cfg = load_cfg("smoke")
    cfg["dataset"] = {"spec": f"imagefolder:{tmp_path / 'missing'}", "resolution": 8, "conditional": False}
    cfg["plan"] = {"mfu": 0.25, "peak_tflops": 100}
    _, out = smk("plan", "--cores", "1", "--configfile", write_cfg(cfg, tmp_path / "p.yaml"), directory=tmp_path)
    plan = pd.read_csv(tmp_path / "results" / "smoke" / "plan.csv")
    assert list(plan["model"]) == list(cfg["models"])
    assert {"model", "arch", "params", "flops_per_image", "total_images", "total_flops", "gpus",
            "gpu_hours"} <= set(plan.columns)
    assert list(plan["gpu_hours"] * 3600 * 100e12 * 0.25) == pytest.approx(list(plan["total_flops"]), rel=1e-9)
    assert "total" in out and "plan of study smoke" in out
    assert not (tmp_path / "results" / "smoke" / "data").exists()
    assert not (tmp_path / "results" / "smoke" / "runs").exists()


# ---------------------------------------------------------------------------------------------------------------
# the smoke study end to end: tests/test_damaged_study.py (every test of the finished study in one module, so the
# one test worker that runs them runs the study once)
# ---------------------------------------------------------------------------------------------------------------

# ---------------------------------------------------------------------------------------------------------------
# a training job killed midway resumes (slow)
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_killed_training_resumes(tmp_path):
    import torch

    cfg = load_cfg("smoke")
    cfg["study"] = "resume"
    cfg["models"] = {"t1": {"arch": "t1"}}
    cfg["training"].update(total_images=3072, batch_size=64, state_every_images=128,
                           snapshots={"images": [256, 3072]})
    config = write_cfg(cfg, tmp_path / "resume.yaml")
    r = tmp_path / "results" / "resume"
    run, first = r / "runs" / "t1", r / "runs" / "t1" / "snapshots" / "snapshot-000000256.pt"
    target = "results/resume/runs/t1/done.json"
    cmd = SNAKEMAKE + ["--directory", str(tmp_path), "--configfile", str(config), "--cores", "2", target]
    kill_when_written(cmd, first, timeout=1200)  # snakemake and the trainer: as if the node died
    assert not (run / "done.json").exists(), "training finished before it could be killed; make it longer"
    state_mtime = (run / "state.pt").stat().st_mtime_ns
    time.sleep(4)
    assert (run / "state.pt").stat().st_mtime_ns == state_mtime, "the trainer outlived the kill"
    killed_at = int(torch.load(run / "state.pt", weights_only=True)["images_seen"])
    assert 256 <= killed_at < 3072
    # the trainer writes files atomically (temp + rename), so a rewritten snapshot gets a new inode; Snakemake
    # may touch outputs (mtime), which keeps the inode
    first_inode, first_bytes = first.stat().st_ino, first.read_bytes()

    smk("--unlock", "--configfile", config, directory=tmp_path)  # a SIGKILLed snakemake leaves its lock
    smk("--configfile", config, "--cores", "2", target, directory=tmp_path, timeout=1800)

    assert (run / "done.json").exists()
    # resumed, not restarted: the snapshot written before the kill is the same file
    assert first.stat().st_ino == first_inode and first.read_bytes() == first_bytes
    for mark in (256, 3072):
        declared = r / "snapshots" / "t1" / f"snapshot-{mark:09d}.pt"
        snap = torch.load(declared, weights_only=True)
        assert snap["images_seen"] == mark and snap["model"] == "t1"
        assert all(torch.isfinite(v).all() for v in snap["ema"].values() if v.is_floating_point())
    log = pd.read_json(run / "log.jsonl", lines=True)
    seen = log["images_seen"].to_numpy()
    assert (seen[1:] > seen[:-1]).all() and seen[-1] == 3072  # one consistent history, no repeats
    from models.denoiser import Denoiser

    den = Denoiser.from_snapshot(r / "snapshots" / "t1" / "snapshot-000003072.pt")
    x = torch.randn(4, 1, 8, 8)
    assert torch.isfinite(den(x, torch.full((4,), 0.5))).all()
