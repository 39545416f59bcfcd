"""Every engine trains the same net: the plain trainer, 2-process DDP and DeepSpeed ZeRO-2 with 1 and 2 processes
(CPU, gloo) end one config — dropout on, micro-batched where it can be — with the same weights and gradients;
EDM2's forced weight normalisation reaches the weights each optimizer keeps (ZeRO's fp32 master partitions); a
ZeRO-2 run stopped midway resumes to the uninterrupted weights; under bf16 the weights, the gradients and the EMA
stay fp32 and DDP and ZeRO-2 agree.  The multi-process runs are slow and shared between the tests; the ZeRO
fragment arithmetic is checked fast on a partition split over two simulated ranks."""

import json
import re
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml
from test_train import free_port, read_log, run_cli

from models.edm2 import normalize
from models.family import build
from models.weight_norm import channel_blocks, channel_rms, forced_weights, normalize_forced_weights_
from training.train import check_fp32_engine, train

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
DS_CONFIG = str(ROOT / "workflow/accelerate/deepspeed-zero2.yaml")

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ---------------------------------------------------------------------------------------------------------------
# fast: the ZeRO-1/2 path's arithmetic on a simulated partition
# ---------------------------------------------------------------------------------------------------------------

def test_channel_blocks_tile_a_fragment():
    for start, numel, fan_in in ((0, 12, 4), (3, 10, 4), (5, 2, 4), (8, 4, 4), (1, 30, 7)):
        blocks = list(channel_blocks(start, numel, fan_in))
        covered = torch.cat([torch.arange(numel)[part] for _, _, part in blocks])
        assert torch.equal(covered, torch.arange(numel))            # every element once, in order
        for channel, count, part in blocks:
            elements = torch.arange(start, start + numel)[part]     # positions in the flattened weight
            assert torch.equal(elements // fan_in, torch.arange(channel, channel + count).repeat_interleave(
                fan_in)) if count > 1 else bool((elements // fan_in == channel).all())


class FakeMaster(types.SimpleNamespace):
    """DeepSpeed's link from a parameter to its fragment of the flat fp32 master partition (param._hp_mapping)."""

    def get_hp_fragment(self):
        return self.fragment


def simulated_rank(net, flat_master, rank_start, rank_end):
    """Link net's parameters to their fragments of [rank_start, rank_end) of the flat master, as ZeRO-1/2 do."""
    offset = 0
    for p in net.parameters():
        lo, hi = max(offset, rank_start), min(offset + p.numel(), rank_end)
        p._hp_mapping = None if lo >= hi else FakeMaster(
            fragment=flat_master[lo - rank_start:hi - rank_start],
            lp_fragment_address=types.SimpleNamespace(start=lo - offset, numel=hi - lo))
        offset += p.numel()


def test_zero_master_fragments_are_normalised_like_the_whole_weight():
    """Two ranks own the flat fp32 master split mid-channel; after normalize_forced_weights_ each rank's master
    fragments and its module copy are exactly the normalised weights of one process."""
    torch.manual_seed(0)
    reference = build("t0", resolution=8, channels=1, device="cpu")
    with torch.no_grad():
        for w in forced_weights(reference):
            w.mul_(torch.rand(w.shape[0]).add(0.5).reshape((-1,) + (1,) * (w.ndim - 1)))   # off the sphere
    flat = torch.cat([p.detach().reshape(-1) for p in reference.parameters()])
    cut = flat.numel() // 2 + 3   # not on a channel boundary
    names = [n for n, _ in reference.named_parameters()]
    expected = {n: p.detach().clone() for n, p in reference.named_parameters()}
    normalize_forced_weights_(forced_weights(reference))            # one process: the module's own weights
    partitions = []
    for lo, hi in ((0, cut), (cut, flat.numel())):
        replica = build("t0", resolution=8, channels=1, device="cpu")
        replica.load_state_dict({**reference.state_dict(), **expected})
        master = flat[lo:hi].clone()
        simulated_rank(replica, master, lo, hi)
        normalize_forced_weights_(forced_weights(replica))
        partitions.append(master)
        for n, p in replica.named_parameters():                    # every rank's full module copy
            assert torch.equal(p, reference.get_parameter(n)), n
    flat_after = torch.cat(partitions)
    offset = 0
    for n in names:
        p = reference.get_parameter(n)
        assert torch.equal(flat_after[offset:offset + p.numel()].view_as(p), p), n   # the master partitions
        offset += p.numel()
    assert all(float((channel_rms(w) - 1).abs().max()) < 1e-3 for w in forced_weights(reference))  # eps / rms


def test_deepspeed_engine_must_run_fp32():
    check_fp32_engine({"zero_optimization": {"stage": 2}, "bf16": {"enabled": False}})
    with pytest.raises(ValueError, match="enables bf16"):
        check_fp32_engine({"bf16": {"enabled": True}})
    with pytest.raises(ValueError, match="enables fp16"):
        check_fp32_engine({"fp16": {"enabled": "true"}})
    with pytest.raises(ValueError, match="ZeRO stage 3 is not supported"):
        check_fp32_engine({"zero_optimization": {"stage": 3}})


# ---------------------------------------------------------------------------------------------------------------
# slow: the engines, launched as a user launches them
# ---------------------------------------------------------------------------------------------------------------

# Six steps of 32 images at EDM2's lr without ramp-up (every weight moves from the second step on: EDM2's zero output
# gain lets the first move only the gains), dropout on, EMA half-life 0 (a snapshot holds the weights right after
# its step).
PARITY = dict(total_images=192, batch_size=32, lr=0.01, lr_rampup_images=0, lr_decay_images=0,
              ema_halflife_images=0, grad_clip=None, dropout=0.1, snapshots={"images": [96, 192]},
              log_every_images=32)
FINAL = "snapshots/snapshot-000000192.pt"


def launcher(engine: str) -> tuple[list[str], dict]:
    """The command prefix and environment of an engine, as a user (or the workflow) launches it."""
    if engine == "ddp-2":
        return [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port())], \
            {"ACCELERATE_USE_CPU": "1"}
    processes = {"zero2-1": "1", "zero2-2": "2"}[engine]
    return [str(BIN / "accelerate"), "launch", "--config_file", DS_CONFIG, "--num_processes", processes,
            "--main_process_port", str(free_port())], {}


def launch(engine, config, data, out, *extra, cwd=ROOT):
    prefix, env = launcher(engine)
    run_cli(prefix + ["-m", "training.train", "--config", str(config), "--model", "t0", "--data", str(data),
                      "--out", str(out), "--no-progress", *extra], {"PYTHONPATH": str(ROOT), **env},
            timeout=1200, cwd=cwd)
    return out


def write_config(folder: Path, **training) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump({"study": "engines", "training": {**PARITY, **training},
                                    "models": {"t0": {"arch": "t0"}}}))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory, digits):
    from training.dataset import save_npz

    return save_npz(digits, tmp_path_factory.mktemp("data") / "digits.npz")


