"""The trainer (training/train.py, training/loop.py, training/run_folder.py), models/denoiser.py, training/sigma_bins.py.

Fast tests run the real loop in-process on the tiny t0 net and 8×8 digits for a few steps; the learning test is
marked slow.  The engines (2-process DDP, DeepSpeed ZeRO-2) are tests/test_engines.py's."""

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import training.loop as loop_mod
import training.train as train_module
from models.denoiser import Denoiser
from models.diffusion import get_variant
from models.weight_norm import channel_rms
from study.config import load_config
from training.dataset import Dataset, DatasetArrays, load_dataset
from training.loop import NonFiniteLossError, batch_indices, ema_beta, learning_rate, per_example_losses
from training.run_folder import RunFolderMismatchError, fingerprint_differences
from training.sigma_bins import SigmaBinTracker
from training.train import main, open_training_data, train

ROOT = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


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


def test_training_turns_tf32_off(full_run):
    """EDM2 trains fp32 outside autocast without TF32; torch's default lets cuDNN convolutions use it."""
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    assert torch.backends.cudnn.benchmark          # and autotunes each convolution shape once, as EDM2 does


def test_run_folder_contents(full_run, digits):
    out, result = full_run
    assert result["status"] == "done" and result["images_seen"] == 256
    done = json.loads((out / "done.json").read_text())
    assert done["snapshots"] == ["snapshots/snapshot-000000128.pt", "snapshots/snapshot-000000256.pt"]
    log = read_log(out)
    assert [r["images_seen"] for r in log] == [64, 128, 192, 256]
    assert all(r["world_size"] == 1 and math.isfinite(r["loss"]) for r in log)
    assert sum(log[-1]["sigma_bin_counts"]) == 256   # every training example reached the σ-bin tracker
    snap = torch.load(out / done["snapshots"][0], weights_only=True)
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


def test_tensorboard_tracker_holds_the_logged_scalars(full_run, digits, tmp_path):
    """training.trackers: [tensorboard] — the run folder's event file holds every log.jsonl number at its images_seen
    (loss, lr, images/s, gradient norm, memory, each σ bin's loss); the run is the same as without a tracker."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(make_cfg(trackers=["tensorboard"]), "t0", digits, tmp_path, progress=False)
    log = read_log(tmp_path)
    events = EventAccumulator(str(tmp_path / "test"), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for key in ("loss", "lr", "images_per_s", "grad_norm", "max_memory_gib"):
        assert key in tags, (key, tags)
        logged = {e.step: e.value for e in events.Scalars(key)}
        assert logged == pytest.approx({r["images_seen"]: r[key] for r in log}, rel=1e-6), key
    bins = [(c, x) for c, x in zip(log[-1]["sigma_bin_centers"], log[-1]["sigma_bin_x0_loss"]) if x is not None]
    assert len(bins) >= 3
    for center, loss in bins:
        last = events.Scalars(f"sigma_bin_x0_loss/sigma={center:.3g}")[-1]
        assert last.step == 256 and last.value == pytest.approx(loss, rel=1e-6)
    # watching changes nothing: the same weights as the untracked run, and the settings fingerprint ignores it
    a, b = (torch.load(d / "snapshots/snapshot-000000256.pt", weights_only=True) for d in (full_run[0], tmp_path))
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
    assert json.loads((tmp_path / "done.json").read_text())["config_fingerprint"] == \
        json.loads((full_run[0] / "done.json").read_text())["config_fingerprint"]


def test_logged_gradient_norm_is_the_clipped_norm(digits, tmp_path):
    """The gradient norm log.jsonl reports without clipping equals the one clipping measures (grad_clip too large
    to act): both the per-dimension loss's norm."""
    runs = []
    for clip in (None, 1e9):
        out = tmp_path / str(clip)
        train(make_cfg(total_images=128, grad_clip=clip), "t0", digits, out, progress=False)
        runs.append([r["grad_norm"] for r in read_log(out)])
    assert runs[0] == pytest.approx(runs[1], rel=1e-5) and all(0 < g < 1e3 for g in runs[0])


