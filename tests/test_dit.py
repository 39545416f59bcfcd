"""models/dit.py and its place in models/family.py: parameter and FLOP counts against closed forms, adaLN-Zero's
identity at step 0, learning, stop/resume, and (slow) one DeepSpeed ZeRO-2 run on the CPU."""

import json
import sys
from pathlib import Path

import pytest
import torch
from test_train import free_port, make_cfg, read_log, run_cli, snapshot_x0_loss

from models import family
from models.denoiser import Denoiser
from models.dit import DiT, sincos_pos_embed_2d
from models.family import arch_kwargs, build, count_params, forward_flops_per_image, training_flops_per_image
from models.sizes import DIT_PAPER_SIZES, DIT_TINY_SIZES, FAMILY, SIZES, family_of
from training.train import train

ROOT = Path(__file__).resolve().parent.parent
DIGITS = dict(resolution=8, channels=1)
LATENT = dict(resolution=32, channels=4, label_dim=1000)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def count_params_closed_form(*, img_resolution: int, img_channels: int, label_dim: int = 0, patch_size: int = 2,
                             hidden_size: int = 384, depth: int = 12, mlp_ratio: float = 4.0,
                             frequency_embedding_size: int = 256, logvar_channels: int = 128, **_ignored) -> int:
    """Trainable parameters of DiT(...) by formula (per block (10 + 2r)·D² + (11 + r)·D for MLP ratio r)."""
    d, c, p, m = hidden_size, img_channels, patch_size, int(hidden_size * mlp_ratio)
    patch = c * p * p * d + d
    t_emb = frequency_embedding_size * d + d + d * d + d
    y_emb = label_dim * d
    block = (3 * d * d + 3 * d) + (d * d + d) + (d * m + m) + (m * d + d) + (6 * d * d + 6 * d)
    final = (2 * d * d + 2 * d) + (d * p * p * c + p * p * c)
    return patch + t_emb + y_emb + depth * block + final + logvar_channels


def tiny(name="d0", seed=0, **shape):
    torch.manual_seed(seed)
    return build(name, **(shape or DIGITS), device="cpu")


# ---------------------------------------------------------------------------------------------------------------
# counts
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [dict(DIGITS), dict(DIGITS, label_dim=10), dict(resolution=32, channels=3),
                                   dict(LATENT)])
def test_parameter_counts_match_the_closed_form(shape):
    for name in DIT_TINY_SIZES + DIT_PAPER_SIZES:
        kw = arch_kwargs(name, **shape)
        assert count_params(build(name, **shape)) == count_params_closed_form(**kw), name
    kw = arch_kwargs("d2", **shape, logvar=False)
    assert count_params(build("d2", **shape, logvar=False)) == count_params_closed_form(**kw)
    assert count_params(build("d2", **shape)) - count_params(build("d2", **shape, logvar=False)) == 128


def test_paper_ladder_is_the_published_sizes():
    # width 64·depth, depth heads; about 131M, 253M, 512M, 1.03B, 1.46B parameters at 32×32×4, 1000 classes
    expected_m = dict(zip(DIT_PAPER_SIZES, (131, 253, 512, 1030, 1460)))
    for name in DIT_PAPER_SIZES:
        s = SIZES[name]
        assert s["hidden_size"] == 64 * s["depth"] and s["num_heads"] == s["depth"] and s["patch_size"] == 2
        assert count_params(build(name, **LATENT)) / 1e6 == pytest.approx(expected_m[name], rel=0.01), name


def test_cpu_ladder_spans_30x_with_unet_like_flops():
    counts = [count_params(build(n, **DIGITS)) for n in DIT_TINY_SIZES]
    assert DIT_TINY_SIZES == ("d0", "d1", "d2", "d3", "d4", "d5")
    assert all(a < b for a, b in zip(counts, counts[1:])) and counts[-1] / counts[0] >= 30, counts
    dit = [training_flops_per_image(n, **DIGITS) for n in ("d0", "d5")]
    unet = [training_flops_per_image(n, **DIGITS) for n in ("t0", "t5")]
    # the two ladders cover the same compute range (within 20% at either end)
    assert dit[0] == pytest.approx(unet[0], rel=0.2) and dit[1] == pytest.approx(unet[1], rel=0.2)


