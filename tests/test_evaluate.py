"""analysis.evaluate, eval_set and collect_losses: the fixed evaluation set, per-σ losses against D*, weighted totals,
the invariant check."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from analysis import evaluate as ev
from analysis.collect_losses import LOSS_COLUMNS, collect, interp_log_sigma, warn_invariant
from analysis.eval_set import (
    eval_noise,
    load_eval_set,
    make_eval_set,
    npz_num_items,
    save_eval_set,
    sigma_grid,
    trapezoid_log_weights,
    variant_fns,
    weighted_totals,
)
from study.tables import STATS

# ---------------------------------------------------------------------------------------------------------------
# the evaluation set
# ---------------------------------------------------------------------------------------------------------------

def test_eval_set_is_deterministic_and_well_formed():
    sigmas = sigma_grid(5, 0.01, 10.0)
    a = make_eval_set(100, sigmas, 20, seed=3)
    b = make_eval_set(100, sigmas, 20, seed=3)
    c = make_eval_set(100, sigmas, 20, seed=4)
    for k in ("index", "sigma", "noise_seed"):
        np.testing.assert_array_equal(a[k], b[k])
        assert len(a[k]) == 100
    assert not np.array_equal(a["index"], c["index"])
    assert a["index"].dtype == np.int64 and a["noise_seed"].dtype == np.int64 and a["sigma"].dtype == np.float64
    # samples_per_sigma triples per σ, σ by σ; distinct indices within a σ (20 <= N); one seed per triple
    np.testing.assert_array_equal(a["sigma"], np.repeat(sigmas, 20))
    for s in sigmas:
        idx = a["index"][a["sigma"] == s]
        assert len(np.unique(idx)) == 20 and idx.min() >= 0 and idx.max() < 100
    assert len(np.unique(a["noise_seed"])) == 100


def test_eval_set_more_samples_than_data_and_bad_sigma():
    e = make_eval_set(3, [1.0], 10, seed=0)
    assert e["index"].max() < 3 and len(e["index"]) == 10
    with pytest.raises(ValueError, match="σ"):
        make_eval_set(10, [0.5, -1.0], 4, seed=0)
    with pytest.raises(ValueError, match="samples_per_sigma"):
        make_eval_set(10, [0.5], 0, seed=0)


def test_sigma_grid_geometric():
    g = sigma_grid(4, 0.1, 100.0)
    np.testing.assert_allclose(g, [0.1, 1.0, 10.0, 100.0])
    np.testing.assert_allclose(sigma_grid(1, 0.1, 10.0), [1.0])  # one level: the geometric midpoint
    with pytest.raises(ValueError, match="σ range"):
        sigma_grid(3, 0.0, 1.0)


def test_eval_noise_depends_on_its_own_seed_only():
    seeds = np.array([5, 17, 99])
    batch = eval_noise((2, 3), seeds)
    assert batch.shape == (3, 2, 3) and batch.dtype == torch.float32
    alone = eval_noise((2, 3), [17])[0]
    torch.testing.assert_close(batch[1], alone, rtol=0, atol=0)
    ref = torch.randn((2, 3), generator=torch.Generator().manual_seed(99))
    torch.testing.assert_close(batch[2], ref, rtol=0, atol=0)


def test_save_load_eval_set_and_npz_header(tmp_path):
    e = make_eval_set(50, [0.1, 1.0], 8, seed=1)
    p = save_eval_set(e, tmp_path / "ev.npz")
    back = load_eval_set(p)
    for k in e:
        np.testing.assert_array_equal(back[k], e[k])
    np.savez(tmp_path / "d.npz", x=np.zeros((37, 1, 2, 2), np.float32))
    assert npz_num_items(tmp_path / "d.npz") == 37


# ---------------------------------------------------------------------------------------------------------------
# per-triple errors against oracles
# ---------------------------------------------------------------------------------------------------------------

def _two_point_setup(a=0.7, n_per_sigma=400):
    """Dataset {−a, +a} (1-D as [2,1,1,1]); D*(x) = a·tanh(a·x/σ²) exactly (docs/science.md)."""
    data = torch.tensor([-a, a], dtype=torch.float32).reshape(2, 1, 1, 1)
    sigmas = np.array([0.05, 0.3, 0.7, 2.0, 10.0])
    es = make_eval_set(2, sigmas, n_per_sigma, seed=11)
    # x exactly as the evaluator builds it (float32 x0 + float32 σ·ε), D* of it in float64
    eps = eval_noise((1, 1, 1), es["noise_seed"]).reshape(-1)
    s32 = torch.as_tensor(es["sigma"], dtype=torch.float32)
    x = (data.reshape(-1)[torch.as_tensor(es["index"])] + s32 * eps).double().numpy()
    s64 = s32.double().numpy()
    dstar = a * np.tanh(a * x / s64**2)

    def oracle(xb, s, _labels):
        s = s.to(torch.float64).view(-1, 1, 1, 1)
        return a * torch.tanh(a * xb.to(torch.float64) / s**2)

    return data, es, dstar, oracle


def test_oracle_denoiser_has_zero_excess_and_loss_equal_jstar():
    data, es, dstar, oracle = _two_point_setup()
    err = ev.EvaluationInputs(data, es, dstar[:, None], batch_size=128).errors(oracle)
    assert np.max(err["excess"]) < 1e-20
    np.testing.assert_allclose(err["loss"], err["optimal_loss"], rtol=1e-9, atol=1e-20)
    table = ev.per_sigma_table(err, es["sigma"])
    np.testing.assert_allclose(table["loss"], table["optimal_loss"], rtol=1e-9, atol=1e-20)
    assert np.all(table["excess"] < 1e-20) and np.all(np.abs(table["gap"]) < 1e-10)
    # J* of the two-point set rises from ≈0 at small σ to a² at large σ (independent closed-form limits)
    assert table["optimal_loss"].iloc[0] < 1e-6
    assert abs(table["optimal_loss"].iloc[-1] - 0.7**2) < 0.02
    assert np.all(np.diff(table["optimal_loss"]) > -1e-3)


def test_identity_denoiser_has_loss_sigma_squared():
    data, es, dstar, _ = _two_point_setup()
    err = ev.EvaluationInputs(data, es, dstar[:, None], batch_size=97).errors(lambda x, s, lab: x)
    eps = eval_noise((1, 1, 1), es["noise_seed"]).reshape(-1).double().numpy()
    # exactly (σ·ε)² per triple (float32 rounding of x aside)
    np.testing.assert_allclose(err["loss"], (es["sigma"] * eps) ** 2, rtol=1e-5, atol=1e-9)
    table = ev.per_sigma_table(err, es["sigma"])
    ratio = table["loss"] / table["sigma"] ** 2
    se = table["loss_stderr"] / table["sigma"] ** 2
    assert np.all(np.abs(ratio - 1) < 4 * se)  # E ε² = 1
    # excess = ‖x − D*‖² and gap = L − J* agree in expectation (D* is the conditional mean)
    z = (table["gap"] - table["excess"]) / np.hypot(table["gap_stderr"], table["excess_stderr"])
    assert np.all(np.abs(z) < 4)


def test_shape_mismatch_is_named():
    data, es, dstar, oracle = _two_point_setup(n_per_sigma=4)
    with pytest.raises(ValueError, match="D\\* array has shape"):
        ev.EvaluationInputs(data, es, dstar[:-1, None]).errors(oracle)


# ---------------------------------------------------------------------------------------------------------------
# totals under the training weighting
# ---------------------------------------------------------------------------------------------------------------

def _table(sigmas, values, se):
    t = pd.DataFrame({"sigma": sigmas, "n": 10})
    for k in STATS:
        t[k] = values
        t[f"{k}_stderr"] = se
    return t


def test_weighted_totals_hand_case():
    # grid u = ln σ = 0, 1, 2 → trapezoid q = [½, 1, ½]; p = [1, 1, 2] → a = [½, 1, 1], Σa = 2.5;
    # λ = [1, 2, 1], L = [1, 2, 3] → total = (½·1·1 + 1·2·2 + 1·1·3) / 2.5 = 3.0
    sig = np.exp([0.0, 1.0, 2.0])
    t = _table(sig, [1.0, 2.0, 3.0], [1.0, 1.0, 1.0])
    density = lambda s: np.interp(np.log(s), [0, 1, 2], [1, 1, 2])  # noqa: E731
    weight = lambda s: np.interp(np.log(s), [0, 1, 2], [1, 2, 1])  # noqa: E731
    tot = weighted_totals(t, density, weight)
    assert tot["loss"] == pytest.approx(3.0)
    # c = a·λ/Σa = [0.2, 0.8, 0.4] → s.e. = sqrt(0.04 + 0.64 + 0.16)
    assert tot["loss_stderr"] == pytest.approx(math.sqrt(0.84))
    assert tot["n"] == 30
    np.testing.assert_allclose(trapezoid_log_weights(sig), [0.5, 1.0, 0.5])
    assert trapezoid_log_weights([2.0]).tolist() == [1.0]


def test_weighted_totals_match_the_edm_training_integral():
    """Against an independent float64 quadrature of E[λ(σ)·L(σ) | σ in range] with ln σ ~ N(P_mean, P_std²).

    λ·L is not constant here (a constant would make any density or quadrature agree), the grid is not uniform in
    ln σ, and a density of σ taken for one of ln σ, or a quadrature in σ, must fail."""
    from scipy import integrate, stats

    from models.diffusion import get_variant

    v = get_variant("edm", P_mean=-1.2, P_std=1.2, sigma_data=0.5)
    L = lambda s: 0.3 * s**2 / (s**2 + 0.25) * (1 + 0.5 * np.sin(np.log(s)))  # noqa: E731
    lam = lambda s: (s**2 + 0.25) / (s * 0.5) ** 2  # noqa: E731
    lo, hi = 0.002, 80.0
    pdf = lambda u: stats.norm.pdf(u, -1.2, 1.2)  # noqa: E731
    num = integrate.quad(lambda u: pdf(u) * lam(math.exp(u)) * L(math.exp(u)), math.log(lo), math.log(hi),
                         limit=200)[0]
    den = integrate.quad(pdf, math.log(lo), math.log(hi))[0]
    truth = num / den
    u = math.log(lo) + (math.log(hi) - math.log(lo)) * np.linspace(0, 1, 2000) ** 4  # dense at small σ
    sig = np.exp(u)
    t = _table(sig, L(sig), np.zeros_like(sig))
    density, weight = variant_fns(v)
    assert weighted_totals(t, density, weight)["loss"] == pytest.approx(truth, rel=1e-3)
    # the checks this test exists for: a wrong density or an equal-weight rule is off by far more than 1e-3
    wrong_density = weighted_totals(t, lambda s: density(s) / s, weight)["loss"]
    assert abs(wrong_density / truth - 1) > 0.05
    q_sigma = np.gradient(sig)  # a quadrature in σ instead of ln σ (the density is of ln σ)
    in_sigma = float(np.sum(q_sigma * density(sig) * weight(sig) * L(sig)) / np.sum(q_sigma * density(sig)))
    assert abs(in_sigma / truth - 1) > 0.05


def test_weighted_totals_no_mass_is_an_error():
    t = _table([1.0, 2.0], [1.0, 1.0], [0.1, 0.1])
    with pytest.raises(ValueError, match="no mass"):
        weighted_totals(t, lambda s: np.zeros_like(s), lambda s: np.ones_like(s))


# ---------------------------------------------------------------------------------------------------------------
# collect + invariant
# ---------------------------------------------------------------------------------------------------------------

def _eval_csv(path, model, params, images, gap_at_1=0.1):
    rows = []
    for s, gap in ((0.1, 0.01), (1.0, gap_at_1)):
        rows.append({"model": model, "arch": model, "params": params, "images_seen": images, "flops": 1e9 * images,
                     "sigma": s, "weighting": "none", "n": 64, "loss": 0.2 + gap, "loss_stderr": 0.01,
                     "optimal_loss": 0.2, "optimal_loss_stderr": 0.01, "excess": max(gap, 0), "excess_stderr": 0.001,
                     "gap": gap, "gap_stderr": 0.005})
    rows.append({**rows[-1], "sigma": math.nan, "weighting": "training"})
    pd.DataFrame(rows)[LOSS_COLUMNS].to_csv(path, index=False)
    return path


def test_collect_sorts_and_flags_invariant_violations(tmp_path, capsys):
    a = _eval_csv(tmp_path / "a.csv", "big", 2000, 10)
    b = _eval_csv(tmp_path / "b.csv", "small", 100, 20, gap_at_1=-0.05)  # 10 s.e. below J*: a violation
    c = _eval_csv(tmp_path / "c.csv", "small", 100, 10)
    js = tmp_path / "jstar.csv"
    pd.DataFrame({"sigma": [0.01, 0.1, 1.0, 10.0], "optimal_loss": [0.0, 0.2, 0.2, 0.2], "stderr": 0.0}).to_csv(
        js, index=False)  # a geometric grid, as analysis.optimal_loss writes
    losses, inv = collect([a, b, c], js)
    assert list(losses["model"].unique()) == ["small", "big"]  # ordered by params
    small = losses[losses["model"] == "small"]
    assert list(small["images_seen"]) == [10, 10, 10, 20, 20, 20]
    assert small["sigma"].isna().tolist() == [False, False, True, False, False, True]  # totals last
    assert losses["jstar_grid"].iloc[0] == pytest.approx(0.2)
    bad = inv[~inv["invariant_ok"]]
    assert len(bad) == 1 and bad.iloc[0]["model"] == "small" and bad.iloc[0]["sigma"] == 1.0
    assert warn_invariant(inv) == 1
    assert "INVARIANT VIOLATED" in capsys.readouterr().err
    # the CLI writes both files and says it loudly too
    out, invp = tmp_path / "losses.csv", tmp_path / "inv.csv"
    assert ev.main(["collect", "--eval", str(a), str(b), "--jstar", str(js), "--out", str(out),
                    "--invariant", str(invp)]) == 0
    assert "INVARIANT VIOLATED" in capsys.readouterr().err
    assert (~pd.read_csv(invp)["invariant_ok"]).sum() == 1


def test_interp_log_sigma_no_extrapolation():
    out = interp_log_sigma([0.1, 10.0], [0.0, 2.0], [1.0, 100.0, np.nan])
    assert out[0] == pytest.approx(1.0) and np.isnan(out[1]) and np.isnan(out[2])


def test_make_set_cli(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((40, 1, 8, 8), np.float32))
    out = tmp_path / "ev.npz"
    assert ev.main(["make-set", "--dataset", str(tmp_path / "d.npz"), "--num-sigmas", "3", "--sigma-min", "0.1",
                    "--sigma-max", "10", "--samples-per-sigma", "5", "--seed", "2", "--out", str(out)]) == 0
    e = load_eval_set(out)
    ref = make_eval_set(40, sigma_grid(3, 0.1, 10), 5, 2)
    for k in ref:
        np.testing.assert_array_equal(e[k], ref[k])


def test_load_rows_matches_the_full_loader(tmp_path):
    from training.dataset import Dataset, load_dataset, save_npz

    g = torch.Generator().manual_seed(0)
    x = (torch.randint(0, 256, (30, 1, 4, 4), generator=g).float() / 127.5 - 1)
    save_npz(Dataset(x=x, labels=torch.arange(30) % 3, name="t"), tmp_path / "d.npz")
    es = make_eval_set(30, [0.1, 1.0], 12, seed=5)
    rows, labels, es2 = ev.load_rows(tmp_path / "d.npz", es)
    full = load_dataset(str(tmp_path / "d.npz"))
    torch.testing.assert_close(rows[torch.as_tensor(es2["index"])], full.x[torch.as_tensor(es["index"])],
                               rtol=0, atol=0)
    torch.testing.assert_close(labels[torch.as_tensor(es2["index"])], full.labels[torch.as_tensor(es["index"])])
    np.testing.assert_array_equal(es2["sigma"], es["sigma"])


def test_snapshot_evaluation_reads_only_its_rows_and_matches_the_float32_path(tmp_path, monkeypatch):
    """A compact uint8 dataset gives the same CSV as the old float32 file, row for row and bit for bit, and the job
    reads (and converts) only the rows of its triples."""
    from analysis.optimal_loss import denoise_eval_set
    from study.config import load_config
    from training.dataset import Dataset, DatasetArrays, load_dataset, open_dataset, save_npz
    from training.train import train

    digits = load_dataset("digits")
    u = torch.round((digits.x + 1) * 127.5).clamp(0, 255)          # digits on the uint8 grid
    ds = Dataset(x=(u / 127.5 - 1).to(torch.float32), labels=digits.labels, name="digits-u8")
    compact, wide = save_npz(ds, tmp_path / "u8.npz", compact=True), save_npz(ds, tmp_path / "f32.npz")
    assert open_dataset(compact).dtype == np.uint8 and open_dataset(wide).dtype == np.float32
    cfg = load_config({"study": "t", "models": {"t0": {"arch": "t0"}},
                       "training": {"total_images": 32, "batch_size": 32, "lr_rampup_images": 0,
                                    "lr_decay_images": 0, "ema_halflife_images": 100, "snapshots": {"count": 1},
                                    "log_every_images": 32}})
    train(cfg, "t0", ds, tmp_path / "run", progress=False)
    snap = next((tmp_path / "run" / "snapshots").glob("snapshot-*.pt"))
    es = make_eval_set(1797, sigma_grid(3, 0.05, 5.0), 6, seed=3)
    dstar = denoise_eval_set(ds.x, es)

    # the old path: the whole float32 array, the triples' own indices
    from models.denoiser import Denoiser
    den = Denoiser.from_snapshot(snap, device="cpu")
    old = ev.EvaluationInputs(ds.x, es, dstar).errors(lambda x, s, lab: den(x, s, lab), device="cpu")

    reads = []
    real = DatasetArrays.stored_rows

    def recording(self, idx):
        reads.append(np.array(idx))
        return real(self, idx)

    monkeypatch.setattr(DatasetArrays, "stored_rows", recording)
    monkeypatch.setattr(DatasetArrays, "float32", lambda self: pytest.fail("evaluation converted the whole set"))
    tables = {}
    for name, path in (("u8", compact), ("f32", wide)):
        reads.clear()
        ((tables[name], _),) = ev.evaluate_snapshots([snap], path, es, dstar, device="cpu")
        assert len(reads) == 1 and np.array_equal(reads[0], np.unique(es["index"]))   # its rows, once
    pd.testing.assert_frame_equal(tables["u8"], tables["f32"], check_exact=True)
    table = ev.per_sigma_table(old, es["sigma"])
    per = tables["u8"][tables["u8"]["sigma"].notna()].reset_index(drop=True)
    for k in STATS + tuple(f"{k}_stderr" for k in STATS):
        np.testing.assert_array_equal(per[k].to_numpy(), table[k].to_numpy(), err_msg=k)
    monkeypatch.undo()
    csv_a, csv_b = tmp_path / "a.csv", tmp_path / "b.csv"
    np.save(tmp_path / "dstar.npy", dstar)
    save_eval_set(es, tmp_path / "es.npz")
    for path, out in ((compact, csv_a), (wide, csv_b)):
        assert ev.main(["snapshot", "--snapshot", str(snap), "--dataset", str(path), "--eval-set",
                        str(tmp_path / "es.npz"), "--denoised", str(tmp_path / "dstar.npy"), "--device", "cpu",
                        "--out", str(out)]) == 0
    assert csv_a.read_bytes() == csv_b.read_bytes()


def test_one_call_evaluates_several_snapshots_as_one_call_each(tmp_path, monkeypatch):
    """`snapshot --snapshot A B --out a b` (one job per model) writes byte for byte the files of one call per
    snapshot, reading the data rows once; a count mismatch is refused."""
    from analysis.optimal_loss import denoise_eval_set
    from study.config import load_config
    from training.dataset import DatasetArrays, load_dataset, save_npz
    from training.train import train

    ds = load_dataset("digits")
    data = save_npz(ds, tmp_path / "d.npz")
    cfg = load_config({"study": "t", "models": {"t0": {"arch": "t0"}},
                       "training": {"total_images": 64, "batch_size": 32, "lr_rampup_images": 0,
                                    "lr_decay_images": 0, "ema_halflife_images": 0,
                                    "snapshots": {"images": [32, 64]}, "log_every_images": 32}})
    train(cfg, "t0", ds, tmp_path / "run", progress=False)
    snaps = sorted(str(p) for p in (tmp_path / "run" / "snapshots").glob("snapshot-*.pt"))
    es = make_eval_set(len(ds.x), sigma_grid(3, 0.05, 5.0), 5, seed=3)
    save_eval_set(es, tmp_path / "es.npz")
    np.save(tmp_path / "dstar.npy", denoise_eval_set(ds.x, es))
    common = ["--dataset", str(data), "--eval-set", str(tmp_path / "es.npz"), "--denoised",
              str(tmp_path / "dstar.npy"), "--device", "cpu", "--batch-size", "4", "--per-triple"]
    singles = [tmp_path / f"single{i}.csv" for i in range(2)]
    for snap, out in zip(snaps, singles):
        assert ev.main(["snapshot", "--snapshot", snap, "--out", str(out), *common]) == 0
    reads = []
    real = DatasetArrays.stored_rows
    monkeypatch.setattr(DatasetArrays, "stored_rows", lambda self, idx: reads.append(1) or real(self, idx))
    both = [tmp_path / f"both{i}.csv" for i in range(2)]
    assert ev.main(["snapshot", "--snapshot", *snaps, "--out", *map(str, both), *common]) == 0
    assert len(reads) == 1
    for one, two in zip(singles, both):
        assert one.read_bytes() == two.read_bytes()
        assert one.with_suffix(".npz").read_bytes() == two.with_suffix(".npz").read_bytes()
    assert pd.read_csv(both[0])["images_seen"].iloc[0] == 32 and pd.read_csv(both[1])["images_seen"].iloc[0] == 64
    with pytest.raises(SystemExit):
        ev.main(["snapshot", "--snapshot", *snaps, "--out", str(both[0]), *common])


def test_evaluation_errors_name_the_dataset_file(tmp_path, capsys):
    np.savez(tmp_path / "d.npz", x=np.zeros((5, 1, 2, 2), np.uint8))
    blob = (tmp_path / "d.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(blob[: len(blob) // 2])
    es = make_eval_set(5, [1.0], 2, seed=0)
    for bad in ("cut.npz", "absent.npz"):
        with pytest.raises(FileNotFoundError, match=bad):
            ev.load_rows(tmp_path / bad, es)
        rc = ev.main(["make-set", "--dataset", str(tmp_path / bad), "--num-sigmas", "1", "--out",
                      str(tmp_path / "e.npz")])
        assert rc == 2 and bad in capsys.readouterr().err
    with pytest.raises(ValueError, match="has 5 items"):
        ev.load_rows(tmp_path / "d.npz", make_eval_set(9, [1.0], 9, seed=0))