@pytest.fixture(scope="module")
def fp32_runs(tmp_path_factory, data):
    """The plain trainer (in-process, whole batches) and the three launched engines; DDP and 2-process ZeRO-2
    split each process's 16 images into 2 micro-batches of 8."""
    from study.config import load_config

    root = tmp_path_factory.mktemp("fp32")
    whole, split = write_config(root / "cfg-whole"), write_config(root / "cfg-split", batch_gpu=8)
    runs = {"plain": root / "plain"}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # as every launched process (a module fixture runs before the one_thread fixture)
    try:
        train(load_config(whole), "t0", data, runs["plain"], progress=False)
    finally:
        torch.set_num_threads(threads)
    for engine, config in (("ddp-2", split), ("zero2-1", whole), ("zero2-2", split)):
        runs[engine] = launch(engine, config, data, root / engine)
    return runs


def param_names():
    return [n for n, _ in build("t0", resolution=8, channels=1).named_parameters()]


def flat(tensors: dict) -> torch.Tensor:
    """The parameters in the net's order, flattened and concatenated: the layout of DeepSpeed's flat group."""
    return torch.cat([tensors[n].reshape(-1).to(torch.float32) for n in param_names()])


def kept(run: Path, what: str) -> torch.Tensor:
    """The weights ("weights") or Adam's first moment ("exp_avg") as the run's optimizer keeps them, flat: the
    module's and torch's Adam state under plain/DDP, DeepSpeed's fp32 partitions (all ranks) under ZeRO."""
    state = torch.load(run / "state.pt", weights_only=True)
    if state.get("ds_dir") is None:
        if what == "weights":
            return flat(state["net"])
        moments = state["optimizer"]["state"]
        return torch.cat([moments[i]["exp_avg"].reshape(-1) for i in range(len(moments))])
    files = sorted((run / state["ds_dir"]).rglob("zero_pp_rank_*_optim_states.pt"),
                   key=lambda f: int(re.search(r"zero_pp_rank_(\d+)_", f.name).group(1)))
    assert len(files) == state["world_size"]
    parts = []
    for f in files:
        opt = torch.load(f, weights_only=False, map_location="cpu")["optimizer_state_dict"]
        parts.append(opt["single_partition_of_fp32_groups"][0] if what == "weights"
                     else opt["base_optimizer_state"]["state"][0]["exp_avg"])
    whole = torch.cat(parts).detach()
    n = sum(build("t0", resolution=8, channels=1).get_parameter(p).numel() for p in param_names())
    assert torch.all(whole[n:] == 0)   # only alignment padding beyond the parameters
    return whole[:n]


