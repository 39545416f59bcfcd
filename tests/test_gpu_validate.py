"""The prepared GPU validation (benchmarks/gpu_validate.py, `bash benchmarks/gpu_validate.sh`), rehearsed on the
CPU with tiny stand-ins, so a GPU run cannot fail on a typo; and its step part going on past a model that fails."""

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_validate  # noqa: E402

PAPER_MODELS = ["xs", "s", "m", "l", "xl", "xxl", "dit12", "dit15", "dit19", "dit24", "dit27"]


@pytest.mark.slow
def test_cpu_rehearsal_writes_the_report_and_every_row(tmp_path):
    import torch

    out = tmp_path / "gpu-validate"
    proc = subprocess.run(["bash", "benchmarks/gpu_validate.sh", "--cpu-rehearsal", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=1800)
    rows = pd.read_csv(out / "results.csv")
    assert (rows["status"] == "ok").all(), rows.loc[rows["status"] != "ok", ["part", "item", "status"]]
    assert proc.returncode == 0, proc.stdout[-3000:]
    # the card, driver, torch version and date on every row
    assert rows["card"].str.startswith("cpu").all() and (rows["torch"] == torch.__version__).all()
    assert rows[["card", "driver", "date"]].notna().all().all() and rows["date"].nunique() == 1
    steps = rows[rows["part"] == "step"]
    assert [item.split("~")[0] for item in steps["item"]] == PAPER_MODELS   # one row per paper model
    for engine in ("ddp", "zero2"):
        assert (steps[f"{engine}_images_per_s"] > 0).all() and (steps[f"{engine}_mfu"] > 0).all()
    parity = rows[rows["part"] == "parity"].set_index(["item", "metric"])["value"]
    for precision in ("fp32", "bf16"):                                       # through the trainer, both
        assert 0 <= parity[("t0 " + precision, "output_rel_diff")] < gpu_validate.PARITY_TOLERANCE
    study = rows[rows["part"] == "study"].set_index("item")
    assert study.loc["loss falls", "value"] < 1 and study.loc["snapshots evaluated", "value"] >= 3
    assert study.loc["trainer steps-only rate", "value"] > 0
    ratios = rows[rows["part"] == "ratios"]
    assert len(ratios) == 2 * len(PAPER_MODELS) + 1                          # ZeRO-2 / DDP ×2, trainer / bench
    assert (ratios.loc[ratios["metric"] == "throughput ZeRO-2 / DDP", "value"] > 0).all()
    assert ratios.loc[ratios["metric"] == "trainer steps-only / bench images/s", "value"].iloc[0] > 0
    assert set(rows.loc[rows["part"] == "dstar", "item"]) == {"matmul", "exact D*", "exact / matmul speed"}
    exact = rows.loc[rows["item"] == "exact D*", "detail"].iloc[0]
    assert float(exact.split("J* = ")[1].split(";")[0]) > 0                   # the D* item times real work
    report = (out / "report.md").read_text()
    assert rows["card"].iloc[0] in report and "all ok" in report
    assert all(f"| {item} |" in report for item in steps["item"])


@pytest.mark.slow
def test_a_failing_model_is_reported_and_the_rest_still_measured(tmp_path):
    """A model whose worker dies (here: an unknown size) gets its error; a fresh worker measures the rest."""
    setting = gpu_validate.cpu_rehearsal_setting()
    setting.models = [("a", "t0", (8, 1, 10), 2), ("bad", "no-such-size", (8, 1, 10), 2), ("b", "d0", (8, 1, 10), 2)]
    gpu_validate.THREADS.update(OMP_NUM_THREADS="1")
    rows = {r["item"]: r for r in gpu_validate.part_step(setting, tmp_path, budget=300, engines=("ddp",))}
    assert rows["a"]["status"] == rows["b"]["status"] == "ok"
    assert rows["bad"]["status"].startswith("ddp: failed") and "no-such-size" in rows["bad"]["status"]
    assert rows["b"]["ddp_images_per_s"] > 0


def alive(pid: int) -> bool:
    """A process that runs (a zombie waiting for its reaper does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_part_out_of_time_leaves_no_process_behind(tmp_path):
    """A part's command whose child left its process group for a session of its own (as snakemake's jobs and a
    launcher's workers do) and started a grandchild: on the timeout all three are killed."""
    import os
    import signal
    import time

    pids = tmp_path / "pids"
    grandchild = "import time; time.sleep(600)"
    child = (f"import os, subprocess, sys, time; g = subprocess.Popen([sys.executable, '-c', {grandchild!r}]); "
             f"open({str(pids)!r}, 'w').write(f'{{os.getpid()}} {{g.pid}}'); time.sleep(600)")
    parent = tmp_path / "parent.py"
    parent.write_text(f"import subprocess, sys, time\nsubprocess.Popen([sys.executable, '-c', {child!r}], "
                      "start_new_session=True)\ntime.sleep(600)\n")
    started = []
    try:
        rc, _ = gpu_validate.run([sys.executable, parent], timeout=8, log_to=tmp_path / "log")
        assert rc is None                                       # the budget ran out
        assert pids.exists(), "the grandchild did not start within the budget"
        started = [int(p) for p in pids.read_text().split()]
        deadline = time.time() + 10
        while any(alive(p) for p in started) and time.time() < deadline:
            time.sleep(0.1)
        assert not any(alive(p) for p in started), started       # main: the session's two kept running
    finally:
        for pid in started:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