def test_same_settings_ignores_only_result_neutral_keys(tmp_path):
    import yaml

    from training.run_folder import same_settings

    base = {"study": "s", "training": {"lr": 0.01, "batch_gpu": None, "trackers": []}, "models": {"t0": {}}}
    paths = []
    for i, change in enumerate([{}, {"batch_gpu": 16, "trackers": ["tensorboard"]}, {"lr": 0.02}]):
        cfg = {**base, "training": {**base["training"], **change}}
        paths.append(tmp_path / f"{i}.yaml")
        paths[-1].write_text(yaml.safe_dump(cfg))
    assert same_settings(paths[0], paths[1]) and not same_settings(paths[0], paths[2])
    # the train rule's check (exit 0: keep the run folder)
    run = [sys.executable, "-m", "training.run_folder", "same-settings"]
    assert subprocess.run(run + [str(paths[0]), str(paths[1])], cwd=ROOT).returncode == 0
    assert subprocess.run(run + [str(paths[0]), str(paths[2])], cwd=ROOT).returncode == 1


def test_done_json_records_each_snapshots_checksum(full_run):
    from study import integrity

    out, _ = full_run
    done = json.loads((out / "done.json").read_text())
    assert set(done["snapshot_sha256"]) == set(done["snapshots"])
    for rel, sha in done["snapshot_sha256"].items():
        assert integrity.file_sha256(out / rel) == sha == integrity.verify(out / rel)["sha256"]


def test_training_twice_writes_identical_files(full_run, digits, tmp_path):
    """Equal trainings write equal bytes: every snapshot and state.pt (torch names the zip's inner folder after the
    file it writes, so saving through a temporary name would make equal contents differ)."""
    from study import integrity

    out_full, _ = full_run
    train(make_cfg(), "t0", digits, tmp_path, progress=False)
    names = ["state.pt", *(f"snapshots/{p.name}" for p in sorted((out_full / "snapshots").glob("*.pt")))]
    assert len(names) == 3
    for name in names:
        assert integrity.file_sha256(tmp_path / name) == integrity.file_sha256(out_full / name), name


def test_resume_gives_identical_weights(full_run, digits, tmp_path):
    out_full, _ = full_run
    cfg = make_cfg()
    stopped = train(cfg, "t0", digits, tmp_path, stop_after_images=96, progress=False)
    assert stopped["status"] == "stopped" and not (tmp_path / "done.json").exists()
    assert torch.load(tmp_path / "state.pt", weights_only=True)["images_seen"] == 96
    resumed = train(cfg, "t0", digits, tmp_path, progress=False)
    assert resumed["status"] == "done"
    for name in ("snapshot-000000128.pt", "snapshot-000000256.pt"):
        a = torch.load(out_full / "snapshots" / name, weights_only=True)["ema"]
        b = torch.load(tmp_path / "snapshots" / name, weights_only=True)["ema"]
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=f"{name}: {k}")
    sa = torch.load(out_full / "state.pt", weights_only=True)
    sb = torch.load(tmp_path / "state.pt", weights_only=True)
    for k in sa["net"]:
        torch.testing.assert_close(sb["net"][k], sa["net"][k], rtol=0, atol=1e-6)
    # the log is rewritten from the saved state, so it matches the uninterrupted one line for line
    la, lb = read_log(out_full), read_log(tmp_path)
    assert [r["images_seen"] for r in lb] == [r["images_seen"] for r in la]
    assert [r["loss"] for r in lb] == pytest.approx([r["loss"] for r in la], rel=1e-6)
    assert train(cfg, "t0", digits, tmp_path, progress=False)["status"] == "already-done"


def test_nan_loss_names_step_and_sigma(digits, tmp_path, monkeypatch):
    x = digits.x[:64].clone()
    x[:] = float("nan")  # every batch is bad, so the very first step must stop
    bad = Dataset(x=x, labels=None, name="nan-digits")
    monkeypatch.setattr(train_module, "check_images", lambda data, **_: data)  # past the data's own check
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
    snap = torch.load(tmp_path / "snapshots/snapshot-000000064.pt", weights_only=True)
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

    monkeypatch.setattr(train_module, "OptimalLossSchedule", FakeSchedule)
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
# the training set stays on the host in its stored dtype
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits_u8(digits):
    """digits rounded onto the uint8 grid u/127.5 − 1, so save_npz(compact=True) stores them as uint8."""
    u = torch.round((digits.x + 1) * 127.5).clamp(0, 255)
    return Dataset(x=(u / 127.5 - 1).to(torch.float32), labels=digits.labels, name="digits-u8")