def zero_module(run: Path) -> dict:
    state = torch.load(run / "state.pt", weights_only=True)
    (model_file,) = (run / state["ds_dir"]).rglob("mp_rank_00_model_states.pt")
    return torch.load(model_file, weights_only=False, map_location="cpu")["module"]


def max_relative_difference(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max()) for k in b)


def forced_keys():
    from models.edm2 import MPConv

    return [n + ".weight" for n, m in build("t0", resolution=8, channels=1).named_modules() if isinstance(m, MPConv)]


@pytest.mark.slow
def test_engines_train_the_same_weights(fp32_runs):
    """Same weights after each engine's last step (≤ 1e-4 relative), same gradients (Adam's first moment, so a
    wrong gradient scale shows even where Adam's update would hide it), same logged loss and σ tracker."""
    plain = fp32_runs["plain"]
    ref = torch.load(plain / FINAL, weights_only=True)["ema"]
    moments_ref = kept(plain, "exp_avg")
    for engine, run in fp32_runs.items():
        snap = torch.load(run / FINAL, weights_only=True)
        assert snap["world_size"] == (2 if engine.endswith("-2") else 1), engine
        assert not any(k.startswith("module.") for k in snap["ema"])   # the EMA of the unwrapped net
        diff = max_relative_difference(snap["ema"], ref)
        print(f"{engine}: max relative weight difference from the plain trainer {diff:.2e}")
        assert diff <= 1e-4, (engine, diff)
        moments = kept(run, "exp_avg")
        assert float((moments - moments_ref).abs().max()) <= 1e-4 * float(moments_ref.abs().max()), engine
        log, log_ref = read_log(run)[-1], read_log(plain)[-1]
        assert log["loss"] == pytest.approx(log_ref["loss"], rel=1e-5), engine
        assert log["sigma_bin_counts"] == log_ref["sigma_bin_counts"] and sum(log["sigma_bin_counts"]) == 192


