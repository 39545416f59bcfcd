"""The EDM2 family: paper parameter counts, the tiny ladder, magnitude preservation, labels, FLOPs, the CLI."""

import math
from pathlib import Path

import pytest
import torch

from models import edm2
from models.family import (arch_kwargs, build, count_params, forward_flops_per_image, net_from_kwargs,
                           training_flops_per_image)
from models.sizes import PAPER_PARAMS_M, PAPER_SIZES, SIZES, TINY_SIZES

ROOT = Path(__file__).resolve().parents[1]
DIGITS = dict(resolution=8, channels=1, label_dim=10)


def _with_unit_gains(net):
    """Set the zero-initialised scalar gains to 1, as after some training, so embedding and output are live."""
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim == 0:
                p.fill_(1.0)
    return net


def _tiny(name="t0", seed=0, **kw):
    torch.manual_seed(seed)
    return build(name, device="cpu", **{**DIGITS, **kw})


# -- parameter counts --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", PAPER_SIZES)
def test_paper_parameter_counts_match_edm2_img512(name):
    net = build(name, resolution=64, channels=4, label_dim=1000)  # meta: nothing allocated
    assert all(p.is_meta for p in net.parameters())
    got = count_params(net) / 1e6
    assert abs(got - PAPER_PARAMS_M[name]) / PAPER_PARAMS_M[name] < 0.02, (name, got)


def test_paper_widths_and_design():
    assert [SIZES[n]["model_channels"] for n in PAPER_SIZES] == [128, 192, 256, 320, 384, 448]
    kw = arch_kwargs("xs", resolution=64, channels=4, label_dim=1000)
    assert kw["channel_mult"] == [1, 2, 3, 4] and kw["num_blocks"] == 3 and kw["attn_resolutions"] == [16, 8]
    assert kw["dropout"] == 0.0 and kw["channels_per_head"] == 64 and kw["logvar_channels"] == 128


def test_logvar_head_is_optional_and_tiny():
    with_head = count_params(build("xs", resolution=64, channels=4, label_dim=1000))
    without = count_params(build("xs", resolution=64, channels=4, label_dim=1000, logvar=False))
    assert with_head - without == 128  # one linear unit on 128 Fourier features


def test_tiny_ladder_is_ordered_and_spans_30x():
    assert len(TINY_SIZES) >= 5
    counts = [count_params(build(n, **DIGITS)) for n in TINY_SIZES]
    assert all(a < b for a, b in zip(counts, counts[1:])), counts
    assert counts[-1] / counts[0] >= 30, counts


def test_every_size_builds_for_other_shapes():
    for name in SIZES:  # CIFAR-like 32×32×3 on meta, every size
        net = build(name, resolution=32, channels=3, label_dim=10)
        assert count_params(net) > 0
    net = _tiny("t1", resolution=32, channels=3, label_dim=0)
    out, logvar = net(torch.randn(2, 3, 32, 32), torch.zeros(2))
    assert out.shape == (2, 3, 32, 32) and logvar.shape == (2,)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="resolution 12"):
        build("xs", resolution=12, channels=4)
    with pytest.raises(KeyError, match="unknown model size 'huge'"):
        build("huge", resolution=8, channels=1)
    with pytest.raises(KeyError, match="dropuot"):
        build("t0", resolution=8, channels=1, dropuot=0.1)
    net = _tiny()
    with pytest.raises(ValueError, match=r"shape \[B, 1, 8, 8\]"):
        net(torch.randn(2, 3, 8, 8), torch.zeros(2))
    with pytest.raises(ValueError, match="class_labels must lie in"):
        net(torch.randn(2, 1, 8, 8), torch.zeros(2), torch.tensor([0, 10]))


def test_arch_kwargs_rebuild_and_load():
    kw = arch_kwargs("t2", **DIGITS, dropout=0.1)
    a, b = net_from_kwargs(kw), net_from_kwargs(kw)
    b.load_state_dict(a.state_dict())  # same architecture, strict load
    assert count_params(a) == count_params(build("t2", **DIGITS))
    assert kw["dropout"] == 0.1


# -- forward pass ------------------------------------------------------------------------------------------------

def test_forward_shapes_finite_and_zero_at_init():
    net = _tiny()
    x, c_noise = torch.randn(5, 1, 8, 8), torch.linspace(-1.5, 1.0, 5)
    out, logvar = net(x, c_noise, torch.arange(5))
    assert out.shape == (5, 1, 8, 8) and logvar.shape == (5,)
    assert torch.isfinite(out).all() and torch.isfinite(logvar).all()
    assert torch.count_nonzero(out) == 0  # zero-initialised output gain: F = 0 until trained
    out2, logvar2 = _tiny(logvar=False)(x, c_noise)
    assert logvar2 is None and out2.shape == x.shape


def test_magnitude_preservation():
    net = _with_unit_gains(_tiny("t3")).eval()
    rms = {}
    blocks = [(f"enc.{n}", b) for n, b in net.enc.items()] + [(f"dec.{n}", b) for n, b in net.dec.items()]
    for name, block in blocks:
        block.register_forward_hook(lambda m, i, o, name=name: rms.__setitem__(name, o.square().mean().sqrt().item()))
    with torch.no_grad():
        out, _ = net(torch.randn(64, 1, 8, 8), 0.5 * torch.randn(64), torch.randint(0, 10, (64,)))
    assert len(rms) == len(net.enc) + len(net.dec)
    assert all(0.5 < v < 2.0 for v in rms.values()), rms
    assert 0.4 < out.std().item() < 2.5


def test_primitives_preserve_unit_magnitude():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(4000, 64, generator=g), torch.randn(4000, 64, generator=g)
    rms = lambda t: t.square().mean().sqrt().item()
    assert abs(rms(edm2.mp_silu(a)) - 1) < 0.02
    for t in (0.3, 0.5, 0.8):
        assert abs(rms(edm2.mp_sum(a, b, t)) - 1) < 0.02
    cat = edm2.mp_cat(a[:, :16], b, t=0.3)
    assert abs(rms(cat) - 1) < 0.02
    # balance: b's share of the squared magnitude is t^2 / ((1-t)^2 + t^2)
    share = cat[:, 16:].square().sum() / cat.square().sum()
    assert abs(share.item() - 0.09 / 0.58) < 0.01
    conv = edm2.MPConv(64, 32, kernel=())
    assert abs(rms(conv(a)) - 1) < 0.05
    feats = edm2.MPFourier(256)(torch.randn(1000, generator=g))
    assert abs(rms(feats) - 1) < 0.05


def test_mpconv_weight_scale_invariant_and_forced_normalisation():
    torch.manual_seed(0)
    conv = edm2.MPConv(8, 4, kernel=(3, 3)).eval()
    x = torch.randn(2, 8, 5, 5)
    ref = conv(x)
    with torch.no_grad():
        conv.weight.mul_(7.0)
    scaled = conv.weight.detach().clone()
    assert torch.allclose(conv(x), ref, atol=1e-3)  # eval: weight scale has no effect (up to eps)
    assert torch.equal(conv.weight, scaled)  # and eval never writes the weight
    conv.train()(x).square().sum().backward()
    assert torch.equal(conv.weight, scaled)  # nor does a training forward: the trainer owns the stored weight
    # the gradient is that of a normalised weight: orthogonal to each output channel's weight vector
    radial = (conv.weight.grad * conv.weight).flatten(1).sum(1) / conv.weight.grad.flatten(1).norm(dim=1)
    assert radial.abs().max() < 1e-4 * conv.weight.flatten(1).norm(dim=1).max()
    from models.weight_norm import channel_rms, forced_weights, normalize_forced_weights_

    normalize_forced_weights_(forced_weights(conv))  # forced weight normalisation: unit RMS per output channel
    assert torch.allclose(channel_rms(conv.weight), torch.ones(4), atol=2e-4)
    assert torch.equal(conv.weight, edm2.normalize(scaled))   # each channel rescaled, its direction kept


def test_class_labels_change_output():
    net = _with_unit_gains(_tiny()).eval()
    x, c = torch.randn(3, 1, 8, 8), torch.zeros(3)
    with torch.no_grad():
        a, _ = net(x, c, torch.tensor([0, 1, 2]))
        b, _ = net(x, c, torch.tensor([3, 4, 5]))
        onehot, _ = net(x, c, torch.nn.functional.one_hot(torch.tensor([0, 1, 2]), 10).float())
    assert (a - b).abs().amax(dim=(1, 2, 3)).min() > 1e-3
    assert torch.allclose(a, onehot)


def test_noise_level_changes_output_and_logvar():
    net = _with_unit_gains(_tiny()).eval()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        a, la = net(x, torch.full((2,), -1.0))
        b, lb = net(x, torch.full((2,), 1.0))
    assert (a - b).abs().max() > 1e-3 and (la - lb).abs().max() > 1e-3


def test_dropout_active_only_in_training():
    net = _with_unit_gains(_tiny(dropout=0.5))
    x, c = torch.randn(2, 1, 8, 8), torch.zeros(2)
    with torch.no_grad():
        net.eval()
        assert torch.equal(net(x, c)[0], net(x, c)[0])
        net.train()
        assert not torch.equal(net(x, c)[0], net(x, c)[0])


def test_bf16_autocast_backward_runs():
    net = _with_unit_gains(_tiny()).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, logvar = net(torch.randn(4, 1, 8, 8), torch.zeros(4), torch.arange(4))
    (out.float().square().mean() + logvar.float().mean()).backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


# -- FLOPs -------------------------------------------------------------------------------------------------------

def _reference_forward_flops(net, x, c_noise, labels):
    """Independent count: 2·multiply-adds of every MPConv call (output elements × fan-in) plus the two attention
    einsums (each B·C·(HW)² multiply-adds), read off forward hooks on a real batch."""
    macs = []
    for m in net.modules():
        if isinstance(m, edm2.MPConv):
            m.register_forward_hook(lambda mod, i, o: macs.append(o.numel() * mod.weight[0].numel()))
        if isinstance(m, edm2.Block) and m.num_heads:
            m.register_forward_hook(lambda mod, i, o: macs.append(2 * o.shape[0] * o.shape[1] * (o[0, 0].numel()) ** 2))
    with torch.no_grad():
        net(x, c_noise, labels)
    return 2 * sum(macs) / x.shape[0]


def test_counted_flops_match_independent_reference():
    net = _tiny("t1").eval()
    ref = _reference_forward_flops(net, torch.randn(3, 1, 8, 8), torch.zeros(3), torch.arange(3))
    assert forward_flops_per_image("t1", **DIGITS) == ref
    train = training_flops_per_image("t1", **DIGITS)
    assert 2.9 * ref < train <= 3 * ref  # backward = input grads + weight grads (first layer needs no input grad)


def test_flops_positive_and_increasing_with_size():
    flops = [training_flops_per_image(n, **DIGITS) for n in TINY_SIZES[:3]]
    assert flops[0] > 0 and all(a < b for a, b in zip(flops, flops[1:])), flops


@pytest.mark.slow
def test_paper_forward_flops_match_edm2_table():
    """EDM2 Table 2 (ImageNet-512 latents) lists forward Gflops as multiply-adds: 46, 102, 181, 282, 406, 552."""
    published = dict(zip(PAPER_SIZES, (46, 102, 181, 282, 406, 552)))
    gmacs = {n: forward_flops_per_image(n, resolution=64, channels=4, label_dim=1000) / 2e9 for n in PAPER_SIZES}
    for n in PAPER_SIZES:
        assert abs(gmacs[n] / published[n] - 1) < 0.03, (n, gmacs[n])


# -- CLI ---------------------------------------------------------------------------------------------------------

def test_cli_prints_table(capsys):
    from models.family import main

    assert main(["--resolution", "8", "--channels", "1", "--label-dim", "10", "--names", "t0,t2"]) == 0
    stdout = capsys.readouterr().out
    lines = stdout.splitlines()
    assert any("parameters" in l and "GFLOPs" in l for l in lines), stdout
    for name in ("t0", "t2"):
        row = next(l for l in lines if l.split() and l.split()[0] == name)
        params = int(row.split()[2].replace(",", ""))
        assert params == count_params(build(name, **DIGITS))
        printed = float(row.split()[-1].replace(",", ""))
        assert math.isclose(printed, training_flops_per_image(name, **DIGITS) / 1e9, rel_tol=1e-3)


def test_cli_rejects_unknown_name(capsys):
    from models.family import main

    with pytest.raises(SystemExit) as exit_:
        main(["--resolution", "8", "--channels", "1", "--names", "t0,zz", "--no-flops"])
    assert exit_.value.code != 0 and "zz" in capsys.readouterr().err


def test_gpu_benchmark_imports_and_runs_on_cpu(capsys):
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_train_gpu", ROOT / "benchmarks" / "bench_train_gpu.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--device", "cpu", "--sizes", "t0", "--steps", "1", "--warmup", "0", "--batch", "2",
                       "--resolution", "8", "--channels", "1", "--label-dim", "10"]) == 0
    out = capsys.readouterr().out
    row = next(l for l in out.splitlines() if l.startswith("t0 "))
    assert row.rstrip().endswith(bench.device_name(torch.device("cpu")))
    assert float(row.split()[4]) > 0  # images/s
