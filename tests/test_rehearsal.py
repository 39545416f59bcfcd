"""The paper rehearsal (workflow/config/paper-rehearsal.yaml): its dry-run (fast), the study end to end on CPU and
a killed two-process training job that resumes (slow). Real runs go to a temporary working directory."""

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "workflow" / "config" / "paper-rehearsal.yaml"
sys.path.insert(0, str(REPO))

from test_workflow import SNAKEMAKE, kill_when_written, smk  # noqa: E402  (tests/ is on sys.path under pytest)

from study.config import load_config  # noqa: E402
from study.spec import micro_batch, model_training, snapshot_marks  # noqa: E402


def test_rehearsal_mirrors_the_paper_config():
    """Same study shape as paper-img64: conditional image folder, cDOL, the paper's σ distribution, DDP for the
    small sizes and DeepSpeed ZeRO-2 for the large ones (both over two processes), micro-batching, bf16,
    resumable state, eight snapshots."""
    cfg, paper = load_config(CONFIG), load_config(REPO / "workflow" / "config" / "paper-img64.yaml")
    assert cfg["dataset"]["spec"].startswith("imagefolder:") and cfg["dataset"]["conditional"]
    assert cfg["variant"] == paper["variant"] and cfg["optimal_loss"]["estimator"] == "cdol"
    launchers = []
    for name in cfg["models"]:
        tr = model_training(cfg, name)
        launch = tr["launch"]
        launchers.append((Path(launch["accelerate_config"]).name, launch["num_processes"]))
        batch_gpu, rounds = micro_batch(tr, launch["num_processes"])
        assert rounds > 1, f"{name}: micro-batching must be active"
        assert tr["mixed_precision"] == "bf16" and 0 < tr["state_every_images"] < tr["total_images"]
        assert len(snapshot_marks(tr)) == 8
        assert tr["ema"]["kind"] == "power"
        assert tr["ema"]["sigma_rel"] == model_training(paper, "xs")["ema"]["sigma_rel"]
    assert cfg["ema_sweep"] == paper["ema_sweep"]
    assert ("ddp-bf16.yaml", 2) in launchers and ("deepspeed-zero2.yaml", 2) in launchers


def test_rehearsal_dry_run_generates_the_image_folder_first(tmp_path):
    _, out = smk("-n", "-p", "--configfile", CONFIG, directory=tmp_path)
    assert "rule digits_imagefolder:" in out and "rule dataset:" in out
    assert out.index("rule digits_imagefolder:") < out.index("rule dataset:")
    # two processes each; on CPU DDP is told so (ACCELERATE_USE_CPU), DeepSpeed must not be (it would run as DDP)
    launches = {re.search(r"configs/(\w+)\.yaml", line).group(1): line for line in out.splitlines()
                if "accelerate launch" in line and "--config results/" in line}
    assert sorted(launches) == ["t0", "t1", "t2", "t3"]
    for model, line in launches.items():
        deepspeed = model in ("t2", "t3")
        assert "--num_processes 2" in line and ("deepspeed-zero2.yaml" in line) == deepspeed, line
        assert ("ACCELERATE_USE_CPU=1" in line) != deepspeed, line


def test_digits_imagefolder_script(tmp_path):
    from training.dataset import load_dataset

    out = tmp_path / "pngs"
    subprocess.run([sys.executable, str(REPO / "workflow/scripts/digits_imagefolder.py"), "--out", str(out),
                    "--resolution", "12"], check=True, capture_output=True)
    assert sorted(p.name for p in out.iterdir()) == [str(k) for k in range(10)]
    ds = load_dataset(f"imagefolder:{out}")
    digits = load_dataset("digits", resolution=12)
    assert tuple(ds.x.shape) == (1797, 3, 12, 12) and ds.num_classes == 10
    # labels follow the class folders; pixels are the digits' within uint8 rounding, in every channel
    order = sorted(range(1797), key=lambda i: (int(digits.labels[i]), i))
    assert ds.labels.tolist() == [int(digits.labels[i]) for i in order]
    assert float((ds.x[:, 0] - digits.x[order, 0]).abs().max()) <= 1 / 127.5 + 1e-6
    assert bool((ds.x[:, 0] == ds.x[:, 2]).all())


