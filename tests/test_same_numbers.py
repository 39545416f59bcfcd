"""One source for every number: losses.csv (the figures) and per_triple.npz (the statistics) must hold one
evaluation's numbers (analysis.resample.check_same_numbers, called where the statistics start)."""

import numpy as np
import pandas as pd
import pytest

from analysis.resample import check_same_numbers
from study.integrity import IntegrityError

SIGMAS = np.array([0.1, 1.0, 10.0])


@pytest.fixture
def evaluation():
    """A per-triple evaluation of two snapshots and its losses table, the table computed here by hand: per σ the
    mean over that σ's triples, the total the weighted sum of the per-σ means."""
    rng = np.random.default_rng(5)
    level = np.repeat([1, 2, 3], 4)
    opt = rng.uniform(0.0, 0.3, level.size)
    excess = rng.uniform(0.0, 0.1, (2, level.size))
    loss = opt + excess + rng.normal(0, 0.01, (2, level.size))
    weight = np.array([[0.2, 0.5, 0.3], [0.25, 0.5, 0.25]])
    per_triple = {"sigma": SIGMAS, "level": level, "optimal_loss": opt, "loss": loss, "excess": excess,
                  "total_weight": weight, "model": np.array(["t0", "t1"]), "params": np.array([10, 20]),
                  "images_seen": np.array([64, 64]), "flops": np.array([1e9, 2e9])}
    rows = []
    for s, model in enumerate(["t0", "t1"]):
        means = {k: np.array([v[level == lv].mean() for lv in (1, 2, 3)])
                 for k, v in (("loss", loss[s]), ("optimal_loss", opt), ("excess", excess[s]))}
        common = {"model": model, "params": (10, 20)[s], "images_seen": 64, "flops": (1e9, 2e9)[s]}
        rows += [{**common, "sigma": sig, **{k: m[i] for k, m in means.items()}} for i, sig in enumerate(SIGMAS)]
        rows.append({**common, "sigma": np.nan, **{k: float(weight[s] @ m) for k, m in means.items()}})
    return pd.DataFrame(rows), per_triple


def test_one_evaluations_numbers_agree(evaluation):
    losses, per_triple = evaluation
    check_same_numbers(losses, per_triple, "losses.csv", "per_triple.npz")
    check_same_numbers(losses.iloc[::-1].reset_index(drop=True), per_triple, "a", "b")  # row order is free


@pytest.mark.parametrize("edit,named", [
    (lambda df: df.loc[1, "loss"].__add__(1e-4), "loss of t0@64 at σ=1"),
    (lambda df: df.loc[7, "optimal_loss"] * 1.001, "optimal_loss of t1@64 at the total"),
    (lambda df: df.loc[4, "excess"] / 2, "excess of t1@64 at σ=0.1"),
], ids=["loss", "jstar-total", "excess"])
def test_an_edited_table_is_refused_naming_both_files(evaluation, edit, named, tmp_path):
    losses, per_triple = evaluation
    column = named.split()[0]
    row = {"loss": 1, "optimal_loss": 7, "excess": 4}[column]
    losses.loc[row, column] = edit(losses)
    with pytest.raises(IntegrityError) as e:
        check_same_numbers(losses, per_triple, tmp_path / "losses.csv", tmp_path / "per_triple.npz")
    msg = str(e.value)
    assert "\n" not in msg and named in msg
    assert msg.startswith(f"{tmp_path / 'losses.csv'} and {tmp_path / 'per_triple.npz'} disagree")


def test_a_snapshot_in_one_file_only_is_refused(evaluation):
    losses, per_triple = evaluation
    with pytest.raises(IntegrityError, match=r"snapshots \[\('t1', 64\)\] are in one file only"):
        check_same_numbers(losses[losses["model"] == "t0"], per_triple, "losses.csv", "per_triple.npz")