def test_npz_files_are_memory_mapped_in_their_stored_dtype(digits, digits_u8, tmp_path):
    from training.dataset import save_npz

    idx = torch.tensor([5, 0, 1796, 5, 300])
    cases = {"u8.npz": (digits_u8, True, np.uint8), "f32.npz": (digits, False, np.float32)}
    for fname, (ds, compact, dtype) in cases.items():
        path = save_npz(ds, tmp_path / fname, compact=compact)
        src = open_training_data(path)
        assert isinstance(src.x, np.memmap) and src.x.dtype == dtype, fname   # nothing converted or copied yet
        assert src.shape == tuple(ds.x.shape) and src.name == ds.name
        assert torch.equal(src.labels, ds.labels)
        rows = src.rows(idx, torch.device("cpu"))
        assert rows.dtype == torch.float32
        assert torch.equal(rows, load_dataset(str(path)).x[idx]), fname      # bit-identical to training.dataset
        assert torch.equal(rows, ds.x[idx]), fname
    # every uint8 value converts exactly as training.dataset does
    every = save_npz(Dataset(x=torch.arange(256.0).reshape(4, 1, 8, 8) / 127.5 - 1, labels=None, name="all"),
                     tmp_path / "all.npz", compact=True)
    src = open_training_data(every)
    assert src.x.dtype == np.uint8
    assert torch.equal(src.rows(torch.arange(4), torch.device("cpu")), load_dataset(str(every)).x)
    # a compressed member cannot be mapped: read whole, but still uint8 (4× smaller than float32)
    u8 = np.load(tmp_path / "u8.npz")["x"]
    np.savez_compressed(tmp_path / "zip.npz", x=u8, labels=digits.labels.numpy())
    src = open_training_data(tmp_path / "zip.npz")
    assert not isinstance(src.x, np.memmap) and src.x.dtype == np.uint8
    assert torch.equal(src.rows(idx, torch.device("cpu")), digits_u8.x[idx])
    # .npy: memory-mapped; a channels-last array follows training.dataset's layout rule (a view, rows read lazily)
    nhwc = np.ascontiguousarray(u8[:, :, :, :, None].repeat(3, axis=4)[:, 0])   # [N, 8, 8, 3]
    np.save(tmp_path / "nhwc.npy", nhwc)
    src = open_training_data(tmp_path / "nhwc.npy")
    assert isinstance(src.x, np.memmap) and src.shape == (1797, 3, 8, 8) and src.labels is None
    assert torch.equal(src.rows(idx, torch.device("cpu")), load_dataset(str(tmp_path / "nhwc.npy")).x[idx])


def test_bad_array_files_name_the_problem(tmp_path):
    from training.dataset import DatasetError

    np.savez(tmp_path / "ints.npz", x=np.zeros((4, 1, 8, 8), dtype=np.int32))
    with pytest.raises(DatasetError, match=r"ints.npz\[x\]: unsupported dtype int32"):
        open_training_data(tmp_path / "ints.npz")
    np.savez(tmp_path / "nokey.npz", pixels=np.zeros((4, 1, 8, 8), dtype=np.uint8))
    with pytest.raises(DatasetError, match="no image array under any of the keys"):
        open_training_data(tmp_path / "nokey.npz")
    np.savez(tmp_path / "badlabels.npz", x=np.zeros((4, 1, 8, 8), dtype=np.uint8), labels=np.zeros(3, np.int64))
    with pytest.raises(DatasetError, match="labels must be 4 integers"):
        open_training_data(tmp_path / "badlabels.npz")
    with pytest.raises(DatasetError, match="not found"):
        open_training_data(tmp_path / "missing.npz")