@pytest.mark.slow
def test_rehearsal_end_to_end(tmp_path):
    t0 = time.time()
    smk("--configfile", CONFIG, "--cores", "2", directory=tmp_path, timeout=1800)
    print(f"\npaper rehearsal wall time: {time.time() - t0:.0f} s")
    cfg = load_config(CONFIG)
    r = tmp_path / "results" / cfg["study"]
    for name in cfg["models"]:
        tr = model_training(cfg, name)
        done = json.loads((r / "runs" / name / "done.json").read_text())
        assert done["world_size"] == tr["launch"]["num_processes"] and done["images_seen"] == tr["total_images"]
        assert len(done["snapshots"]) == 8 and done["config_fingerprint"]["dataset"]["label_dim"] == 10
        if "deepspeed" in tr["launch"]["accelerate_config"]:
            assert any((r / "runs" / name / "state-ds").iterdir())    # ZeRO's own checkpoint was written
    assert (r / "optimal_loss" / "jstar.csv").read_text().count("cdol") > 0
    sweep = (r / "analysis" / "ema_sweep.csv").read_text().splitlines()
    assert len(sweep) == 1 + len(cfg["models"]) * 12  # a header, then every model at every σ_rel
    for fig in ("jstar", "loss_per_sigma", "gap_per_sigma", "scaling", "ema_sweep"):
        assert (r / "figures" / f"{fig}.png").stat().st_size > 1000, fig


