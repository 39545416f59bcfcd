"""study/config.py: validation errors name the key; defaults; per-model merge; snapshot marks."""

import math
from pathlib import Path

import pytest
import yaml

from study.config import ConfigError, load_config
from study.spec import model_training, model_variant, seed_sizes, snapshot_marks, total_images


def base(**extra):
    cfg = {"study": "t", "models": {"t0": {"arch": "t0"}, "t1": {"arch": "t1"}}}
    cfg.update(extra)
    return cfg


def test_defaults_filled_and_input_not_mutated():
    raw = base(training={"batch_size": 64})
    cfg = load_config(raw)
    assert raw["training"] == {"batch_size": 64}  # caller's dict untouched
    tr = cfg["training"]
    assert tr["batch_size"] == 64 and tr["total_images"] == 400000 and tr["lr"] == 0.01
    assert tr["schedule"] == {"name": "baseline"}
    assert cfg["variant"]["name"] == "edm" and cfg["dataset"]["spec"] == "digits"
    assert cfg["dataset"]["conditional"] is False


def test_load_from_yaml_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(base(training={"total_images": 1000})))
    assert load_config(path)["training"]["total_images"] == 1000


@pytest.mark.parametrize("cfg, message", [
    (base(training={"batch_szie": 3}), "training.batch_szie: unknown key"),
    (base(traning={}), "traning: unknown key"),
    (base(models={"t0": {"arch": "t0", "training": {"lrr": 1}}}), "models.t0.training.lrr: unknown key"),
    (base(training={"snapshots": {"cnt": 3}}), "training.snapshots.cnt: unknown key"),
    (base(training={"lr": "fast"}), "training.lr:"),
    (base(training={"batch_size": 0}), "training.batch_size:"),
    (base(models={"t0": {}}), "models.t0.arch: required key missing"),
    (base(training={"schedule": {"name": "cosine"}}), "training.schedule.name:"),
    (base(variant={"name": "edm", "kwrgs": {}}), "variant.kwrgs: unknown key"),
])
def test_errors_name_the_key(cfg, message):
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    assert message in str(info.value)
    assert str(info.value).count("\n") == 0  # one line


def test_model_training_merges_overrides():
    cfg = load_config(base(training={"lr": 0.02, "snapshots": {"count": 3, "spacing": "geometric",
                                                                "first_images": 1000}},
                           models={"t0": {"arch": "t0", "training": {"batch_size": 32,
                                                                     "snapshots": {"count": 5}}},
                                   "t1": {"arch": "t1", "training": {"snapshots": {"images": [100, 200]}}}}))
    t0 = model_training(cfg, "t0")
    assert t0["batch_size"] == 32 and t0["lr"] == 0.02
    assert t0["snapshots"] == {"count": 5, "spacing": "geometric", "first_images": 1000}  # deep merge
    t1 = model_training(cfg, "t1")
    assert t1["snapshots"] == {"images": [100, 200]}  # explicit marks replace the study's spec
    assert cfg["training"]["batch_size"] == 128  # the study's section is not modified
    with pytest.raises(ConfigError, match="models.t9: unknown model"):
        model_training(cfg, "t9")


def test_model_variant_is_the_entrys_own_else_the_studys():
    own = {"name": "vp-eps", "kwargs": {}}
    cfg = load_config(base(models={"t0": {"arch": "t0", "variant": own}, "t1": {"arch": "t1"}}))
    assert model_variant(cfg, "t0") == own
    assert model_variant(cfg, "t1") == cfg["variant"] and cfg["variant"]["name"] == "edm"
    with pytest.raises(ConfigError, match="models.t9: unknown model"):
        model_variant(cfg, "t9")


