"""models/train.py, models/denoiser.py, models/sigma_bins.py.

Fast tests run the real loop in-process on the tiny t0 net and 8×8 digits for a few steps; the multi-process
(torchrun, 2 CPU ranks), DeepSpeed ZeRO-2 (CPU) and learning tests are marked slow."""

import json
import math
import os
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from models.config import load_config
from models.data import Dataset, load_dataset
from models.denoiser import Denoiser
from models.diffusion import get_variant
from models.sigma_bins import SigmaBinTracker
from models.train import (NonFiniteLossError, batch_indices, ema_beta, learning_rate, per_example_losses, train)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def one_thread():
    """The CI box has 2 shared cores: one intra-op thread is faster and deterministic."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def make_cfg(models=None, **training):
    tr = dict(total_images=256, batch_size=32, lr_rampup_images=64, lr_decay_images=128, ema_halflife_images=100,
              snapshots={"count": 2, "spacing": "geometric", "first_images": 128}, log_every_images=64)
    tr.update(training)
    return load_config({"study": "test", "training": tr, "models": models or {"t0": {"arch": "t0"}}})


# ---------------------------------------------------------------------------------------------------------------
# pure pieces
# ---------------------------------------------------------------------------------------------------------------

def test_learning_rate_rampup_and_inverse_sqrt_decay():
    tr = {"lr": 0.01, "lr_rampup_images": 1000, "lr_decay_images": 4000}
    assert learning_rate(250, tr) == pytest.approx(0.0025)        # linear ramp
    assert learning_rate(1000, tr) == pytest.approx(0.01)
    assert learning_rate(4000, tr) == pytest.approx(0.01)         # flat until t_ref
    assert learning_rate(16000, tr) == pytest.approx(0.005)       # 1/sqrt(4)
    assert learning_rate(16000, {"lr": 0.01, "lr_rampup_images": 0, "lr_decay_images": 0}) == 0.01


def test_ema_halflife_in_images():
    tr = {"ema_halflife_images": 1000, "ema_rampup_ratio": None}
    beta = ema_beta(10**6, 50, tr)
    assert beta ** (1000 / 50) == pytest.approx(0.5)              # weight of old EMA halves every 1000 images
    tr_ramp = {"ema_halflife_images": 1000, "ema_rampup_ratio": 0.05}
    assert ema_beta(4000, 50, tr_ramp) == pytest.approx(0.5 ** (50 / 200))   # ramp: h = 0.05 * 4000
    assert ema_beta(10**6, 50, tr_ramp) == pytest.approx(beta)
    assert ema_beta(100, 50, {"ema_halflife_images": 0}) == 0.0  # no EMA: copy the weights


def test_batch_indices_are_seeded_epochs():
    n, b = 10, 4
    stream = torch.cat([batch_indices(i, b, n, seed=3) for i in range(0, 40, b)])
    for e in range(4):  # every aligned block of n is a permutation (each image once per epoch)
        assert sorted(stream[e * n:(e + 1) * n].tolist()) == list(range(n))
    assert not torch.equal(stream[:n], stream[n:2 * n])           # a fresh order each epoch
    assert torch.equal(batch_indices(8, b, n, seed=3), stream[8:12])  # pure function of the position
    assert not torch.equal(batch_indices(0, 10, n, seed=4), stream[:10])


class HalfNet(torch.nn.Module):
    """F(x_in) = 0.5·x_in, constant learned log-variance: a net whose D is known in closed form."""

    def __init__(self, logvar=None):
        super().__init__()
        self.label_dim = 0
        self.logvar = logvar

    def forward(self, x, c_noise, class_labels=None):
        lv = None if self.logvar is None else torch.full((x.shape[0],), self.logvar)
        return 0.5 * x, lv


@pytest.mark.parametrize("logvar", [None, 0.7])
def test_per_example_losses_float64_reference(logvar):
    sd = 0.5
    variant = get_variant("edm", sigma_data=sd)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 1, 4, 4, generator=g)
    noise = torch.randn(6, 1, 4, 4, generator=g)
    sigma = torch.tensor([0.01, 0.1, 0.5, 1.0, 5.0, 40.0])
    loss, x0_loss = per_example_losses(Denoiser(HalfNet(logvar), variant), variant, x0, sigma, noise, None)
    # independent float64 reference from EDM Table 1
    s = sigma.double().reshape(-1, 1, 1, 1)
    x = x0.double() + s * noise.double()
    c_skip, c_out, c_in = sd**2 / (s**2 + sd**2), s * sd / (s**2 + sd**2).sqrt(), 1 / (s**2 + sd**2).sqrt()
    D = c_skip * x + c_out * 0.5 * c_in * x
    ref_x0 = ((D - x0.double()) ** 2).mean((1, 2, 3))
    lam = (sigma.double() ** 2 + sd**2) / (sigma.double() * sd) ** 2
    ref = lam * ref_x0 if logvar is None else lam * ref_x0 / math.exp(logvar) + logvar
    torch.testing.assert_close(x0_loss.double(), ref_x0, rtol=1e-5, atol=0)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=0)


def test_denoiser_labels_and_bad_input():
    class LabelNet(HalfNet):
        def __init__(self):
            super().__init__()
            self.label_dim = 3
            self.seen = None

        def forward(self, x, c_noise, class_labels=None):
            self.seen = class_labels
            return super().forward(x, c_noise)

    net = LabelNet()
    den = Denoiser(net, get_variant("edm"))
    x = torch.zeros(2, 1, 4, 4)
    den(x, 1.0, torch.tensor([2, 0]))
    torch.testing.assert_close(net.seen, torch.tensor([[0.0, 0, 1], [1, 0, 0]]))
    with pytest.raises(ValueError, match=r"class indices must lie in \[0, 3\)"):
        den(x, 1.0, torch.tensor([3, 0]))
    with pytest.raises(ValueError, match="σ must be > 0"):
        den(x, torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="unconditional"):
        Denoiser(HalfNet(), get_variant("edm"))(x, 1.0, torch.tensor([0, 1]))


def test_sigma_bin_tracker_means():
    tr = SigmaBinTracker(0.01, 100.0, num_bins=4, decay=1.0)  # decades: [.01,.1) [.1,1) [1,10) [10,100]
    tr.update(torch.tensor([0.05, 0.5, 0.7, 1e-5]), torch.tensor([1.0, 2.0, 4.0, 3.0]))
    mean = tr.mean
    assert mean[0] == pytest.approx(2.0)          # 0.05 and the clamped 1e-5
    assert mean[1] == pytest.approx(3.0)
    assert math.isnan(mean[2]) and math.isnan(mean[3])
    assert tr.counts.tolist() == [2, 2, 0, 0]
    torch.testing.assert_close(tr.centers, torch.tensor([0.01**0.5 * 0.1**0.5, 0.1**0.5, 10**0.5, 1000**0.5],
                                                        dtype=torch.float64))
    decayed = SigmaBinTracker(0.01, 100.0, num_bins=4, decay=0.5)
    decayed.update(torch.tensor([0.5]), torch.tensor([1.0]))
    decayed.update(torch.tensor([0.5]), torch.tensor([4.0]))
    assert decayed.mean[1] == pytest.approx((0.5 * 1 + 4) / 1.5)  # newer batch weighs 2×
    copy_ = SigmaBinTracker(0.01, 100.0, num_bins=4, decay=0.5)
    copy_.load_state_dict(decayed.state_dict())
    torch.testing.assert_close(copy_.mean, decayed.mean, equal_nan=True)


# ---------------------------------------------------------------------------------------------------------------
# the loop, in-process
# ---------------------------------------------------------------------------------------------------------------

def read_log(run):
    return [json.loads(line) for line in (Path(run) / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, digits):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("full")
    result = train(make_cfg(), "t0", digits, out, progress=False)
    return out, result


def test_run_folder_contents(full_run, digits):
    out, result = full_run
    assert result["status"] == "done" and result["images_seen"] == 256
    done = json.loads((out / "done.json").read_text())
    assert done["snapshots"] == ["snapshots/snapshot-000000128.pt", "snapshots/snapshot-000000256.pt"]
    log = read_log(out)
    assert [r["images_seen"] for r in log] == [64, 128, 192, 256]
    assert all(r["world_size"] == 1 and math.isfinite(r["loss"]) for r in log)
    assert sum(log[-1]["sigma_bin_counts"]) == 256   # every training example reached the σ-bin tracker
    snap = torch.load(out / done["snapshots"][0], weights_only=False)
    assert snap["images_seen"] == 128 and snap["model"] == "t0" and snap["variant"]["name"] == "edm"
    # FLOPs: counted once on the real step, times images; agrees with the family's own count of the bare net
    from models.family import training_flops_per_image

    per_image = snap["flops"] / snap["images_seen"]
    assert per_image == pytest.approx(result["flops_per_image"])
    assert per_image == pytest.approx(training_flops_per_image("t0", resolution=8, channels=1), rel=0.05)
    # the snapshot's EMA denoiser rebuilds; at tiny σ preconditioning makes D(x) ≈ x whatever the weights
    den = Denoiser.from_snapshot(out / done["snapshots"][-1])
    x = digits.x[:4]
    torch.testing.assert_close(den(x, 1e-4), x, atol=1e-3, rtol=0)
    assert den.snapshot_info["images_seen"] == 256


def test_resume_gives_identical_weights(full_run, digits, tmp_path):
    out_full, _ = full_run
    cfg = make_cfg()
    stopped = train(cfg, "t0", digits, tmp_path, stop_after_images=96, progress=False)
    assert stopped["status"] == "stopped" and not (tmp_path / "done.json").exists()
    assert torch.load(tmp_path / "state.pt", weights_only=False)["images_seen"] == 96
    resumed = train(cfg, "t0", digits, tmp_path, progress=False)
    assert resumed["status"] == "done"
    for name in ("snapshot-000000128.pt", "snapshot-000000256.pt"):
        a = torch.load(out_full / "snapshots" / name, weights_only=False)["ema"]
        b = torch.load(tmp_path / "snapshots" / name, weights_only=False)["ema"]
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=f"{name}: {k}")
    sa = torch.load(out_full / "state.pt", weights_only=False)
    sb = torch.load(tmp_path / "state.pt", weights_only=False)
    for k in sa["net"]:
        torch.testing.assert_close(sb["net"][k], sa["net"][k], rtol=0, atol=1e-6)
    # the log is rewritten from the saved state, so it matches the uninterrupted one line for line
    la, lb = read_log(out_full), read_log(tmp_path)
    assert [r["images_seen"] for r in lb] == [r["images_seen"] for r in la]
    assert [r["loss"] for r in lb] == pytest.approx([r["loss"] for r in la], rel=1e-6)
    assert train(cfg, "t0", digits, tmp_path, progress=False)["status"] == "already-done"


def test_nan_loss_names_step_and_sigma(digits, tmp_path):
    x = digits.x[:64].clone()
    x[:] = float("nan")  # every batch is bad, so the very first step must stop
    bad = Dataset(x=x, labels=None, name="nan-digits")
    with pytest.raises(NonFiniteLossError) as info:
        train(make_cfg(), "t0", bad, tmp_path, progress=False)
    msg = str(info.value)
    assert "at step 0 (images seen 0)" in msg and "model t0" in msg
    sigmas = msg.split("σ of the batch: [")[1].rstrip("]").split(", ")
    assert len(sigmas) == 32 and all(float(s) > 0 for s in sigmas)


def test_conditional_run_uses_one_hot_labels(digits, tmp_path):
    cfg = make_cfg(total_images=64, snapshots={"count": 1}, log_every_images=64)
    cfg["dataset"]["conditional"] = True
    train(cfg, "t0", digits, tmp_path, progress=False)
    snap = torch.load(tmp_path / "snapshots/snapshot-000000064.pt", weights_only=False)
    assert snap["arch"]["label_dim"] == 10
    den = Denoiser.from_snapshot(tmp_path / "snapshots/snapshot-000000064.pt")
    assert den(digits.x[:3], 0.5, digits.labels[:3]).shape == (3, 1, 8, 8)
    nolabels = Dataset(x=digits.x, labels=None, name="unlabelled")
    with pytest.raises(ValueError, match="conditional is true but dataset 'unlabelled'"):
        train(cfg, "t0", nolabels, tmp_path / "b", progress=False)


def test_optimal_loss_schedule_hook(digits, tmp_path, monkeypatch):
    calls = {"weight": 0, "trackers": []}

    class FakeSchedule:
        def __init__(self, variant, jstar_csv, **kwargs):
            calls["init"] = (variant.name, jstar_csv, kwargs)

        def sample_sigma(self, n, generator=None, device=None):
            return torch.full((n,), 0.7, device=device)

        def loss_weight(self, sigma):
            calls["weight"] += 1
            return torch.ones_like(sigma)

        def set_model_loss(self, tracker):
            calls["trackers"].append(tracker)

    monkeypatch.setitem(sys.modules, "models.schedule", types.SimpleNamespace(OptimalLossSchedule=FakeSchedule))
    cfg = make_cfg(total_images=64, snapshots={"count": 1}, log_every_images=32,
                   schedule={"name": "optimal-loss", "a": 1.0, "w_max": 10.0})
    with pytest.raises(ValueError, match="--jstar"):
        train(cfg, "t0", digits, tmp_path / "a", progress=False)
    jstar = tmp_path / "jstar.csv"
    jstar.write_text("sigma,optimal_loss\n0.1,0.0\n")
    train(cfg, "t0", digits, tmp_path / "b", jstar=jstar, progress=False)
    assert calls["init"] == ("edm", str(jstar), {"a": 1.0, "w_max": 10.0})
    assert calls["weight"] >= 2 and len(calls["trackers"]) >= 2
    assert all(isinstance(t, SigmaBinTracker) for t in calls["trackers"])
    counts = read_log(tmp_path / "b")[-1]["sigma_bin_counts"]
    assert sum(counts) == 64 and max(counts) == 64   # every σ drawn from the schedule: all 0.7, one bin


# ---------------------------------------------------------------------------------------------------------------
# slow: learning, multi-process, DeepSpeed
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_tiny_model_lowers_its_loss(digits, tmp_path):
    cfg = make_cfg(total_images=3072, batch_size=64, lr_rampup_images=256, lr_decay_images=1024,
                   ema_halflife_images=300, snapshots={"count": 2, "spacing": "geometric", "first_images": 64},
                   log_every_images=512)
    train(cfg, "t0", digits, tmp_path, progress=False)
    log = read_log(tmp_path)
    assert log[-1]["loss"] < log[0]["loss"] - 0.3
    # the EMA denoiser improved too, on a fixed held-in set at σ = 0.5 (x0-loss, independent of the weighting)
    g = torch.Generator().manual_seed(5)
    x0 = digits.x[:256]
    x = x0 + 0.5 * torch.randn(x0.shape, generator=g)

    def x0_loss(name):
        with torch.no_grad():
            return float(((Denoiser.from_snapshot(tmp_path / "snapshots" / name)(x, 0.5) - x0) ** 2).mean())

    assert x0_loss("snapshot-000003072.pt") < 0.8 * x0_loss("snapshot-000000064.pt")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_cli_config(tmp_path, **training):
    tr = dict(total_images=128, batch_size=32, lr_rampup_images=64, lr_decay_images=128, ema_halflife_images=100,
              snapshots={"count": 2, "spacing": "geometric", "first_images": 64}, log_every_images=32)
    tr.update(training)
    path = tmp_path / "config.yaml"
    import yaml

    path.write_text(yaml.safe_dump({"study": "test", "training": tr, "models": {"t0": {"arch": "t0"}}}))
    return path


def run_cli(cmd, env_extra, timeout=170):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env_extra}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.mark.slow
def test_two_process_cpu_run(tmp_path, digits):
    from models.data import save_npz

    data = save_npz(digits, tmp_path / "digits.npz")
    cfg = write_cli_config(tmp_path)
    out = tmp_path / "run"
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    run_cli([torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "models.train",
             "--config", str(cfg), "--model", "t0", "--data", str(data), "--out", str(out), "--no-progress"],
            {"ACCELERATE_USE_CPU": "1"})
    log = read_log(out)
    assert all(r["world_size"] == 2 for r in log)
    assert json.loads((out / "done.json").read_text())["world_size"] == 2
    # both ranks' examples were gathered into the σ-bin tracker (each rank draws 16 of the 32 per step)
    assert sum(log[-1]["sigma_bin_counts"]) == 128
    snap = torch.load(out / "snapshots/snapshot-000000128.pt", weights_only=False)
    assert not any(k.startswith("module.") for k in snap["ema"])   # EMA of the unwrapped model
    den = Denoiser.from_snapshot(out / "snapshots/snapshot-000000128.pt")
    assert torch.isfinite(den(digits.x[:2], 1.0)).all()


@pytest.mark.slow
def test_deepspeed_zero2_cpu(tmp_path, digits):
    pytest.importorskip("deepspeed")
    pytest.importorskip("transformers")
    from models.data import save_npz

    data = save_npz(digits, tmp_path / "digits.npz")
    cfg = write_cli_config(tmp_path)
    out = tmp_path / "run"
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    cmd = [accelerate, "launch", "--config_file", "workflow/accelerate/deepspeed-zero2.yaml", "--num_processes", "1",
           "--main_process_port", str(free_port()), "-m", "models.train", "--config", str(cfg), "--model", "t0",
           "--data", str(data), "--out", str(out), "--no-progress"]
    run_cli(cmd + ["--stop-after-images", "64"], {})
    state = torch.load(out / "state.pt", weights_only=False)
    assert state["images_seen"] == 64 and (out / state["ds_dir"]).is_dir()
    run_cli(cmd, {})
    assert json.loads((out / "done.json").read_text())["images_seen"] == 128
    assert [r["images_seen"] for r in read_log(out)] == [32, 64, 96, 128]
    den = Denoiser.from_snapshot(out / "snapshots/snapshot-000000128.pt")
    assert torch.isfinite(den(digits.x[:2], 1.0)).all()