def test_family_table_names_every_dit():
    assert all(FAMILY[n] == "dit" for n in DIT_TINY_SIZES + DIT_PAPER_SIZES)
    assert FAMILY["t3"] == "edm2" and family_of("d3") == "dit"
    assert isinstance(build("d3", **DIGITS), DiT)
    kw = arch_kwargs("d3", **DIGITS, dropout=0.1)
    assert kw["family"] == "dit" and kw["dropout"] == 0.1
    assert "family" not in arch_kwargs("t3", **DIGITS)  # U-Net kwargs (and their fingerprints) unchanged
    with pytest.raises(KeyError, match="num_blocks"):
        arch_kwargs("d3", **DIGITS, num_blocks=2)
    with pytest.raises(ValueError, match="unknown family 'vit'"):
        family.net_from_kwargs({**kw, "family": "vit"}, device="meta")
    with pytest.raises(ValueError, match="divisible by patch_size 2"):
        build("d0", resolution=7, channels=1)


def test_cli_prints_the_dit_ladder(capsys):
    assert family.main(["--family", "dit", "--resolution", "8", "--channels", "1", "--names", "d0,d5"]) == 0
    out = capsys.readouterr().out
    assert "DiT family" in out and "depth" in out
    n = count_params(build("d5", **DIGITS))
    assert f"{n:,}" in out
    with pytest.raises(SystemExit):
        family.main(["--family", "dit", "--resolution", "8", "--channels", "1", "--names", "t0"])
    assert "not of family 'dit'" in capsys.readouterr().err