@pytest.mark.slow
def test_killed_two_process_training_resumes(tmp_path):
    """A two-process (DDP) training job of the rehearsal killed after its first snapshot resumes on the rerun."""
    import torch

    cfg = yaml.safe_load(CONFIG.read_text())
    cfg["models"] = {"t0": cfg["models"]["t0"]}
    cfg["training"].update(total_images=4096, state_every_images=128, snapshots={"images": [256, 4096]})
    config = tmp_path / "resume.yaml"
    config.write_text(yaml.safe_dump(cfg))
    r = tmp_path / "results" / cfg["study"]
    run, first = r / "runs" / "t0", r / "runs" / "t0" / "snapshots" / "snapshot-000000256.pt"
    target = f"results/{cfg['study']}/runs/t0/done.json"
    cmd = SNAKEMAKE + ["--directory", str(tmp_path), "--configfile", str(config), "--cores", "2", target]
    kill_when_written(cmd, first, timeout=1200)  # snakemake, the launcher and both ranks, as if the node died
    assert not (run / "done.json").exists(), "training finished before it could be killed; make it longer"
    state_mtime = (run / "state.pt").stat().st_mtime_ns
    time.sleep(4)
    assert (run / "state.pt").stat().st_mtime_ns == state_mtime, "a rank outlived the kill"
    state = torch.load(run / "state.pt", weights_only=True)
    assert state["world_size"] == 2 and 256 <= state["images_seen"] < 4096
    first_inode = first.stat().st_ino

    smk("--unlock", "--configfile", config, directory=tmp_path)
    smk("--configfile", config, "--cores", "2", target, directory=tmp_path)
    done = json.loads((run / "done.json").read_text())
    assert done["images_seen"] == 4096 and done["world_size"] == 2
    assert first.stat().st_ino == first_inode    # resumed, not restarted: the first snapshot was kept
    seen = [json.loads(line)["images_seen"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert seen == sorted(set(seen)) and seen[-1] == 4096


# ---------------------------------------------------------------------------------------------------------------
# several nodes: the train rule's srun launch, with SLURM's srun and scontrol stood in for on localhost
# ---------------------------------------------------------------------------------------------------------------

FAKE_SRUN = r"""#!/usr/bin/env bash
# srun inside an allocation, on one host: starts --ntasks copies of the command, task i as node i of a job whose
# nodes are all localhost (one task per node); fails when any task fails
ntasks=1
while [[ $# -gt 0 && $1 == -* ]]; do
    case $1 in --ntasks=*) ntasks=${1#--ntasks=} ;; esac
    shift
done
nodes=localhost; for ((i = 1; i < ntasks; i++)); do nodes+=,localhost; done
pids=()
for ((i = 0; i < ntasks; i++)); do
    SLURM_NODEID=$i SLURM_PROCID=$i SLURM_STEP_NODELIST=$nodes "$@" &
    pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""
FAKE_SCONTROL = r"""#!/usr/bin/env bash
[ "$1 $2" = "show hostnames" ] || { echo "fake scontrol: only 'show hostnames'" >&2; exit 2; }
tr ',' '\n' <<< "$3"
"""


def fake_slurm(folder: Path) -> dict:
    """An environment whose PATH finds stand-ins for srun and scontrol in `folder`."""
    folder.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (folder / name).write_text(text)
        (folder / name).chmod(0o755)
    import os

    return {**os.environ, "PATH": f"{folder}:{os.environ['PATH']}"}


ENGINE_CONFIGS = {"ddp": "workflow/accelerate/ddp-bf16.yaml", "zero2": "workflow/accelerate/deepspeed-zero2.yaml"}


def multi_node_config(tmp_path, machines, engine):
    """The rehearsal's t0 on the digits with num_machines `machines` (one process per machine) under `engine`."""
    cfg = yaml.safe_load(CONFIG.read_text())
    cfg["study"] = f"{engine}{machines}"
    cfg["dataset"] = {"spec": "digits", "conditional": True}
    cfg["models"] = {"t0": cfg["models"]["t0"]}
    cfg["training"].update(total_images=2048, state_every_images=128, snapshots={"images": [256, 2048]})
    cfg["training"]["launch"] = {"accelerate_config": ENGINE_CONFIGS[engine], "num_processes": 2,
                                 "num_machines": machines}
    path = tmp_path / f"{engine}{machines}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, f"results/{engine}{machines}/runs/t0"


def final_weights(run: Path) -> dict:
    """The EMA of a finished run's last snapshot, and the net of its last state.pt where it holds one (DDP;
    DeepSpeed keeps the net in its own checkpoint)."""
    import torch

    state = torch.load(run / "state.pt", weights_only=True)
    snap = torch.load(run / "snapshots" / f"snapshot-{state['images_seen']:09d}.pt", weights_only=True)
    return {**{f"net.{k}": v for k, v in (state.get("net") or {}).items()},
            **{f"ema.{k}": v for k, v in snap["ema"].items()}}


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "zero2"])
def test_two_machines_train_what_one_machine_does_and_resume_after_a_kill(tmp_path, engine):
    """Two "machines" on localhost — the train rule's srun line starting workflow/scripts/node_launch.sh once per
    node: machine ranks 0 and 1, one process each (DDP, or DeepSpeed ZeRO-2 partitioned over both), the
    rendezvous on the first node — killed (snakemake, srun, the launchers and the ranks) after the first snapshot
    and rerun, end with the same weights as one machine with two processes trained without interruption."""
    import subprocess

    import torch

    env = fake_slurm(tmp_path / "bin")
    one, one_run = multi_node_config(tmp_path, 1, engine)
    two, two_run = multi_node_config(tmp_path, 2, engine)
    smk("--configfile", one, "--cores", "2", f"{one_run}/done.json", directory=tmp_path)

    run = tmp_path / two_run
    first = run / "snapshots" / "snapshot-000000256.pt"
    cmd = SNAKEMAKE + ["--directory", str(tmp_path), "--configfile", str(two), "--cores", "2", f"{two_run}/done.json"]
    kill_when_written(cmd, first, timeout=1200, env=env)
    assert not (run / "done.json").exists(), "training finished before it could be killed; make it longer"
    assert 256 <= torch.load(run / "state.pt", weights_only=True)["images_seen"] < 2048
    first_inode = first.stat().st_ino
    smk("--unlock", "--configfile", two, directory=tmp_path)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    done = json.loads((run / "done.json").read_text())
    assert done["world_size"] == 2 and done["images_seen"] == 2048
    # one process group across both launchers: only its global rank 0 reports (two groups would both report)
    log = (tmp_path / "results" / f"{engine}2" / "logs" / "train_t0.log").read_text()
    assert log.count('"status": "done"') == 1, log[-3000:]
    assert first.stat().st_ino == first_inode  # resumed, not restarted: the first snapshot was kept

    a, b = final_weights(tmp_path / one_run), final_weights(run)
    assert a.keys() == b.keys() and len(a) > 10
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