def test_training_from_uint8_npz_reads_only_batch_rows_and_matches_float(digits_u8, tmp_path, monkeypatch):
    """A uint8 .npz trains bit-identically to the same images given as a float32 Dataset, without load_dataset
    ever building the whole float32 array, and each step reads exactly its batch rows from the stored array."""
    from training.dataset import save_npz

    path = save_npz(digits_u8, tmp_path / "u8.npz", compact=True)
    cfg = make_cfg(total_images=64, snapshots={"count": 1}, log_every_images=64)
    train(cfg, "t0", digits_u8, tmp_path / "from-dataset", progress=False)

    reads = []
    real_rows = DatasetArrays.rows

    def recording_rows(self, idx, device):
        assert isinstance(self.x, np.memmap) and self.x.dtype == np.uint8   # still the stored uint8 on the host
        reads.append(idx.clone())
        return real_rows(self, idx, device)

    def no_load_dataset(*a, **k):
        raise AssertionError("the trainer must not load a .npz as one float32 array")

    monkeypatch.setattr(DatasetArrays, "rows", recording_rows)
    monkeypatch.setattr("training.dataset.load_dataset", no_load_dataset)
    train(cfg, "t0", str(path), tmp_path / "from-npz", progress=False)
    assert [len(i) for i in reads] == [32, 32]
    torch.testing.assert_close(torch.cat(reads), batch_indices(0, 64, 1797, seed=cfg["training"]["seed"]),
                               rtol=0, atol=0)
    a = torch.load(tmp_path / "from-dataset/snapshots/snapshot-000000064.pt", weights_only=True)["ema"]
    b = torch.load(tmp_path / "from-npz/snapshots/snapshot-000000064.pt", weights_only=True)["ema"]
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------------------------------------------------------
# a run folder belongs to one configuration
# ---------------------------------------------------------------------------------------------------------------

def test_fingerprint_differences_name_dotted_keys():
    old = {"training": {"lr": 0.01, "snapshots": {"count": 2}}, "arch": {"name": "t0"}}
    new = {"training": {"lr": 0.02, "snapshots": {"count": 2}, "dropout": 0.1}, "arch": {"name": "t0"}}
    assert fingerprint_differences(old, new) == ["training.dropout: <unset> → 0.1", "training.lr: 0.01 → 0.02"]
    assert fingerprint_differences(old, old) == []


def test_resume_with_other_settings_fails_naming_the_keys(digits, tmp_path):
    cfg = make_cfg()
    train(cfg, "t0", digits, tmp_path, stop_after_images=32, progress=False)
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert state["config_fingerprint"]["training"]["lr"] == cfg["training"]["lr"]
    assert state["config_fingerprint"]["dataset"] == {"shape": [1797, 1, 8, 8], "label_dim": 0}

    def refused(cfg2, data=digits):
        with pytest.raises(RunFolderMismatchError) as info:
            train(cfg2, "t0", data, tmp_path, progress=False)
        msg = str(info.value)
        assert "state.pt" in msg and "fresh --out" in msg and str(tmp_path) in msg
        return msg

    msg = refused(make_cfg(lr=0.02))
    assert "training.lr: 0.01 → 0.02" in msg and "1 differ" in msg
    assert "arch.name: 't0' → 't1'" in refused(make_cfg(models={"t0": {"arch": "t1"}}))
    other_variant = make_cfg()
    other_variant["variant"] = {"name": "vp-eps", "kwargs": {}}
    assert "variant.name: 'edm' → 'vp-eps'" in refused(other_variant)
    smaller = Dataset(x=digits.x[:1000], labels=digits.labels[:1000], name="digits")
    assert "dataset.shape" in refused(cfg, smaller)
    # nothing was touched: the same settings still resume
    assert torch.load(tmp_path / "state.pt", weights_only=True)["images_seen"] == 32


def test_finished_run_with_other_settings_is_not_reported_done(full_run, digits):
    out, _ = full_run
    assert train(make_cfg(), "t0", digits, out, progress=False)["status"] == "already-done"
    with pytest.raises(RunFolderMismatchError, match=r"done.json .*training.ema_halflife_images: 100 → 50"):
        train(make_cfg(ema_halflife_images=50), "t0", digits, out, progress=False)