def closed_form_forward_flops(kw, batch_labels: bool) -> int:
    """2·(multiply-adds) of one image's forward pass: per-token linear maps, attention scores and mixing, and
    the per-image condition path (timestep MLP, label map, adaLN maps, log-variance unit)."""
    d, c, p, depth = kw["hidden_size"], kw["img_channels"], kw["patch_size"], kw["depth"]
    m = int(d * kw["mlp_ratio"])
    t = (kw["img_resolution"] // p) ** 2
    per_token = c * p * p * d + depth * (3 * d * d + d * d + 2 * d * m) + d * p * p * c
    attention = depth * 2 * t * t * d  # q·kᵀ and weights·v, all heads together
    per_image = (kw["frequency_embedding_size"] * d + d * d + (kw["label_dim"] * d if batch_labels else 0)
                 + depth * 6 * d * d + 2 * d * d + kw["logvar_channels"])
    return 2 * (t * per_token + attention + per_image)


@pytest.mark.parametrize("name,shape", [("d0", DIGITS), ("d4", dict(DIGITS, label_dim=10)), ("dit12", LATENT)])
def test_flops_match_a_closed_form(name, shape):
    kw = arch_kwargs(name, **shape)
    fwd = closed_form_forward_flops(kw, batch_labels=bool(kw["label_dim"]))
    assert forward_flops_per_image(name, **shape) == pytest.approx(fwd, rel=0.01)
    # training = forward + backward ≈ 3 × forward (the input-side maps need no input gradient: slightly less)
    assert training_flops_per_image(name, **shape) == pytest.approx(3 * fwd, rel=0.03)


# ---------------------------------------------------------------------------------------------------------------
# adaLN-Zero, positions, interface
# ---------------------------------------------------------------------------------------------------------------

def test_zero_init_blocks_are_identities_and_output_is_zero():
    net = tiny("d1", label_dim=10, **DIGITS).eval()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randn(3, 16, 64, generator=g)
    cond = torch.randn(3, 64, generator=g)
    for block in net.blocks:
        torch.testing.assert_close(block(tokens, cond), tokens, rtol=0, atol=0)
    x = torch.randn(3, 1, 8, 8, generator=g)
    out, logvar = net(x, torch.tensor([-1.0, 0.0, 0.7]), torch.tensor([0, 3, 9]))
    assert torch.equal(out, torch.zeros_like(out)) and logvar.shape == (3,) and torch.isfinite(logvar).all()
    # the identity comes from the zeroed modulation: a non-zero one makes the block act
    torch.nn.init.normal_(net.blocks[0].adaLN_modulation[-1].weight, std=0.1)
    assert not torch.allclose(net.blocks[0](tokens, cond), tokens)


def test_unpatchify_inverts_the_token_layout():
    """With the final linear map set to copy each patch's pixels, F(x) = x: patchify and unpatchify agree."""
    net = tiny("d0", resolution=8, channels=2).eval()
    p, c = 2, 2
    # a token carries its patch through x_embedder (identity on the first p·p·c channels) and the final layer
    with torch.no_grad():
        net.x_embedder.weight.zero_()
        for ci in range(c):
            for i in range(p):
                for j in range(p):
                    net.x_embedder.weight[(i * p + j) * c + ci, ci, i, j] = 1.0
        net.pos_embed.zero_()
        net.final_layer.linear.weight.zero_()
        net.final_layer.linear.weight[:p * p * c, :p * p * c] = torch.eye(p * p * c)
    net.final_layer.norm_final = torch.nn.Identity()  # pass tokens through unnormalised
    x = torch.randn(2, 2, 8, 8)
    out, _ = net(x, torch.zeros(2))
    torch.testing.assert_close(out, x)


def test_sincos_positions_are_distinct_and_bounded():
    pe = sincos_pos_embed_2d(16, 4)
    assert pe.shape == (16, 16) and pe.abs().max() <= 1
    dist = torch.cdist(pe, pe) + torch.eye(16)
    assert dist.min() > 0.1  # every patch position has its own code
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_pos_embed_2d(6, 4)


def test_denoiser_wraps_a_dit_like_a_unet():
    from models.diffusion import get_variant

    den = Denoiser(tiny("d0", label_dim=10, **DIGITS), get_variant("edm"))
    x = torch.randn(4, 1, 8, 8)
    D, logvar = den(x, torch.full((4,), 0.7), torch.tensor([1, 2, 3, 4]), return_logvar=True)
    c_skip = get_variant("edm").precond(torch.tensor(0.7))[0]
    torch.testing.assert_close(D, c_skip * x)  # F = 0 at init: D is the c_skip·x baseline
    assert logvar.shape == (4,)


# ---------------------------------------------------------------------------------------------------------------
# training: learning, stop/resume
# ---------------------------------------------------------------------------------------------------------------

def test_tiny_dit_lowers_its_loss(digits, tmp_path):
    cfg = make_cfg({"d0": {"arch": "d0"}}, total_images=2048, batch_size=64, lr=0.002, lr_rampup_images=256,
                   lr_decay_images=1024, ema_halflife_images=200,
                   snapshots={"count": 2, "spacing": "geometric", "first_images": 64}, log_every_images=256)
    train(cfg, "d0", digits, tmp_path, progress=False)  # 32 steps
    log = read_log(tmp_path)
    assert log[-1]["loss"] < log[0]["loss"] - 0.2, [r["loss"] for r in log]
    assert snapshot_x0_loss(tmp_path, 2048, digits) < 0.8 * snapshot_x0_loss(tmp_path, 64, digits)


def test_stop_and_resume_give_identical_weights(digits, tmp_path):
    cfg = make_cfg({"d0": {"arch": "d0"}}, lr=0.002)
    full, part = tmp_path / "full", tmp_path / "part"
    train(cfg, "d0", digits, full, progress=False)
    assert train(cfg, "d0", digits, part, stop_after_images=96, progress=False)["status"] == "stopped"
    assert train(cfg, "d0", digits, part, progress=False)["status"] == "done"
    for name in ("snapshot-000000128.pt", "snapshot-000000256.pt"):
        a = torch.load(full / "snapshots" / name, weights_only=True)
        b = torch.load(part / "snapshots" / name, weights_only=True)
        assert a["arch"]["kwargs"]["family"] == "dit"
        for k in a["ema"]:
            torch.testing.assert_close(b["ema"][k], a["ema"][k], rtol=0, atol=1e-6, msg=f"{name}: {k}")
    sa, sb = (torch.load(d / "state.pt", weights_only=True) for d in (full, part))
    for k in sa["net"]:
        torch.testing.assert_close(sb["net"][k], sa["net"][k], rtol=0, atol=1e-6)
    # counted FLOPs of the real step agree with the family's count of the bare net
    per_image = sa["flops_per_image"]
    assert per_image == pytest.approx(training_flops_per_image("d0", **DIGITS), rel=0.02)
    den = Denoiser.from_snapshot(full / "snapshots" / "snapshot-000000256.pt")
    assert isinstance(den.net, DiT) and torch.isfinite(den(digits.x[:2], 1.0)).all()


def write_d0_config(tmp_path, **training):
    import yaml

    tr = dict(total_images=64, batch_size=32, lr=0.002, lr_rampup_images=64, lr_decay_images=128,
              ema_halflife_images=100, snapshots={"count": 1}, log_every_images=32)
    tr.update(training)
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({"study": "test", "training": tr, "models": {"d0": {"arch": "d0"}}}))
    return cfg


@pytest.mark.slow
def test_two_process_cpu_run(tmp_path, digits):
    from training.dataset import save_npz

    data = save_npz(digits, tmp_path / "digits.npz")
    out = tmp_path / "run"
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    run_cli([torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "training.train",
             "--config", str(write_d0_config(tmp_path)), "--model", "d0", "--data", str(data), "--out", str(out),
             "--no-progress"], {"ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(ROOT)})
    assert all(r["world_size"] == 2 for r in read_log(out))
    den = Denoiser.from_snapshot(out / "snapshots/snapshot-000000064.pt")
    assert isinstance(den.net, DiT) and torch.isfinite(den(digits.x[:2], 1.0)).all()


@pytest.mark.slow
def test_deepspeed_zero2_cpu_step(tmp_path, digits):
    pytest.importorskip("deepspeed")
    pytest.importorskip("transformers")
    from training.dataset import save_npz

    data = save_npz(digits, tmp_path / "digits.npz")
    cfg = write_d0_config(tmp_path, total_images=32)
    out = tmp_path / "run"
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    run_cli([accelerate, "launch", "--config_file", str(ROOT / "workflow/accelerate/deepspeed-zero2.yaml"),
             "--num_processes", "1", "--main_process_port", str(free_port()), "-m", "training.train",
             "--config", str(cfg), "--model", "d0", "--data", str(data), "--out", str(out), "--no-progress"],
            {"PYTHONPATH": str(ROOT)})
    done = json.loads((out / "done.json").read_text())
    assert done["images_seen"] == 32 and done["arch"] == "d0"
    snap = torch.load(out / "snapshots/snapshot-000000032.pt", weights_only=True)
    den = Denoiser.from_snapshot(out / "snapshots/snapshot-000000032.pt")
    assert isinstance(den.net, DiT) and torch.isfinite(den(digits.x[:2], 1.0)).all()
    # one optimizer step moved the weights away from adaLN-Zero's init (the final layer's zero weight)
    w = snap["ema"]["final_layer.linear.weight"]
    assert w.abs().sum() > 0
    # the DiT's one forced-normalised weight (the log-variance head) has unit RMS where ZeRO keeps it: its fp32
    # master partition (the module's copy of it is saved with DeepSpeed's checkpoint)
    from models.weight_norm import channel_rms

    state = torch.load(out / "state.pt", weights_only=True)
    (model_file,) = (out / state["ds_dir"]).rglob("mp_rank_00_model_states.pt")
    head = torch.load(model_file, weights_only=False, map_location="cpu")["module"]["logvar_linear.weight"]
    assert float((channel_rms(head) - 1).abs().max()) < 2e-4


# ---------------------------------------------------------------------------------------------------------------
# per-family fits and the families figure
# ---------------------------------------------------------------------------------------------------------------

def two_family_losses(jstar=0.05):
    """Totals of two families, each exactly L = J* + β·F^α along its own snapshots (α −0.3 U-Net, −0.5 DiT)."""
    import numpy as np
    import pandas as pd

    rows = []
    for fam_arch, beta, alpha in ((("t0", "t1", "t2", "t3"), 40.0, -0.3), (("d0", "d1", "d2", "d3"), 900.0, -0.5)):
        for k, arch in enumerate(fam_arch):
            params = 1e5 * 2 ** k
            for images in (1000, 2000, 4000, 8000):
                flops = 100.0 * params * images
                rows.append(dict(model=arch, arch=arch, params=params, images_seen=images, flops=flops,
                                 sigma=np.nan, loss=jstar + beta * flops ** alpha, optimal_loss=jstar))
    return pd.DataFrame(rows)


def test_fits_per_family_recover_each_familys_exponent(tmp_path):
    from analysis.scaling import fit_table, study_outputs
    from analysis.study_stats import POOLED, pooled_fits

    df = two_family_losses()
    ema = {m: "power σ_rel=0.05" if m.startswith("d") else "halflife 2000 images" for m in df["model"]}
    out = study_outputs(df, None, tmp_path, ema=ema)
    table = out["exponents.csv"]
    assert list(table.columns[:1]) == ["group"] and set(table["group"]) == {POOLED, "edm2", "dit"}
    mj = table[(table["quantity"] == "minus_jstar") & table["sigma"].isna() & (table["axis"] == "compute")]
    mj = mj.set_index("group")
    assert mj.loc["edm2", "exponent"] == pytest.approx(-0.3, abs=1e-9)
    assert mj.loc["dit", "exponent"] == pytest.approx(-0.5, abs=1e-9)
    # each family's own frontier: one point per distinct compute (params·images = 1e8·2^0…2^6)
    assert mj.loc["edm2", "n"] == 7 and mj.loc["dit", "n"] == 7
    # the pooled rows are exactly fit_table on everything
    # each family's rows state its own EMA, the pooled ones every family's (exponents.md: the pooled fits)
    assert (table.loc[table["group"] == "dit", "ema"] == "power σ_rel=0.05").all()
    assert (table.loc[table["group"] == "edm2", "ema"] == "halflife 2000 images").all()
    mixed = "halflife 2000 images (t0, t1, t2, t3); power σ_rel=0.05 (d0, d1, d2, d3)"
    assert (table.loc[table["group"] == POOLED, "ema"] == mixed).all() and f"EMA weights — {mixed}." in out[
        "exponents.md"]
    pooled = pooled_fits(table)
    ref = fit_table(df)
    assert list(pooled.columns) == list(ref.columns) + ["ema"]
    assert pooled["exponent"].to_numpy() == pytest.approx(ref["exponent"].to_numpy(), nan_ok=True)
    diff = out["family_differences.csv"].set_index(["quantity", "axis"])
    row = diff.loc[("minus_jstar", "compute")]
    assert (row["family_a"], row["family_b"]) == ("dit", "edm2")
    assert row["difference"] == pytest.approx(-0.5 - (-0.3), abs=1e-9)
    md = out["exponents.md"]
    assert md.startswith("# Architecture families") and "| dit | minus_jstar | compute | -0.5" in md
    # one family alone: no group column, no differences
    one = study_outputs(df[df["arch"].str.startswith("t")], None, tmp_path / "one")
    assert "group" not in one["exponents.csv"].columns and "family_differences.csv" not in one


def test_families_figure(tmp_path):
    from analysis.plots import main as plots_main
    from analysis.scaling import study_outputs

    df = two_family_losses()
    losses, exponents = tmp_path / "losses.csv", tmp_path / "exponents.csv"
    df.to_csv(losses, index=False)
    study_outputs(df, None, tmp_path)
    out = tmp_path / "families.png"
    assert plots_main(["families", "--losses", str(losses), "--exponents", str(exponents), "--out", str(out)]) == 0
    assert out.stat().st_size > 10000
    # the study figures read the pooled rows of a grouped table
    assert plots_main(["scaling", "--losses", str(losses), "--exponents", str(exponents),
                       "--out", str(tmp_path / "s.png")]) == 0


def test_unet_vs_dit_study_dry_run(tmp_path):
    """The comparison study: both CPU ladders with equal images and one J*, per-family fits and their figure."""
    from test_workflow import CONFIGS, job_counts, load_cfg, marks_of, smk

    cfg = load_cfg("unet-vs-dit")
    archs = {m: e["arch"] for m, e in cfg["models"].items()}
    assert sorted(archs.values()) == sorted(("t0", "t1", "t2", "t3", "t4", "t5") + DIT_TINY_SIZES)
    assert len({marks_of(cfg, m)[-1] for m in archs}) == 1  # every model trains on the same number of images
    _, out = smk("-n", "-p", "--configfile", CONFIGS / "unet-vs-dit.yaml", directory=tmp_path)
    counts = job_counts(out)
    assert {f"train_{m}" for m in archs} <= set(counts)
    assert counts["family_figure"] == 1 and counts["scaling"] == 1 and counts["jstar"] == 1
    # a one-family study has no families figure
    _, out = smk("-n", "--configfile", CONFIGS / "default.yaml", directory=tmp_path / "default")
    assert "family_figure" not in job_counts(out)
