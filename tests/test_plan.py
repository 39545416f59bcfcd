"""`snakemake plan` (study/plan.py): counted FLOPs per training image against EDM2's published cost, GPU-hours
from the stated throughput, the data shape from the config alone."""

from pathlib import Path

import pytest
import torch

from study.config import ConfigError, load_config
from study.plan import MEASURED_MFU, data_shape, format_plan, model_mfu, plan_rows

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "workflow" / "config"

# EDM2's per-size cost of one forward pass (Gflops, i.e. giga multiply-adds) of its ImageNet models (paper's
# tables; the EDM2 README has no such table). Training = forward + backward ≈ 3 forward passes = 6 × these FLOPs.
EDM2_GFLOPS = {"xs": 46, "s": 102, "m": 181, "l": 282, "xl": 406, "xxl": 552}


def test_paper_img64_flops_within_5_percent_of_edm2():
    cfg = load_config(CONFIGS / "paper-img64.yaml")
    assert data_shape(cfg)[:3] == (64, 3, 1000)
    rows, _ = plan_rows(cfg)
    by_arch = {r["arch"]: r for r in rows}
    assert set(EDM2_GFLOPS) <= set(by_arch)
    for arch, gflops in EDM2_GFLOPS.items():
        assert by_arch[arch]["flops_per_image"] == pytest.approx(6 * gflops * 1e9, rel=0.05), arch


def test_gpu_hours_follow_the_stated_throughput():
    cfg = load_config(CONFIGS / "smoke.yaml")
    cfg["plan"].update(peak_tflops=100.0, mfu=0.5)
    cfg["models"]["t2"]["plan_mfu"] = 0.25
    cfg["models"]["t1"]["training"] = {"launch": {"num_processes": 2, "num_machines": 2}}
    cfg["resources"]["train"] = {"runtime": 1}   # minutes: a job of one minute
    cfg["models"]["t2"]["resources"] = {"runtime": 2}
    rows, notes = plan_rows(cfg)
    for r in rows:
        mfu = 0.25 if r["model"] == "t2" else 0.5
        assert r["mfu"] == mfu
        assert r["total_flops"] == r["flops_per_image"] * r["total_images"]
        assert r["gpu_hours"] == pytest.approx(r["total_flops"] / (100e12 * mfu) / 3600, rel=1e-12)
        assert r["wall_hours"] == pytest.approx(r["gpu_hours"] / r["gpus"])
        assert (r["nodes"], r["gpus"]) == ((2, 2) if r["model"] == "t1" else (1, 1))
        runtime_hours = (2 if r["model"] == "t2" else 1) / 60
        assert r["jobs"] - 1 < r["wall_hours"] / runtime_hours <= r["jobs"]
    # twice the width: more FLOPs per image, in order along the ladder
    flops = [r["flops_per_image"] for r in rows]
    assert flops == sorted(flops) and flops[0] > 0
    text = format_plan(rows, notes, "smoke")
    assert "total" in text and text.count("\n") >= len(rows) + 3


def test_flops_per_image_match_the_trainers_count():
    """The plan's count equals a count of one whole training step per image (the Denoiser's loss on a batch of
    4, forward + backward), which the trainer records through the same counter."""
    from torch.utils.flop_counter import FlopCounterMode

    from models import family
    from models.denoiser import Denoiser
    from models.diffusion import get_variant
    from training.loop import per_example_losses

    cfg = load_config(CONFIGS / "smoke.yaml")
    (row, *_), _ = plan_rows(cfg)
    arch = family.arch_kwargs(row["arch"], resolution=8, channels=1)
    variant = get_variant("edm")
    den = Denoiser(family.net_from_kwargs(arch, device="meta").eval(), variant)
    x0 = torch.zeros(4, 1, 8, 8, device="meta")
    with FlopCounterMode(display=False) as counter:
        loss, _ = per_example_losses(den, variant, x0, torch.ones(4, device="meta"), torch.zeros_like(x0), None)
        loss.mean().backward()
    counted = counter.get_total_flops() / 4
    assert row["flops_per_image"] == pytest.approx(counted, rel=0.01)
    assert family.training_flops_of(arch) == row["flops_per_image"]   # what the trainer records


def test_mfu_resolution_order():
    cfg = load_config(CONFIGS / "paper-img64.yaml")
    assert model_mfu(cfg, "xs", "xs") == MEASURED_MFU["xs"]
    cfg["plan"]["mfu"] = {"xs": 0.4}
    assert model_mfu(cfg, "xs", "xs") == 0.4 and model_mfu(cfg, "s", "s") == MEASURED_MFU["s"]
    cfg["models"]["xs"]["plan_mfu"] = 0.5
    assert model_mfu(cfg, "xs", "xs") == 0.5
    cfg["plan"]["mfu"] = 0.2
    assert model_mfu(cfg, "s", "s") == 0.2


def test_schema_validates_plan_values():
    cfg = load_config(CONFIGS / "smoke.yaml")
    cfg["plan"]["mfu"] = 1.5
    with pytest.raises(ConfigError, match="plan.mfu"):
        load_config(cfg)
    cfg = load_config(CONFIGS / "smoke.yaml")
    cfg["models"]["t0"]["plan_mfu"] = 0
    with pytest.raises(ConfigError, match="models.t0.plan_mfu"):
        load_config(cfg)


def test_unknown_shape_is_named():
    cfg = load_config(CONFIGS / "smoke.yaml")
    cfg["dataset"]["spec"] = "/missing/latents.npz"
    with pytest.raises(ConfigError, match="plan.resolution"):
        data_shape(cfg)
    cfg["plan"].update(resolution=16, channels=4)
    assert data_shape(cfg)[:3] == (16, 4, 0)


@pytest.mark.parametrize("name", ["paper-img64", "paper-img512"])
def test_paper_sizes_on_several_nodes_are_those_one_node_would_take_many_jobs(name):
    """The paper configs give a size several nodes exactly when one 8-GPU node would need more than three jobs of
    the train runtime (one `snakemake` with the SLURM profile's two retries), and every size then needs at most
    two."""
    cfg = load_config(CONFIGS / f"{name}.yaml")
    runtime_hours = cfg["resources"]["train"]["runtime"] / 60
    for r in plan_rows(cfg)[0]:
        one_node_jobs = r["gpu_hours"] / 8 / runtime_hours
        assert (r["nodes"] > 1) == (one_node_jobs > 3), (r["model"], one_node_jobs)
        assert r["gpus"] == 8 * r["nodes"] and r["jobs"] <= (2 if r["nodes"] > 1 else 3), r