def test_cli_reports_a_mismatched_run_folder_in_one_line(digits, tmp_path, capsys):
    from training.dataset import save_npz

    data = str(save_npz(digits, tmp_path / "digits.npz"))
    args = ["--model", "t0", "--data", data, "--out", str(tmp_path / "run"), "--no-progress"]
    assert main(["--config", str(write_cli_config(tmp_path)), *args, "--stop-after-images", "32"]) == 0
    (tmp_path / "b").mkdir()
    assert main(["--config", str(write_cli_config(tmp_path / "b", batch_size=16)), *args]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1   # one line, no traceback
    assert "training.batch_size: 32 → 16" in errors[0] and "fresh --out" in errors[0]


# ---------------------------------------------------------------------------------------------------------------
# Accelerate configs
# ---------------------------------------------------------------------------------------------------------------

def deepspeed_yamls():
    import yaml

    return sorted(p.name for p in (ROOT / "workflow/accelerate").glob("*.yaml")
                  if yaml.safe_load(p.read_text()).get("distributed_type") == "DEEPSPEED")


def test_deepspeed_yaml_is_listed():
    assert "deepspeed-zero2.yaml" in deepspeed_yamls()


@pytest.mark.parametrize("name", deepspeed_yamls())
def test_deepspeed_config_works_from_any_folder(name, tmp_path, monkeypatch):
    """Run accelerate launch's own config handling on the YAML (absolute path, as the workflow passes it) from a
    foreign working directory, then build the DeepSpeed plugin there as the training process would: a file the
    config names relative to the repository (the old deepspeed_config_file) is not found and fails here."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    monkeypatch.chdir(tmp_path)
    parser = launch_command_parser()
    args = parser.parse_args(["--config_file", str(ROOT / "workflow/accelerate" / name), "--num_processes", "1",
                              "--main_process_port", "29999", "-m", "training.train"])
    args, defaults, _ = _validate_launch_command(args)
    assert args.use_deepspeed
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)  # as launch_command does
    from accelerate.utils import DeepSpeedPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    _, env = prepare_deepspeed_cmd_env(args)
    for key in [k for k in os.environ if k.startswith("ACCELERATE_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        if key.startswith("ACCELERATE_"):
            monkeypatch.setenv(key, value)
    plugin = DeepSpeedPlugin()
    assert plugin.deepspeed_config["zero_optimization"]["stage"] == 2
    assert plugin.deepspeed_config["gradient_accumulation_steps"] == 1


# ---------------------------------------------------------------------------------------------------------------
# micro-batching, EDM2's gradient scale, the log-variance switch
# ---------------------------------------------------------------------------------------------------------------

def adam_moments(state_dict: dict) -> list[torch.Tensor]:
    """Every Adam first moment (exp_avg) in a (possibly nested) optimizer state: after one step it is
    (1 − β1)·gradient, so comparing it compares the gradients themselves, scale included (Adam's update alone
    would hide a constant factor)."""
    out = []

    def walk(obj):
        if isinstance(obj, dict):
            for k in sorted(obj, key=str):
                if k == "exp_avg" and isinstance(obj[k], torch.Tensor):
                    out.append(obj[k].float())
                else:
                    walk(obj[k])
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v)

    walk(state_dict)
    return out


# Two optimizer steps of 128 images: EDM2 initialises the output gain at zero, so the first step moves only it
# (and the log-variance head); the second moves every weight.  The snapshot's EMA is the net (half-life 0).
TWO_STEPS = dict(total_images=256, batch_size=128, ema_halflife_images=0, snapshots={"count": 1},
                 log_every_images=128)
SNAPSHOT = "snapshots/snapshot-000000256.pt"


def assert_same_step(run_a, run_b, opt_a, opt_b):
    """Same weights after the steps and the same gradients (Adam's first moment), within float32 reduction error;
    the logged per-dimension loss and the σ tracker agree too."""
    wa = torch.load(run_a / SNAPSHOT, weights_only=True)["ema"]
    wb = torch.load(run_b / SNAPSHOT, weights_only=True)["ema"]
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-5, msg=k)
    ga, gb = adam_moments(opt_a), adam_moments(opt_b)
    assert ga and len(ga) == len(gb)
    scale = max(float(g.abs().max()) for g in ga)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5 * scale)
    la, lb = read_log(run_a)[-1], read_log(run_b)[-1]
    assert lb["loss"] == pytest.approx(la["loss"], rel=1e-5)
    assert lb["sigma_bin_counts"] == la["sigma_bin_counts"]
    for a, b in zip(la["sigma_bin_x0_loss"], lb["sigma_bin_x0_loss"]):
        assert (a is None and b is None) or b == pytest.approx(a, rel=1e-4)


def test_micro_batches_give_the_same_step(digits, tmp_path):
    from accelerate import Accelerator

    runs, unsynced = {}, []
    for batch_gpu in (None, 32):
        accelerator = Accelerator()
        no_sync = accelerator.no_sync

        def counting_no_sync(model, _inner=no_sync):  # DDP's all-reduce is skipped inside it
            unsynced.append(batch_gpu)
            return _inner(model)

        accelerator.no_sync = counting_no_sync
        out = tmp_path / f"gpu{batch_gpu}"
        result = train(make_cfg(batch_gpu=batch_gpu, **TWO_STEPS), "t0", digits, out, progress=False,
                       accelerator=accelerator)
        runs[batch_gpu] = out
        assert result["status"] == "done"
    assert unsynced == [32] * 6   # 2 steps × the first 3 of 4 micro-batches; the last one syncs
    sa = torch.load(runs[None] / "state.pt", weights_only=True)
    sb = torch.load(runs[32] / "state.pt", weights_only=True)
    assert_same_step(runs[None], runs[32], sa["optimizer"], sb["optimizer"])
    assert sb["flops_per_image"] == pytest.approx(sa["flops_per_image"])   # FLOPs stay counted per image
    # micro-batching is not part of the settings: a run may resume with another batch_gpu
    assert sa["config_fingerprint"] == sb["config_fingerprint"]


def test_dropout_masks_follow_the_image_stream(digits, tmp_path):
    """With dropout, micro-batching (4 × 32 for 128) and a stop/resume between the two steps give the weights and
    gradients of the plain run: each mask is a function of its image's stream position, not of the batch split
    or of a generator's state."""
    cfg = make_cfg(dropout=0.2, grad_clip=None, **TWO_STEPS)
    runs = {}
    for name, batch_gpu in (("whole", None), ("split", 32)):
        runs[name] = tmp_path / name
        train(make_cfg(dropout=0.2, grad_clip=None, batch_gpu=batch_gpu, **TWO_STEPS), "t0", digits, runs[name],
              progress=False)
    train(cfg, "t0", digits, tmp_path / "resumed", stop_after_images=128, progress=False)
    train(cfg, "t0", digits, tmp_path / "resumed", progress=False)
    states = {name: torch.load(tmp_path / name / "state.pt", weights_only=True)
              for name in ("whole", "split", "resumed")}
    assert_same_step(runs["whole"], runs["split"], states["whole"]["optimizer"], states["split"]["optimizer"])
    a = torch.load(runs["whole"] / SNAPSHOT, weights_only=True)["ema"]
    b = torch.load(tmp_path / "resumed" / SNAPSHOT, weights_only=True)["ema"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the masks act: without dropout the same steps end elsewhere
    train(make_cfg(dropout=0.0, grad_clip=None, **TWO_STEPS), "t0", digits, tmp_path / "none", progress=False)
    c = torch.load(tmp_path / "none" / SNAPSHOT, weights_only=True)["ema"]
    assert max(float((a[k] - c[k]).abs().max()) for k in a) > 1e-3


def test_forced_normalisation_keeps_the_stored_weights_on_the_unit_sphere(full_run):
    """After every step the weights the optimizer updates are renormalised: the saved net's MPConv weights have
    unit RMS per output channel (up to normalize's eps)."""
    from models.edm2 import MPConv
    from models.family import build

    out, _ = full_run
    net = torch.load(out / "state.pt", weights_only=True)["net"]
    mp = {name + ".weight" for name, m in build("t0", resolution=8, channels=1).named_modules()
          if isinstance(m, MPConv)}
    assert mp and mp <= set(net)
    for key in mp:
        assert float((channel_rms(net[key]) - 1).abs().max()) < 2e-4, key


def test_batch_that_does_not_split_names_the_key():
    from study.config import ConfigError

    with pytest.raises(ConfigError, match=r"training\.batch_gpu: 48 does not divide the per-process batch 128"):
        make_cfg(batch_size=128, batch_gpu=48)
    with pytest.raises(ConfigError, match=r"models\.t0\.training\.batch_size: 100 is not divisible by the 8"):
        make_cfg(models={"t0": {"arch": "t0", "training": {"batch_size": 100,
                                                           "launch": {"num_processes": 8}}}})
    make_cfg(batch_size=128, batch_gpu=256)   # larger than the per-process batch: the whole of it (as EDM2)


def capture_step_inputs(monkeypatch):
    """Record the real (non-meta) inputs train() gives per_example_losses."""
    seen = []
    original = loop_mod.per_example_losses

    def spy(denoiser, schedule, x0, sigma, noise, labels):
        if x0.device.type != "meta":
            seen.append((x0.clone(), sigma.clone(), noise.clone()))
        return original(denoiser, schedule, x0, sigma, noise, labels)

    monkeypatch.setattr(loop_mod, "per_example_losses", spy)
    return seen


def hand_adam_steps(cfg, steps, reduce):
    """The t0 net of `cfg` after Adam steps on EDM2's loss (EDM2Loss: (w/e^u)·(D − x0)² + u per element),
    backpropagated as `reduce` of that element-wise loss; written from the formula, not from train()."""
    from models import family
    from models.edm2 import MPConv, normalize

    tr = cfg["training"]
    torch.manual_seed(int(tr["seed"]))
    net = family.net_from_kwargs(family.arch_kwargs("t0", resolution=8, channels=1, dropout=0.0)).train()
    variant = get_variant("edm")
    opt = torch.optim.Adam(net.parameters(), lr=1.0, betas=(0.9, 0.99), eps=1e-8)
    for i, (x0, sigma, noise) in enumerate(steps):
        with torch.no_grad():  # EDM2's forced weight normalisation: the stored weight to unit norm, then the step
            for m in net.modules():
                if isinstance(m, MPConv):
                    m.weight.copy_(normalize(m.weight))
        D, u = Denoiser(net, variant)(x0 + sigma.reshape(-1, 1, 1, 1) * noise, sigma, return_logvar=True)
        w = variant.loss_weight(sigma)
        per_element = (w / u.exp()).reshape(-1, 1, 1, 1) * (D - x0) ** 2 + u.reshape(-1, 1, 1, 1)
        for group in opt.param_groups:
            group["lr"] = learning_rate((i + 1) * x0.shape[0], tr)
        opt.zero_grad()
        reduce(per_element).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def test_adam_steps_are_edm2_scaled(digits, tmp_path, monkeypatch):
    """train()'s steps equal Adam steps on EDM2's backpropagated loss, loss.sum() / batch — and differ measurably
    from the per-dimension mean's steps, since Adam's eps acts on the 64× smaller gradients."""
    cfg = make_cfg(grad_clip=None, **TWO_STEPS)
    seen = capture_step_inputs(monkeypatch)
    train(cfg, "t0", digits, tmp_path, progress=False)
    assert len(seen) == 2
    got = torch.load(tmp_path / SNAPSHOT, weights_only=True)["ema"]
    edm2 = hand_adam_steps(cfg, seen, lambda e: e.sum() / e.shape[0])
    mean = hand_adam_steps(cfg, seen, lambda e: e.mean())
    err = max(float((got[k] - edm2[k]).abs().max()) for k in got)
    gap = max(float((mean[k] - edm2[k]).abs().max()) for k in got)
    print(f"EDM2 scale: |train − hand| ≤ {err:.2e}; |EDM2 − per-dimension mean| up to {gap:.2e}")
    assert err < 1e-5, err
    assert gap > 100 * max(err, 1e-8), (gap, err)


class ConstLogvarNet(torch.nn.Module):
    """A real tiny U-Net F whose log-variance is one learnable constant u (or no head)."""

    def __init__(self, u=None):
        super().__init__()
        from models import family

        torch.manual_seed(0)
        self.net = family.build("t0", resolution=8, channels=1, logvar=False, device="cpu")
        self.label_dim = 0
        self.u = None if u is None else torch.nn.Parameter(torch.tensor(float(u)))

    def forward(self, x, c_noise, class_labels=None):
        out, _ = self.net(x, c_noise, class_labels)
        return out, None if self.u is None else self.u.expand(x.shape[0])


class ConstWeight:
    def __init__(self, w):
        self.w = w

    def loss_weight(self, sigma):
        return torch.full_like(sigma, self.w)


@pytest.mark.parametrize("sigma_value", [0.05, 1.0, 20.0])
def test_logvar_switch_sets_the_per_sigma_gradient_scale(digits, sigma_value):
    """At a fixed σ the net's gradient is w_σ·∇L without the log-variance, and (w_σ/e^u)·∇L = ∇L / E[L|σ] with u at
    its optimum log(w_σ·L): the weight is divided out, whatever it is."""
    variant = get_variant("edm")
    g = torch.Generator().manual_seed(1)
    x0 = digits.x[:64]
    noise = torch.randn(x0.shape, generator=g)
    sigma = torch.full((64,), sigma_value)

    def grad_norm(w, logvar):
        net = ConstLogvarNet(None if not logvar else 0.0)
        den = Denoiser(net, variant)
        if logvar:  # the optimum of u for this batch: e^u = w·mean L (per_example_losses' L is the dims mean)
            with torch.no_grad():
                _, L = per_example_losses(den, ConstWeight(w), x0, sigma, noise, None)
                net.u.fill_(math.log(w * float(L.mean())))
        loss, _ = per_example_losses(den, ConstWeight(w), x0, sigma, noise, None)
        params = list(net.net.parameters())
        grads = torch.autograd.grad(loss.mean(), params)
        return float(torch.sqrt(sum((gr ** 2).sum() for gr in grads)))

    off1, off100 = grad_norm(1.0, False), grad_norm(100.0, False)
    on1, on100 = grad_norm(1.0, True), grad_norm(100.0, True)
    assert off100 / off1 == pytest.approx(100.0, rel=1e-4)     # follows w_σ
    assert on100 / on1 == pytest.approx(1.0, rel=1e-4)         # normalised
    with torch.no_grad():
        mean_loss = float(per_example_losses(Denoiser(ConstLogvarNet(), variant), variant, x0, sigma, noise,
                                             None)[1].mean())
    assert on1 == pytest.approx(off1 / mean_loss, rel=1e-4)   # ∇L / E[L|σ]


def test_logvar_off_builds_no_head_and_is_part_of_the_settings(digits, tmp_path):
    cfg = make_cfg(total_images=64, snapshots={"count": 1}, log_every_images=64,
                   models={"on": {"arch": "t0"}, "off": {"arch": "t0", "training": {"logvar": False}}})
    for name in ("on", "off"):
        train(cfg, name, digits, tmp_path / name, progress=False)
    snaps = {n: torch.load(tmp_path / n / "snapshots/snapshot-000000064.pt", weights_only=True) for n in ("on", "off")}
    assert any("logvar" in k for k in snaps["on"]["ema"]) and not any("logvar" in k for k in snaps["off"]["ema"])
    den = Denoiser.from_snapshot(tmp_path / "off/snapshots/snapshot-000000064.pt")
    D, logvar = den(digits.x[:2], 1.0, return_logvar=True)
    assert logvar is None and torch.isfinite(D).all()
    # the switch is part of the run folder's settings: the other setting neither resumes nor reports done
    with pytest.raises(RunFolderMismatchError, match=r"training\.logvar: False → True"):
        train(make_cfg(total_images=64, snapshots={"count": 1}, log_every_images=64), "t0", digits,
              tmp_path / "off", progress=False)


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
    assert snapshot_x0_loss(tmp_path, 3072, digits) < 0.8 * snapshot_x0_loss(tmp_path, 64, digits)


def snapshot_x0_loss(run_dir, images, digits) -> float:
    """x0-loss at σ = 0.5 of a run's snapshot on a fixed noisy copy of the first 256 digits."""
    g = torch.Generator().manual_seed(5)
    x0 = digits.x[:256]
    x = x0 + 0.5 * torch.randn(x0.shape, generator=g)
    with torch.no_grad():
        den = Denoiser.from_snapshot(Path(run_dir) / "snapshots" / f"snapshot-{images:09d}.pt")
        return float(((den(x, 0.5) - x0) ** 2).mean())


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


def run_cli(cmd, env_extra, timeout=900, cwd=ROOT):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env_extra}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc
