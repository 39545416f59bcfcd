"""EDM2's power-function EMA (training/power_ema.py): σ_rel ↔ γ, the accumulator against its closed-form weights,
the post-hoc reconstruction against an oracle that accumulated the target directly, and the trainer's profiles
(snapshots, profile files, exact resumption, the config's errors)."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

import training.power_ema as pe
from study.config import ConfigError, load_config
from study.spec import ema_label
from training.train import train

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ---------------------------------------------------------------------------------------------------------------
# σ_rel ↔ γ and the accumulator
# ---------------------------------------------------------------------------------------------------------------

def test_sigma_rel_and_gamma_convert_both_ways():
    # EDM2's stored profiles: σ_rel 0.05 ↔ γ ≈ 16.97, 0.10 ↔ γ ≈ 6.94 (its paper's table)
    assert pe.sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)
    assert pe.sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    for s in (0.01, 0.05, 0.1, 0.2, 0.28):
        assert pe.gamma_to_sigma_rel(pe.sigma_rel_to_gamma(s)) == pytest.approx(s, rel=1e-13)
    # the relative width is the profile's own: std of τ under (γ+1)τ^γ on [0, 1], by quadrature
    g = pe.sigma_rel_to_gamma(0.1)
    tau = (np.arange(200_000) + 0.5) / 200_000
    p = (g + 1) * tau ** g / 200_000
    assert math.sqrt(p @ tau ** 2 - (p @ tau) ** 2) == pytest.approx(0.1, rel=1e-6)
    with pytest.raises(ValueError, match="σ_rel must lie in"):
        pe.sigma_rel_to_gamma(0.29)


def one_parameter_net(n):
    net = torch.nn.Linear(n, 1, bias=False)
    net.weight.data.zero_()
    return net


def test_accumulated_profile_is_its_closed_form_weighting():
    """Feeding the unit vectors e_1 … e_T as the raw weights, the EMA after T steps is the weight vector itself:
    it must be w_{γ,T}(k) = (k^(γ+1) − (k−1)^(γ+1))/T^(γ+1), whatever the earlier β's were."""
    T = 40
    net = one_parameter_net(T)
    ema = pe.PowerEMA(one_parameter_net(T), [0.05, 0.2])
    for k in range(T):
        net.weight.data.zero_()
        net.weight.data[0, k] = 1.0
        ema.update(net)
    k = np.arange(1, T + 1, dtype=np.float64)
    for module, g in zip(ema.modules, ema.gammas):
        direct = (k ** (g + 1) - (k - 1) ** (g + 1)) / T ** (g + 1)
        np.testing.assert_allclose(module.weight.detach().double().numpy()[0], direct, rtol=2e-5, atol=1e-9)
        np.testing.assert_allclose(pe.profile_weights(g, T, k), direct, rtol=1e-12)
        assert pe.profile_weights(g, T, k).sum() == pytest.approx(1.0, rel=1e-12)
    assert ema.steps == T


# ---------------------------------------------------------------------------------------------------------------
# reconstruction against an oracle
# ---------------------------------------------------------------------------------------------------------------

def synthetic_run(tmp_path, sigma_rels, steps=96, every=8, dim=64, seed=0):
    """Raw weights a random walk with drift, profiles stored every `every` steps as files; returns the files and
    the raw weights of every step [steps, dim] (float64)."""
    gen = torch.Generator().manual_seed(seed)
    net = one_parameter_net(dim)
    ema = pe.PowerEMA(one_parameter_net(dim), sigma_rels)
    files, thetas = [], []
    for step in range(1, steps + 1):
        net.weight.data += 0.05 + torch.randn(1, dim, generator=gen) * 0.3
        thetas.append(net.weight.detach().double().reshape(-1).clone())
        ema.update(net)
        if step % every == 0:
            path = tmp_path / f"profile-{step:09d}.pt"
            torch.save({"ema_power": ema.record(batch_size=1)}, path)
            files.append(path)
    return files, torch.stack(thetas)


def independent_weights(sol):
    """(W [stored, T*], w* [T*]): the stored profiles' and the target's weights over the steps 1..T*, from the
    difference of powers written out (not training.power_ema's own form)."""
    t_out, g_out = sol.target
    k = np.arange(1, t_out + 1, dtype=np.float64)

    def w(g, t):
        kk = np.minimum(k, t)
        return np.where(k <= t, (kk ** (g + 1) - (kk - 1) ** (g + 1)) / t ** (g + 1), 0.0)

    return np.stack([w(g, t) for t, g in sol.stored]), w(g_out, t_out)


def residual_weights(sol) -> np.ndarray:
    """r(k) = Σ_i x_i·w_i(k) − w*(k), checked to be the constrained least-squares optimum: its reported size
    matches, and r is equally correlated with every stored profile (the normal equations with Σ x = 1:
    Wr = −λ·1)."""
    W, w_out = independent_weights(sol)
    r = sol.coefficients @ W - w_out
    assert sol.residual_rel_l2 == pytest.approx(np.linalg.norm(r) / np.linalg.norm(w_out), rel=1e-6, abs=1e-12)
    assert sol.residual_l1 == pytest.approx(np.abs(r).sum(), rel=1e-6, abs=1e-12)
    correlations = W @ r
    assert np.ptp(correlations) <= 1e-9 * np.linalg.norm(W, axis=1).max() * max(np.linalg.norm(r), 1e-300)
    return r


def check_against_oracle(rec: dict, oracle: dict, sol, thetas: torch.Tensor, keys=("weight",)) -> float:
    """The reconstruction misses the oracle by exactly Σ_k r(k)·θ_k (the raw weights θ_k of every step [T, P],
    `keys` concatenated), up to fp32 rounding; hence by at most Σ|r|·max|θ|. Returns the largest miss."""
    miss = torch.cat([(rec[k].double() - oracle[k].double()).reshape(-1) for k in keys])
    predicted = torch.from_numpy(residual_weights(sol)) @ thetas
    scale = float(thetas.abs().max())
    print(f"residual rel L2 {sol.residual_rel_l2:.3g}, L1 {sol.residual_l1:.3g}; max |θ_rec − θ_oracle| "
          f"{float(miss.abs().max()):.3g} (bound Σ|r|·max|θ| = {sol.residual_l1 * scale:.3g}), "
          f"max |miss − Σ r(k)θ_k| {float((miss - predicted).abs().max()):.3g}")
    torch.testing.assert_close(miss, predicted, rtol=0, atol=2e-6 * scale)
    assert float(miss.abs().max()) <= sol.residual_l1 * scale + 2e-6 * scale
    return float(miss.abs().max())


@pytest.mark.parametrize("target", [0.07, 0.15])
def test_reconstruction_matches_a_directly_accumulated_oracle(tmp_path, target):
    stored = [0.05, 0.10]
    files, thetas = synthetic_run(tmp_path, stored + [target])
    rec, sol = pe.reconstruct(files, target, use_sigma_rels=stored)
    profiles = torch.load(files[-1])["ema_power"]["profiles"]
    print(f"\nσ_rel {target} from {stored}: ", end="")
    err = check_against_oracle(rec, profiles[2], sol, thetas)
    oracle = profiles[2]["weight"].double()
    assert sol.coefficients.sum() == pytest.approx(1.0, abs=1e-12)
    # and it is a real reconstruction: far closer than either stored profile of the same step
    last = torch.load(files[-1])["ema_power"]["profiles"]
    for i in range(2):
        assert err < 0.2 * float((last[i]["weight"].double() - oracle).abs().max())


def test_reconstructing_a_stored_profile_returns_it(tmp_path):
    files, _thetas = synthetic_run(tmp_path, [0.05, 0.10])
    stored = torch.load(files[-1])["ema_power"]["profiles"]
    for i, s in enumerate((0.05, 0.10)):
        rec, sol = pe.reconstruct(files, s)
        assert sol.residual_rel_l2 < 1e-9
        torch.testing.assert_close(rec["weight"], stored[i]["weight"], rtol=0, atol=2e-6)
    # at an earlier stored step too (only the profiles stored by then take part)
    rec, sol = pe.reconstruct(files, 0.10, steps=48)
    torch.testing.assert_close(rec["weight"], torch.load(files[5])["ema_power"]["profiles"][1]["weight"],
                               rtol=0, atol=2e-6)
    with pytest.raises(ValueError, match="no stored profile at step 50"):
        pe.reconstruct(files, 0.10, steps=50)


# ---------------------------------------------------------------------------------------------------------------
# the trainer's profiles
# ---------------------------------------------------------------------------------------------------------------

def test_ema_label_names_the_ema_the_snapshots_are_evaluated_at():
    """models.json's `ema` (exponents.csv's column): the classic half-life with its ramp, or the first stored power
    profile (the snapshots' `ema`), whatever the other kind's keys say."""
    assert ema_label({"ema_halflife_images": 2000, "ema_rampup_ratio": 0.05}) == \
        "halflife 2000 images, ramp 0.05 × images seen"
    assert ema_label({"ema_halflife_images": 5e7, "ema_rampup_ratio": None, "ema": {"kind": "classic"}}) == \
        "halflife 5e+07 images"
    assert ema_label({"ema_halflife_images": 0, "ema_rampup_ratio": 0.05}) == "none (raw weights)"
    assert ema_label({"ema_halflife_images": 2000, "ema": {"kind": "power"}}) == "power σ_rel=0.05"
    assert ema_label({"ema": {"kind": "power", "sigma_rel": [0.1, 0.05]}}) == "power σ_rel=0.1"


def power_cfg(sigma_rel=(0.05, 0.10), **training):
    tr = dict(total_images=256, batch_size=32, lr_rampup_images=64, lr_decay_images=128,
              snapshots={"count": 2, "spacing": "geometric", "first_images": 128}, log_every_images=64,
              ema={"kind": "power", "sigma_rel": list(sigma_rel), "profile_every_images": 32})
    tr.update(training)
    return load_config({"study": "test", "training": tr, "models": {"t0": {"arch": "t0"}}})


@pytest.fixture(scope="module")
def power_run(tmp_path_factory, digits):
    out = tmp_path_factory.mktemp("power")
    train(power_cfg(), "t0", digits, out, progress=False)
    return out


def test_snapshots_and_profile_files_hold_every_profile(power_run):
    snap = torch.load(power_run / "snapshots" / "snapshot-000000256.pt", weights_only=True)
    rec = snap["ema_power"]
    assert rec["sigma_rel"] == [0.05, 0.10] and rec["steps"] == 8 and rec["batch_size"] == 32
    assert rec["gamma"] == pytest.approx([pe.sigma_rel_to_gamma(0.05), pe.sigma_rel_to_gamma(0.10)])
    for k, v in snap["ema"].items():  # the snapshot's `ema` is the first profile, fp32
        assert torch.equal(v, rec["profiles"][0][k]) and v.dtype in (torch.float32, torch.int64, torch.bool)
    assert not all(torch.equal(rec["profiles"][0][k], rec["profiles"][1][k]) for k in snap["ema"])
    # `ema` shares the first profile's storage: a snapshot is barely larger than a profile-only file (2 copies)
    one_copy = 4 * sum(v.numel() for v in snap["ema"].values())
    size = (power_run / "snapshots" / "snapshot-000000256.pt").stat().st_size
    assert size - (power_run / pe.PROFILE_DIR / "profile-000000224.pt").stat().st_size < one_copy / 4
    # profile files at every 32 images but the snapshot marks (128, 256)
    names = sorted(p.name for p in (power_run / pe.PROFILE_DIR).glob("*.pt"))
    assert names == [f"profile-{i:09d}.pt" for i in (32, 64, 96, 160, 192, 224)]
    assert [int(pe.read_power_record(p)["steps"]) for p in pe.run_profile_files(power_run)] == [4, 8, 1, 2, 3, 5,
                                                                                                 6, 7]


def test_power_run_resumes_bit_exactly(power_run, digits, tmp_path):
    cfg = power_cfg()
    assert train(cfg, "t0", digits, tmp_path, stop_after_images=96, progress=False)["status"] == "stopped"
    assert train(cfg, "t0", digits, tmp_path, progress=False)["status"] == "done"
    for a in pe.run_profile_files(power_run):
        b = tmp_path / a.relative_to(power_run)
        ra, rb = pe.read_power_record(a), pe.read_power_record(b)
        assert ra["steps"] == rb["steps"]
        for pa, pb in zip(ra["profiles"], rb["profiles"]):
            for k in pa:
                assert torch.equal(pa[k], pb[k]), f"{a.name}: {k}"


def test_trained_profiles_reconstruct_a_third_profile_within_the_residual(digits, tmp_path, monkeypatch):
    """The oracle in a real run: the trainer also accumulates σ_rel 0.07; reconstructed from the 0.05 and 0.10
    profiles alone it must agree to the residual bound (max |θ_k| recorded at every step)."""
    thetas, keys = [], []
    update = pe.PowerEMA.update

    def recording(self, net):  # the raw weights each update averages in, under the EMA's parameter names
        keys[:] = [name for name, _ in self.modules[0].named_parameters()]
        thetas.append(torch.cat([p.detach().double().reshape(-1) for p in net.parameters()]))
        return update(self, net)

    monkeypatch.setattr(pe.PowerEMA, "update", recording)
    # 32 steps, profiles stored at 4 of them: fewer stored vectors (8) than steps, so the fit is not exact
    cfg = power_cfg((0.05, 0.10, 0.07), total_images=512, batch_size=16,
                    ema={"kind": "power", "sigma_rel": [0.05, 0.10, 0.07], "profile_every_images": 128})
    train(cfg, "t0", digits, tmp_path, progress=False)
    files = pe.run_profile_files(tmp_path)
    assert len(files) == 4
    rec, sol = pe.reconstruct(files, 0.07, use_sigma_rels=[0.05, 0.10])
    oracle = pe.read_power_record(tmp_path / "snapshots" / "snapshot-000000512.pt")["profiles"][2]
    print("\ntrained t0, σ_rel 0.07 from 0.05/0.10 over 32 steps: ", end="")
    err = check_against_oracle(rec, oracle, sol, torch.stack(thetas), keys)
    for name in set(oracle) - set(keys):  # buffers: copied from the profile at the target, not averaged
        assert torch.equal(rec[name], oracle[name])
    assert sol.residual_rel_l2 > 1e-4  # a real fit, not an identity
    stored = pe.read_power_record(tmp_path / "snapshots" / "snapshot-000000512.pt")["profiles"][:2]
    nearest = min(max(float((p[k].double() - oracle[k].double()).abs().max()) for k in oracle
                      if oracle[k].is_floating_point()) for p in stored)
    print(f"  the nearest stored profile differs from the oracle by {nearest:.3g}")
    assert err < 0.5 * nearest


def test_power_only_keys_need_kind_power():
    base = {"study": "t", "models": {"t0": {"arch": "t0", "training": {"ema": {"sigma_rel": [0.1]}}}}}
    with pytest.raises(ConfigError, match=r"my.yaml: models.t0.training.ema.sigma_rel: set, but"):
        load_config(base, where="my.yaml")
    with pytest.raises(ConfigError, match=r"my.yaml: training.ema.sigma_rel.0: 0.3 is greater"):
        load_config({"study": "t", "models": {"t0": {"arch": "t0"}},
                     "training": {"ema": {"kind": "power", "sigma_rel": [0.3]}}}, where="my.yaml")
    # a model may switch its own EMA on; the study's section stays classic
    cfg = load_config({"study": "t", "models": {"t0": {"arch": "t0", "training": {"ema": {"kind": "power"}}}}})
    assert "ema" not in cfg["training"]


@pytest.mark.slow
def test_profiles_under_ddp_and_zero2_match_the_plain_trainer(digits, tmp_path):
    """The profiles live on each process's module copy, fed from the weights the optimizer wrote (ZeRO-2: its exact
    replica of the fp32 master): 2-process DDP and 2-process ZeRO-2 (stopped midway and resumed) store the plain
    trainer's profiles, in every snapshot and profile file, to float32 reduction error."""
    from test_engines import PARITY, launch, max_relative_difference, write_config

    from training.dataset import save_npz

    data = save_npz(digits, tmp_path / "digits.npz")
    ema = {"kind": "power", "sigma_rel": [0.05, 0.10], "profile_every_images": 64}
    config = write_config(tmp_path / "cfg", batch_gpu=8, ema=ema)
    train(load_config({"study": "engines", "training": {**PARITY, "ema": ema}, "models": {"t0": {"arch": "t0"}}}),
          "t0", data, tmp_path / "plain", progress=False)
    launch("ddp-2", config, data, tmp_path / "ddp-2")
    launch("zero2-2", config, data, tmp_path / "zero2-2", "--stop-after-images", "96")
    launch("zero2-2", config, data, tmp_path / "zero2-2")
    reference = pe.run_profile_files(tmp_path / "plain")
    assert [p.name for p in reference] == ["snapshot-000000096.pt", "snapshot-000000192.pt", "profile-000000064.pt",
                                           "profile-000000128.pt"]
    for engine in ("ddp-2", "zero2-2"):
        for ref in reference:
            a = pe.read_power_record(ref)
            b = pe.read_power_record(tmp_path / engine / ref.relative_to(tmp_path / "plain"))
            assert a["steps"] == b["steps"]
            for pa, pb in zip(a["profiles"], b["profiles"]):
                assert set(pa) == set(pb) and all(pb[k].shape == pa[k].shape for k in pa)  # scalars unpromoted
                diff = max_relative_difference(pb, pa)
                print(f"{engine} {ref.name}: max relative profile difference {diff:.2e}")
                assert diff <= 1e-4, (engine, ref.name, diff)