def test_geometric_marks():
    tr = {"total_images": 640000, "batch_size": 128,
          "snapshots": {"count": 5, "spacing": "geometric", "first_images": 40000}}
    marks = snapshot_marks(tr)
    assert len(marks) == 5 and marks[-1] == 640000
    assert all(m % 128 == 0 for m in marks)
    # exact geometric marks are 40000·2^i; rounding to whole batches moves each by < one batch
    for i, m in enumerate(marks):
        assert abs(m - 40000 * 2 ** i) <= 64
    ratios = [b / a for a, b in zip(marks, marks[1:])]
    assert max(ratios) / min(ratios) < 1.01


def test_linear_explicit_and_single_marks():
    tr = {"total_images": 1000, "batch_size": 100, "snapshots": {"count": 4, "spacing": "linear"}}
    assert snapshot_marks(tr) == [300, 500, 800, 1000]  # 250, 500, 750 rounded to whole batches (half up)
    tr = {"total_images": 1000, "batch_size": 100, "snapshots": {"images": [450, 120, 5000]}}
    assert snapshot_marks(tr) == [100, 500, 1000]  # rounded, clipped to the length, which is always a mark
    tr = {"total_images": 1050, "batch_size": 100, "snapshots": {"count": 1}}
    assert total_images(tr) == 1100 and snapshot_marks(tr) == [1100]
    with pytest.raises(ConfigError, match="training.snapshots.first_images"):
        snapshot_marks({"total_images": 1000, "batch_size": 10,
                        "snapshots": {"count": 3, "spacing": "geometric", "first_images": 5000}})


def test_geometric_default_first_halves():
    tr = {"total_images": 8 * 64, "batch_size": 64, "snapshots": {"count": 4, "spacing": "geometric"}}
    assert snapshot_marks(tr) == [64, 128, 256, 512]
    assert math.isclose(snapshot_marks(tr)[-1] / snapshot_marks(tr)[0], 2 ** 3)


# EDM2's presets (NVlabs/edm2 train_edm2.py): duration in images, lr, lr decay reference in batches, dropout,
# P_mean/P_std; batch 2048 and a 10M-image lr ramp-up (training_loop.learning_rate_schedule) for all of them.
EDM2_PRESETS = {
    "paper-img64": dict(decay=35000, P=(-0.8, 1.6), sizes={
        "xs": (1024 << 20, 0.0120, 0.00), "s": (1024 << 20, 0.0100, 0.00), "m": (2048 << 20, 0.0090, 0.10),
        "l": (1024 << 20, 0.0080, 0.10), "xl": (640 << 20, 0.0070, 0.10)}),
    "paper-img512": dict(decay=70000, P=(-0.4, 1.0), sizes={
        "xs": (2048 << 20, 0.0120, 0.00), "s": (2048 << 20, 0.0100, 0.00), "m": (2048 << 20, 0.0090, 0.10),
        "l": (1792 << 20, 0.0080, 0.10), "xl": (1280 << 20, 0.0070, 0.10), "xxl": (896 << 20, 0.0065, 0.10)}),
}


@pytest.mark.parametrize("study", sorted(EDM2_PRESETS))
def test_paper_configs_carry_edm2_numbers(study):
    from pathlib import Path

    from study.spec import micro_batch

    cfg = load_config(Path(__file__).resolve().parent.parent / "workflow" / "config" / f"{study}.yaml")
    preset = EDM2_PRESETS[study]
    assert (cfg["variant"]["kwargs"]["P_mean"], cfg["variant"]["kwargs"]["P_std"]) == preset["P"]
    for name in cfg["models"]:
        tr = model_training(cfg, name)
        assert tr["batch_size"] == 2048 and tr["lr_rampup_images"] == 10_000_000 and tr["grad_clip"] is None
        assert tr["lr_decay_images"] == preset["decay"] * 2048
        assert tr["ema"]["kind"] == "power" and tr["ema"]["sigma_rel"] == [0.05, 0.10]   # EDM2's two profiles
        # EDM2 has no img64 xxl preset: the config takes its img512 xxl lr/dropout and the img64 xl length
        duration, lr, dropout = preset["sizes"].get(name) or (640 << 20, 0.0065, 0.10)
        assert (tr["total_images"], tr["lr"], tr["dropout"]) == (duration, lr, dropout), name
        marks = snapshot_marks(tr)
        assert len(marks) == 8 and marks[0] == 1 << 24 and marks[-1] == duration
        batch_gpu, rounds = micro_batch(tr, tr["launch"]["num_processes"])
        assert batch_gpu == tr["batch_gpu"] and batch_gpu * rounds * tr["launch"]["num_processes"] == 2048