@pytest.mark.slow
def test_forced_normalisation_reaches_the_weights_each_optimizer_keeps(fp32_runs):
    """Unit RMS per output channel of the kept weights under every engine — under ZeRO the fp32 master
    partitions, which the module's weights copy exactly — and the same kept weights everywhere."""
    names, sizes = param_names(), [p.numel() for p in build("t0", resolution=8, channels=1).parameters()]
    forced = set(forced_keys())
    ref = kept(fp32_runs["plain"], "weights")
    for engine, run in fp32_runs.items():
        weights = kept(run, "weights")
        per_param = dict(zip(names, weights.split(sizes)))
        shapes = {n: p.shape for n, p in build("t0", resolution=8, channels=1).named_parameters()}
        rms_error = max(float((channel_rms(per_param[n].view(shapes[n])) - 1).abs().max()) for n in forced)
        print(f"{engine}: kept weights' max |per-channel rms − 1| {rms_error:.2e}")
        assert rms_error < 2e-4, (engine, rms_error)
        assert float((weights - ref).abs().max()) <= 1e-4 * float(ref.abs().max()), engine
        if engine.startswith("zero"):
            assert torch.equal(weights, flat(zero_module(run)))   # module == master, bit for bit


@pytest.mark.slow
def test_zero2_two_processes_resume_midway(fp32_runs, data, tmp_path):
    """A 2-process ZeRO-2 run stopped after 96 images and resumed (launched from another folder, as under
    `snakemake --directory`) ends where the uninterrupted one does."""
    config = write_config(tmp_path / "cfg", batch_gpu=8)
    out = tmp_path / "run"
    launch("zero2-2", config, data, out, "--stop-after-images", "96", cwd=tmp_path)
    state = torch.load(out / "state.pt", weights_only=True)
    assert state["images_seen"] == 96 and state["world_size"] == 2 and (out / state["ds_dir"]).is_dir()
    launch("zero2-2", config, data, out, cwd=tmp_path)
    assert json.loads((out / "done.json").read_text())["images_seen"] == 192
    assert [r["images_seen"] for r in read_log(out)] == [32, 64, 96, 128, 160, 192]
    a = torch.load(fp32_runs["zero2-2"] / FINAL, weights_only=True)["ema"]
    b = torch.load(out / FINAL, weights_only=True)["ema"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(kept(out, "weights"), kept(fp32_runs["zero2-2"], "weights"))


@pytest.mark.slow
def test_bf16_is_autocast_only_under_ddp_and_zero2(fp32_runs, data, tmp_path):
    """training.mixed_precision bf16: DDP and ZeRO-2 (2 processes each) agree in weights and gradients (both
    compute the same bf16 forward from the same fp32 weights; a bf16 weight or gradient accumulation would part
    them by bf16 roundings, ~4e-3); the EMA is float32 and fed from fp32 weights (its values are not bf16-rounded);
    ZeRO's module and master weights are fp32 and equal."""
    config = write_config(tmp_path / "cfg", batch_gpu=8, mixed_precision="bf16")
    ddp, zero = (launch(engine, config, data, tmp_path / engine) for engine in ("ddp-2", "zero2-2"))
    a = torch.load(ddp / FINAL, weights_only=True)["ema"]
    b = torch.load(zero / FINAL, weights_only=True)["ema"]
    diff = max_relative_difference(b, a)
    fp32 = torch.load(fp32_runs["zero2-2"] / FINAL, weights_only=True)["ema"]
    gap = max_relative_difference(b, fp32)
    print(f"bf16: ZeRO-2 vs DDP max relative weight difference {diff:.2e}; bf16 vs fp32 {gap:.2e}")
    assert diff <= 1e-4, diff
    assert gap > 1e-2    # the forward did run in bf16
    moments = kept(ddp, "exp_avg")
    assert float((kept(zero, "exp_avg") - moments).abs().max()) <= 1e-4 * float(moments.abs().max())
    for ema in (a, b):
        for k, v in ema.items():
            assert v.dtype == torch.float32, k
        values = torch.cat([v.reshape(-1) for k, v in ema.items() if k in forced_keys()])
        on_bf16_grid = float((values.to(torch.bfloat16).to(torch.float32) == values).float().mean())
        assert on_bf16_grid < 0.01, on_bf16_grid
    module = zero_module(zero)
    assert all(v.dtype == torch.float32 for v in module.values())
    assert torch.equal(kept(zero, "weights"), flat(module))
    normalised = {k: normalize(v) for k, v in b.items() if k in forced_keys()}
    assert all(torch.allclose(normalised[k], module[k], rtol=0, atol=1e-6) for k in normalised)