# ---------------------------------------------------------------------------------------------------------------
# the evaluation over EMA lengths
# ---------------------------------------------------------------------------------------------------------------

def test_halves_alternate_within_each_sigma_level():
    from analysis.ema_sweep import halves

    sigma = np.array([0.1, 0.1, 0.1, 0.1, 1.0, 1.0, 1.0, 1.0])
    assert halves(sigma).tolist() == [0, 1, 0, 1, 0, 1, 0, 1]
    assert halves(np.array([1.0, 0.1, 1.0, 0.1])).tolist() == [0, 0, 1, 1]


def test_ema_sweep_evaluates_the_final_snapshot_at_each_sigma_rel(power_run, digits, tmp_path):
    from analysis import ema_sweep
    from analysis import eval_set as es_mod
    from analysis import evaluate as ev
    from analysis.optimal_loss import denoise_eval_set
    from training.dataset import save_npz

    data = save_npz(digits, tmp_path / "d.npz")
    es = es_mod.make_eval_set(len(digits.x), es_mod.sigma_grid(4, 0.05, 5.0), 8, seed=3)
    es_mod.save_eval_set(es, tmp_path / "es.npz")
    np.save(tmp_path / "dstar.npy", denoise_eval_set(digits.x, es))
    common = ["--dataset", str(data), "--eval-set", str(tmp_path / "es.npz"), "--denoised",
              str(tmp_path / "dstar.npy"), "--device", "cpu"]
    files = [str(p) for p in pe.run_profile_files(power_run)]
    grid = [0.03, 0.05, 0.07, 0.10, 0.2]
    out = tmp_path / "sweep" / "t0.csv"
    out.parent.mkdir()
    assert ema_sweep.main(["evaluate", "--files", *files, "--sigma-rel", *map(str, grid), "--out", str(out),
                           *common]) == 0
    table = pd.read_csv(out)
    assert table["sigma_rel"].tolist() == grid and set(table["snapshot"]) == {256} and set(table["steps"]) == {8}
    # equal triples per σ in each half: the totals are linear in the per-σ means, so all = the halves' mean
    np.testing.assert_allclose(table["loss"], (table["loss_a"] + table["loss_b"]) / 2, rtol=1e-12)
    assert table["best"].sum() == 1 and table.loc[table["best"], "loss_a"].iloc[0] == table["loss_a"].min()
    # σ_rel 0.05 is the stored first profile, the snapshot's `ema`: the standard evaluation's total
    ((standard, _),) = ev.evaluate_snapshots([files[1]], data, es, np.load(tmp_path / "dstar.npy"), device="cpu")
    total = standard[standard["sigma"].isna()].iloc[0]
    row = table[table["sigma_rel"] == 0.05].iloc[0]
    assert row["residual_rel_l2"] < 1e-9
    assert row["loss"] == pytest.approx(total["loss"], rel=1e-5)
    assert row["stderr"] == pytest.approx(total["loss_stderr"], rel=1e-4)
    assert table["loss"].nunique() == len(grid)  # every σ_rel is another average of the weights
    figure = tmp_path / "ema_sweep.png"
    assert ema_sweep.main(["collect", "--sweeps", str(out), "--out", str(tmp_path / "ema_sweep.csv"),
                           "--figure", str(figure)]) == 0
    assert figure.stat().st_size > 0 and len(pd.read_csv(tmp_path / "ema_sweep.csv")) == len(grid)


def sweep_arrays(params, loss_of_sigma_rel, grid, k_levels=3, per_level=4, jstar=0.1, half_b_shift=None):
    """Per-triple arrays of one model's sweep whose every triple of σ_rel s has loss loss_of_sigma_rel(s) (plus
    `half_b_shift[s]` on half B), J* = jstar everywhere: totals known in closed form."""
    level = np.repeat(np.arange(1, k_levels + 1), per_level)
    half = np.tile(np.arange(per_level) % 2, k_levels)
    weights = np.array([0.2, 0.5, 0.3])[:k_levels]
    loss = np.stack([np.full(level.size, loss_of_sigma_rel(s)) + (half == 1) * (half_b_shift or {}).get(s, 0.0)
                     for s in grid])
    return {"loss": loss, "optimal_loss": np.full(level.size, jstar), "level": level, "half": half,
            "total_weight": weights, "sigma_rel": np.array(grid), "params": np.int64(params)}


def test_best_length_is_chosen_on_half_a_and_reported_on_half_b():
    from analysis.ema_sweep import exponents_at, half_totals

    grid = [0.05, 0.1, 0.2]
    # half A prefers 0.1 (loss 1.0 against 1.1), half B would prefer 0.2 (1.1 − 0.3): the choice must be A's
    a = sweep_arrays(10, {0.05: 1.2, 0.1: 1.0, 0.2: 1.1}.get, grid, half_b_shift={0.2: -0.3, 0.1: 0.05})
    totals, jstar = half_totals(a)
    np.testing.assert_allclose(totals[:, 0], [1.2, 1.0, 1.1])           # Σ weights = 1 here
    np.testing.assert_allclose(totals[:, 1], [1.2, 1.05, 0.8])
    assert jstar == pytest.approx([0.1, 0.1])
    b = sweep_arrays(100, {0.05: 0.6, 0.1: 0.5, 0.2: 0.55}.get, grid)
    got = exponents_at([a, b], fixed=0)
    assert got[("raw", "best")] == pytest.approx(math.log(0.5 / 1.05) / math.log(10), rel=1e-12)
    assert got[("raw", "fixed")] == pytest.approx(math.log(0.6 / 1.2) / math.log(10), rel=1e-12)
    assert got[("minus_jstar", "best")] == pytest.approx(math.log(0.4 / 0.95) / math.log(10), rel=1e-12)


def test_exponents_at_the_best_and_a_fixed_length_side_by_side():
    """Sizes whose best EMA length grows with size: the fixed length favours the small ones, so the best-length
    exponent is steeper; noise-free triples make every replicate the estimate."""
    from analysis.ema_sweep import exponent_table

    grid = [0.03, 0.05, 0.1, 0.2]
    params = [1e3, 1e4, 1e5]
    best = {1e3: 0.03, 1e4: 0.1, 1e5: 0.2}
    arrays = [sweep_arrays(p, lambda s, p=p: 2.0 * p ** -0.3 * (1 + math.log(s / best[p]) ** 2), grid, jstar=0.01)
              for p in params]
    table = exponent_table(arrays, 0.05, n_replicates=20).set_index(["quantity", "ema"])
    fixed = [2.0 * p ** -0.3 * (1 + math.log(0.05 / best[p]) ** 2) for p in params]
    expected_fixed = np.polyfit(np.log(params), np.log(fixed), 1)[0]
    assert table.loc[("raw", "best"), "exponent"] == pytest.approx(-0.3, rel=1e-9)
    assert table.loc[("raw", "fixed"), "exponent"] == pytest.approx(expected_fixed, rel=1e-9)
    assert table.loc[("raw", "best - fixed"), "exponent"] == pytest.approx(-0.3 - expected_fixed, rel=1e-9)
    assert table.loc[("raw", "best - fixed"), "exponent"] < -0.01
    minus = [v - 0.01 for v in fixed]
    assert table.loc[("minus_jstar", "fixed"), "exponent"] == pytest.approx(np.polyfit(np.log(params),
                                                                                      np.log(minus), 1)[0])
    for _, row in table.iterrows():
        assert row["ci_lo"] == pytest.approx(row["exponent"]) and row["ci_hi"] == pytest.approx(row["exponent"])
    with pytest.raises(ValueError, match="not on the grid"):
        exponent_table(arrays, 0.07, n_replicates=2)


def test_plan_notes_what_the_profiles_cost():
    from study.plan import ema_notes

    cfg = power_cfg((0.05, 0.10, 0.2))  # 256 images, batch 32; snapshots at 128, 256; profiles every 32
    (note,) = ema_notes(cfg, [{"model": "t0", "params": 250_000_000}])
    # 3 profiles × 1 GB; 2 more than the classic EMA's one copy; 8 stored points (32 … 256) × 3 GB
    assert "3 power-EMA profiles, 3.00 GB" in note and "+2.00 GB" in note and "~8 stored points (~24 GB" in note
    classic = load_config({"study": "t", "models": {"t0": {"arch": "t0"}}})
    assert ema_notes(classic, [{"model": "t0", "params": 1}]) == []