@pytest.mark.parametrize("study, own", [("paper-img64", ["Pixels:"]), ("paper-img512", ["Fixed latents:", "J*"])])
def test_paper_configs_list_their_differences_from_edm2(study, own):
    """Each paper config carries one comment block naming every deliberate difference from EDM2."""
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "workflow" / "config" / f"{study}.yaml").read_text()
    head = text[:text.index("\nstudy:")]
    assert head.count("What differs from EDM2 on purpose") == 1
    block = head[head.index("What differs from EDM2 on purpose"):]
    for item in ["Precision:", "Non-finite values:", "lr schedule:", "Random draws:", "Engine:", *own]:
        assert item in block, (study, item)
    assert "EMA:" not in block  # EDM2's post-hoc power EMA is no difference any more


def test_seeds_expand_an_entry_into_replicate_runs():
    cfg = load_config(base(training={"seed": 5},
                           models={"t0": {"arch": "t0", "seeds": 3, "training": {"batch_size": 64}},
                                   "t1": {"arch": "t1"}}))
    assert list(cfg["models"]) == ["t0", "t0_s1", "t0_s2", "t1"]
    assert [model_training(cfg, m)["seed"] for m in ("t0", "t0_s1", "t0_s2", "t1")] == [5, 6, 7, 5]
    assert all(model_training(cfg, m)["batch_size"] == 64 for m in ("t0", "t0_s1", "t0_s2"))  # all else shared
    assert cfg["models"]["t0_s2"]["replicate_of"] == "t0" and "seeds" not in cfg["models"]["t0"]
    assert seed_sizes(cfg) == {"t0": "t0", "t0_s1": "t0", "t0_s2": "t0", "t1": "t1"}
    assert load_config(cfg)["models"] == cfg["models"]          # an expanded table expands to itself


@pytest.mark.parametrize("models, message", [
    ({"t0": {"arch": "t0", "seeds": 2}, "t0_s1": {"arch": "t1"}},
     "models.t0.seeds: 2 makes a run named t0_s1, but the model table already has an entry t0_s1"),
    ({"t0": {"arch": "t0"}, "x": {"arch": "t0", "replicate_of": "nope"}}, "models.x.replicate_of: 'nope'"),
    ({"t0": {"arch": "t0", "seeds": 0}}, "models.t0.seeds:"),
])
def test_seed_errors_name_the_entry(models, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("'", ".")):
        load_config(base(models=models))


def test_every_schema_error_is_listed_at_once(tmp_path):
    import yaml

    cfg = yaml.safe_load((Path(__file__).parents[1] / "workflow/config/smoke.yaml").read_text())
    cfg["training"]["batch_szie"] = 3
    cfg["training"]["lr"] = "fast"
    cfg["evaluation"]["samples_per_sigma"] = 1
    cfg["scaling"]["n_replicates"] = 0
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    lines = str(e.value).splitlines()
    assert len(lines) == 4 and all(line.startswith(f"{path}: ") for line in lines)
    for key in ("training.batch_szie: unknown key", "training.lr: 'fast'", "evaluation.samples_per_sigma: 1 is less",
                "scaling.n_replicates: 0 is less than the minimum of 200"):
        assert sum(key in line for line in lines) == 1, (key, lines)


def test_yaml_syntax_error_names_file_line_and_column(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("study: x\ntraining:\n  batch_size: 64\n   lr: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value).startswith(f"{path}:4:") and "YAML syntax error" in str(e.value)
