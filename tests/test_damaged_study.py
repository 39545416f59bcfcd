"""The finished smoke study: its tables and figures, what Snakemake reruns on it, its report; and the study probed
as a careless or hostile user would: every truncated, garbled, NaN-carrying, missing or crafted intermediate fails
with one line naming the file and the command that rebuilds it, or the study recovers to byte-identical tables; no
pickled payload runs.

Every test of the finished study is in this module, so the one test worker that runs them runs the study once
(tests/conftest.py smoke_study). Each probe damages its own copy of it (study_copy). Most call the reader a job would
call, in this process (fast); a few run `snakemake` end to end (slow)."""

import json
import os
import shlex
import subprocess

import numpy as np
import pandas as pd
import pytest
import torch
from test_workflow import (
    CONFIGS,
    REPO,
    SNAKEMAKE,
    job_counts,
    kill_when_written,
    load_cfg,
    marks_of,
    run_module,
    smk,
    write_cfg,
)

pytestmark = pytest.mark.slow  # every probe needs the finished smoke study

STUDY = "results/smoke"
SMOKE = str(CONFIGS / "smoke.yaml")
TABLES = ("analysis/losses.csv", "analysis/invariant.csv", "analysis/per_triple.npz", "analysis/exponents.csv",
          "analysis/verdict.csv", "analysis/compute_optimal.csv")


def tables(directory) -> dict:
    return {t: (directory / STUDY / t).read_bytes() for t in TABLES}


def run(*cmd, timeout=900):
    p = subprocess.run([str(c) for c in cmd], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout + p.stderr


def one_error(out: str, path) -> str:
    """The output holds exactly one `error:` line, it names `path` and no traceback came with it."""
    lines = [ln for ln in out.splitlines() if "error:" in ln]
    assert len(lines) == 1 and "Traceback" not in out, out[-3000:]
    assert str(path) in lines[0], lines[0]
    return lines[0]


def rebuild_command(line: str) -> list[str]:
    assert "rebuild it with:" in line, line
    cmd = shlex.split(line.split("rebuild it with:", 1)[1])
    assert cmd[0] == "snakemake" and "--forcerun" in cmd, cmd
    return cmd


def writable(path):
    os.chmod(path, 0o644)  # published files are read-only
    return path


def collect(r):
    """`analysis.evaluate collect` as the collect_losses job runs it, into a scratch folder."""
    evals = sorted(str(p) for p in (r / "eval").glob("*/*.csv"))
    return run_module("analysis.evaluate", "collect", "--eval", *evals,
               "--jstar", r / "optimal_loss" / "jstar.csv", "--out", r / "scratch-losses.csv",
               "--invariant", r / "scratch-invariant.csv", "--per-triple", r / "scratch-per-triple.npz")


def restamp(path):
    """Make the sidecar agree with the file as it is now (as if the file had been written that way): the reader's
    own validation must then catch what the checksum no longer can."""
    from study import integrity

    rebuild = integrity.read_record(path).get("rebuild")
    integrity.stamp(path, rebuild=rebuild)


# ---------------------------------------------------------------------------------------------------------------
# evaluation CSVs, jstar.csv (the reader the collect_losses job calls)
# ---------------------------------------------------------------------------------------------------------------

def test_truncated_eval_csv_is_named_with_its_rebuild_command(study_copy):
    r = study_copy / STUDY
    csv = r / "eval" / "t1" / "000000384.csv"
    data = csv.read_bytes()
    writable(csv).write_bytes(data[: len(data) * 2 // 3])
    rc, out = collect(r)
    assert rc == 2
    cmd = rebuild_command(one_error(out, csv))
    assert cmd[-1] == "evaluate_t1" and str(study_copy) in cmd  # the job that evaluates t1's snapshots
    # truncated at a row boundary and re-stamped: the missing total row is seen without the checksum
    writable(csv).write_text("".join(data.decode().splitlines(keepends=True)[:-2]))
    restamp(csv)
    rc, out = collect(r)
    assert rc == 2 and "total row" in one_error(out, csv)


@pytest.mark.parametrize("column", ["loss", "gap_stderr"])
def test_nan_in_an_eval_csv_never_reaches_losses(study_copy, column):
    r = study_copy / STUDY
    csv = r / "eval" / "t0" / "000001024.csv"
    df = pd.read_csv(csv)
    df.loc[df.index[-1] if column == "loss" else 2, column] = np.nan  # the total's L, or one σ's s.e.
    df.to_csv(writable(csv), index=False)
    rc, out = collect(r)
    assert rc == 2 and "the file is corrupt" in one_error(out, csv)
    restamp(csv)
    rc, out = collect(r)
    assert rc == 2 and f"non-finite {column}" in one_error(out, csv)
    assert not (r / "scratch-losses.csv").exists()


@pytest.mark.parametrize("damage", ["delete a row", "NaN"])
def test_damaged_jstar_is_named(study_copy, damage):
    r = study_copy / STUDY
    jstar = r / "optimal_loss" / "jstar.csv"
    df = pd.read_csv(jstar)
    if damage == "delete a row":
        df = df.drop(index=6)  # σ = 2.34, inside the evaluation grid
    else:
        df.loc[6, "optimal_loss"] = np.nan
    df.to_csv(writable(jstar), index=False)
    rc, out = collect(r)
    assert rc == 2
    assert rebuild_command(one_error(out, jstar))[-1] == "jstar"
    restamp(jstar)
    rc, out = collect(r)
    assert rc == 2
    assert ("not geometric" if damage == "delete a row" else "non-finite optimal_loss") in one_error(out, jstar)


def test_nan_jstar_on_the_grid_fails_the_invariant_loudly(smoke_study, capsys):
    from analysis import collect_losses as ev

    losses = pd.read_csv(smoke_study / STUDY / "analysis" / "losses.csv")
    assert ev.check_invariant(losses)["invariant_ok"].all()
    per = losses["sigma"].notna()
    damaged = losses.copy()
    damaged.loc[per & (damaged["sigma"] > 1) & (damaged["sigma"] < 3), "jstar_grid"] = np.nan
    damaged["jstar_covered"] = True  # inside the J* grid: its NaN is a damaged value, not "outside the grid"
    checked = ev.check_invariant(damaged)
    hit = per & damaged["jstar_grid"].isna()
    assert hit.sum() == 6 and (~checked.loc[hit, "invariant_ok"]).all() and checked.loc[~hit, "invariant_ok"].all()
    assert checked.loc[hit, "invariant_z"].isna().all()
    assert ev.warn_invariant(checked[per]) == 6
    assert "not finite" in capsys.readouterr().err
    # outside the grid (no J* to compare with) only the paired check applies
    outside = damaged.assign(jstar_covered=False)
    assert ev.check_invariant(outside)["invariant_ok"].all()


def test_damaged_per_triple_file_is_named(study_copy):
    r = study_copy / STUDY
    npz = r / "eval" / "t2" / "000000384.npz"
    with np.load(npz) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["loss"][7] = np.nan
    with open(writable(npz), "wb") as f:
        np.savez(f, **arrays)
    rc, out = collect(r)
    assert rc == 2 and "--forcerun" in one_error(out, npz)
    restamp(npz)
    rc, out = collect(r)
    assert rc == 2 and "non-finite loss" in one_error(out, npz)


def test_damaged_losses_table_never_reaches_a_fit(study_copy):
    r = study_copy / STUDY
    losses = r / "analysis" / "losses.csv"
    df = pd.read_csv(losses).drop(index=3)  # one σ of one snapshot
    df.to_csv(writable(losses), index=False)
    scaling = ["analysis.scaling", "--losses", losses, "--per-triple",
               r / "analysis" / "per_triple.npz", "--out-dir", r / "scratch", "--n-replicates", "10"]
    rc, out = run_module(*scaling)
    assert rc == 2 and rebuild_command(one_error(out, losses))[-1] == "collect_losses"
    restamp(losses)
    rc, out = run_module(*scaling)
    assert rc == 2 and "one σ grid" in one_error(out, losses)
    assert not (r / "scratch" / "exponents.csv").exists()


def test_edited_losses_table_disagrees_with_the_per_triple_file(study_copy):
    """losses.csv edited, its sidecar made to match: the statistics stop where they start, naming both files."""
    r = study_copy / STUDY
    losses, per_triple = r / "analysis" / "losses.csv", r / "analysis" / "per_triple.npz"
    df = pd.read_csv(losses)
    row = df.index[df["sigma"].notna()][2]
    df.loc[row, "loss"] *= 0.9
    df.to_csv(writable(losses), index=False)
    restamp(losses)
    rc, out = run_module("analysis.scaling", "--losses", losses, "--per-triple", per_triple,
                         "--out-dir", r / "scratch", "--n-replicates", "10")
    line = one_error(out, losses)
    assert rc == 2 and f"{losses} and {per_triple} disagree (loss of {df.loc[row, 'model']}@" in line
    assert rebuild_command(line)[-1] == "collect_losses"
    assert not (r / "scratch" / "exponents.csv").exists()


def test_damaged_eval_set_and_denoised_are_named(study_copy):
    r = study_copy / STUDY
    snapshot = r / "snapshots" / "t0" / "snapshot-000000384.pt"
    evaluate = ["analysis.evaluate", "snapshot", "--snapshot", snapshot,
                "--dataset", r / "data" / "dataset.npz", "--eval-set", r / "data" / "eval_set.npz",
                "--denoised", r / "optimal_loss" / "eval_denoised.npy", "--out", r / "scratch.csv"]
    denoised = r / "optimal_loss" / "eval_denoised.npy"
    d = np.load(denoised)
    d[5, 3] = np.inf
    with open(writable(denoised), "wb") as f:
        np.save(f, d)
    rc, out = run_module(*evaluate)
    assert rc == 2 and rebuild_command(one_error(out, denoised))[-1] == "optimal_denoiser"
    restamp(denoised)
    rc, out = run_module(*evaluate)
    assert rc == 2 and "non-finite D* at triple 5" in one_error(out, denoised)
    eval_set = r / "data" / "eval_set.npz"
    writable(eval_set).write_bytes(eval_set.read_bytes()[:-100])
    rc, out = run_module(*evaluate)
    assert rc == 2 and rebuild_command(one_error(out, eval_set))[-1] == "eval_set"


# ---------------------------------------------------------------------------------------------------------------
# state.pt and crafted torch files (the trainer, the run-folder check, the snapshot reader)
# ---------------------------------------------------------------------------------------------------------------

def resume(r, model="t0"):
    """The trainer resuming the model's run folder (done.json removed), as a --forcerun train job runs it."""
    (r / "runs" / model / "done.json").unlink(missing_ok=True)
    return run_module("training.train", "--config", r / "configs" / f"{model}.yaml", "--model", model,
               "--data", r / "data" / "dataset.npz", "--out", r / "runs" / model, "--no-progress")


@pytest.mark.parametrize("damage", ["garble 64 bytes", "truncate"])
def test_damaged_state_is_named_and_the_run_folder_check_flags_it(study_copy, damage):
    r = study_copy / STUDY
    state = r / "runs" / "t0" / "state.pt"
    data = bytearray(state.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        at = len(data) // 2  # inside the tensors' data: the file still loads, its weights are wrong
        data[at:at + 64] = bytes(255 - b for b in data[at:at + 64])
    state.write_bytes(bytes(data))
    rc, out = resume(r)
    assert rc == 2
    one_error(out, state)
    rc, out = run_module("training.run_folder", "check-run", r / "runs" / "t0")
    assert rc == 3 and str(state) in out  # the train rule then starts the model afresh (the same weights)


def test_truncated_state_without_checksum_is_named(study_copy):
    r = study_copy / STUDY
    state = r / "runs" / "t0" / "state.pt"
    (r / "runs" / "t0" / "state.pt.sha256").unlink(missing_ok=True)
    state.write_bytes(state.read_bytes()[:-1000])
    rc, out = resume(r)
    assert rc == 2 and "not a readable torch file" in one_error(out, state)


def _plant_payload(path, key, payload, marker):
    """Rewrite a study's torch file with `payload(marker)` under `key` and its sidecar to match (an attacker who
    rewrites both)."""
    from study import integrity

    saved = torch.load(path, weights_only=True)
    rebuild = (integrity.read_record(path) or {}).get("rebuild")
    writable(path)
    torch.save({**saved, key: payload(marker)}, path)
    integrity.stamp(path, rebuild=rebuild)


def test_crafted_state_is_refused_without_running(study_copy, payload):
    r = study_copy / STUDY
    state = r / "runs" / "t0" / "state.pt"
    marker = study_copy / "payload-ran"
    _plant_payload(state, "tracker", payload, marker)
    rc, out = resume(r)
    assert rc == 2 and "refused" in one_error(out, state)
    rc, out = run_module("training.run_folder", "check-run", r / "runs" / "t0")
    assert rc == 2 and "refused" in one_error(out, state)  # not "corrupt": the train rule stops, it does not retrain
    assert not marker.exists()


def test_crafted_snapshot_is_refused_by_every_reader(study_copy, payload):
    from models.denoiser import Denoiser
    from study.integrity import UnsafeFileError

    r = study_copy / STUDY
    snap = r / "snapshots" / "t1" / "snapshot-000001024.pt"
    marker = study_copy / "payload-ran"
    _plant_payload(snap, "model", payload, marker)
    with pytest.raises(UnsafeFileError, match="posix.system"):
        Denoiser.from_snapshot(snap)
    for cli in (["analysis.evaluate", "snapshot", "--snapshot", snap, "--dataset", r / "data" / "dataset.npz",
                 "--eval-set", r / "data" / "eval_set.npz", "--denoised", r / "optimal_loss" / "eval_denoised.npy",
                 "--out", r / "scratch.csv"],
                ["models.sampler", "--snapshot", snap, "--num", "2", "--out", r / "scratch.npz"]):
        rc, out = run_module(*cli)
        assert rc != 0 and "refused" in out and str(snap) in out, out[-2000:]
        assert "delete it and rebuild it with:" in out and "--forcerun train_t1" in out  # its sidecar's command
    assert not marker.exists()


def test_legacy_state_with_numpy_rng_is_read(study_copy):
    """A state.pt as the trainer wrote it before its RNG state was stored as plain data (numpy's tuple): read
    safely (numpy arrays of plain dtype are data), and the resumed run finishes."""
    from training import run_folder

    out = study_copy / STUDY / "runs" / "t0"
    state = torch.load(out / "state.pt", weights_only=True)
    for rng in state["rng"]:
        rng["numpy"] = run_folder._numpy_state(rng["numpy"])  # the tuple with its uint32 array
    torch.save({**state, "version": 2}, out / "state.pt")
    (out / "state.pt.sha256").unlink()
    loaded = run_folder.load_state(out)
    assert isinstance(loaded["rng"][0]["numpy"][1], np.ndarray)
    rc, text = resume(study_copy / STUDY)
    assert rc == 0, text[-2000:]


# ---------------------------------------------------------------------------------------------------------------
# what Snakemake reruns
# ---------------------------------------------------------------------------------------------------------------

def dry_run(directory, *args):
    _, out = smk("-n", "--configfile", SMOKE, *args, directory=directory)
    return job_counts(out), out


def test_deleted_intermediates_are_rebuilt_with_their_dependents(study_copy):
    r = study_copy / STUDY
    (r / "eval" / "t1" / "000000384.csv").unlink()
    os.chmod(r / "snapshots" / "t2" / "snapshot-000001024.pt", 0o644)
    (r / "snapshots" / "t2" / "snapshot-000001024.pt.sha256").unlink()  # a sidecar removed: its file unchecked
    counts, out = dry_run(study_copy)
    assert counts.get("train_t2") == 1 and counts.get("evaluate_t1") == 1, out[-3000:]
    assert counts.get("evaluate_t2") == 1 and "evaluate_t0" not in counts
    assert counts.get("collect_losses") == 1 and counts.get("scaling") == 1 and "train_t0" not in counts


@pytest.mark.parametrize("problem", ["schema", "n_replicates", "yaml"])
def test_bad_config_fails_the_dry_run_naming_everything(tmp_path, problem):
    import yaml

    cfg = yaml.safe_load((CONFIGS / "smoke.yaml").read_text())
    path = tmp_path / "bad.yaml"
    if problem == "schema":
        cfg["training"]["batch_szie"] = 3
        cfg["evaluation"]["num_sigmas"] = "six"
        cfg["optimal_loss"]["estimatr"] = "full"
        expected = ["training.batch_szie: unknown key", "evaluation.num_sigmas: 'six' is not of type 'integer'",
                    "optimal_loss.estimatr: unknown key"]
    elif problem == "n_replicates":
        cfg["scaling"]["n_replicates"] = 0
        expected = ["scaling.n_replicates: 0 is less than the minimum of 200", "95% interval"]
    if problem == "yaml":
        path.write_text((CONFIGS / "smoke.yaml").read_text().replace("  batch_size: 64", "  batch_size: [64"))
        rc, out = run_module("study.config", path)
        assert rc == 2 and f"{path}:8:" in out and "line 7" in out and "YAML syntax error" in out, out
        return
    path.write_text(yaml.safe_dump(cfg))
    rc, out = smk("-n", "--configfile", path, directory=tmp_path, check=False)
    assert rc != 0 and all(e in out for e in expected), out[-3000:]
    assert not (tmp_path / "results").exists()


# ---------------------------------------------------------------------------------------------------------------
# end to end: what `snakemake` does with them
# ---------------------------------------------------------------------------------------------------------------

def test_truncated_eval_csv_stops_snakemake_and_its_command_reruns_what_read_it(study_copy):
    """Truncated in place, the CSV is newer than losses.csv: `snakemake` reruns collect_losses, which stops on it.
    Its rebuild command reruns its evaluation and everything downstream (the identical tables after such a rerun:
    test_killed_forcerun_and_garbled_files_recover_identically)."""
    csv = study_copy / STUDY / "eval" / "t1" / "000000384.csv"
    writable(csv).write_bytes(csv.read_bytes()[:-200])
    rc, out = smk("--configfile", SMOKE, "--cores", "2", directory=study_copy, check=False)
    assert rc != 0 and f"error: {csv.relative_to(study_copy)}:" in out and "rebuild it with:" in out, out[-3000:]
    assert not (study_copy / STUDY / "analysis" / "losses.csv").exists()  # no table stays computed from it
    line = next(ln for ln in out.splitlines() if "rebuild it with:" in ln)
    rc, plan = run(*SNAKEMAKE, *rebuild_command(line)[1:], "-n")
    assert rc == 0 and job_counts(plan) == {"evaluate_t1": 1, "collect_losses": 1, "scaling": 1, "figures": 1,
                                            "benchmarks": 1, "all": 1}, plan[-3000:]


def test_crafted_files_stop_snakemake_and_never_run(study_copy, payload):
    r = study_copy / STUDY
    marker = study_copy / "payload-ran"
    snap = r / "snapshots" / "t1" / "snapshot-000000384.pt"
    _plant_payload(snap, "arch", payload, marker)
    rc, out = smk("--configfile", SMOKE, "--cores", "2", directory=study_copy, check=False)
    assert rc != 0 and f"error: {snap.relative_to(study_copy)}: refused" in out, out[-3000:]
    state = r / "runs" / "t0" / "state.pt"
    _plant_payload(state, "rng", payload, marker)
    rc, out = smk("--configfile", SMOKE, "--cores", "2", "--forcerun", "train_t0", directory=study_copy, check=False)
    assert rc != 0 and f"error: {state.relative_to(study_copy)}: refused" in out, out[-3000:]
    rc, out = smk("--configfile", SMOKE, "--cores", "2", directory=study_copy, check=False)  # t0's outputs are gone
    assert rc != 0 and f"error: {state.relative_to(study_copy)}: refused" in out, out[-3000:]
    assert not marker.exists()


def test_killed_forcerun_and_garbled_files_recover_identically(study_copy):
    """A `--forcerun train_t0` killed after Snakemake deleted t0's published snapshots, on a study whose t0 state.pt
    has 64 garbled bytes; then a t1 published snapshot garbled with its checksum removed: the next `snakemake`
    retrains t0 (its state fails its checksum: afresh, the same weights), republishes t1, re-evaluates both and
    ends with the first run's tables."""
    r = study_copy / STUDY
    before = tables(study_copy)
    state = r / "runs" / "t0" / "state.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2:len(data) // 2 + 64] = bytes(64)
    state.write_bytes(bytes(data))
    cmd = SNAKEMAKE + ["--directory", str(study_copy), "--configfile", SMOKE, "--cores", "1",
                       "--forcerun", "train_t0"]
    (r / "logs" / "train_t0.log").unlink()
    kill_when_written(cmd, r / "logs" / "train_t0.log", timeout=1200, settle=0)  # the job has started
    assert not (r / "snapshots" / "t0" / "snapshot-000001024.pt").exists()
    smk("--unlock", "--configfile", SMOKE, directory=study_copy)
    snap = r / "snapshots" / "t1" / "snapshot-000000384.pt"
    data = bytearray(snap.read_bytes())
    data[len(data) // 2:len(data) // 2 + 64] = bytes(64)
    writable(snap).write_bytes(bytes(data))
    (r / "snapshots" / "t1" / "snapshot-000000384.pt.sha256").unlink()
    counts, _ = dry_run(study_copy)
    assert {"train_t0", "train_t1", "collect_losses"} <= set(counts), counts
    smk("--configfile", SMOKE, "--cores", "2", directory=study_copy, timeout=1800)
    assert "starting afresh" in (r / "logs" / "train_t0.log").read_text()
    assert tables(study_copy) == before
    counts, out = dry_run(study_copy)
    assert "Nothing to be done" in out
    json.loads((r / "runs" / "t0" / "done.json").read_text())


# ---------------------------------------------------------------------------------------------------------------
# the finished study: its tables and figures, what Snakemake reruns, its report, rebuilt files
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smoke_study_end_to_end(smoke_study):
    cfg = load_cfg("smoke")
    r = smoke_study / "results" / "smoke"
    losses = pd.read_csv(r / "analysis" / "losses.csv")
    required = ["model", "params", "images_seen", "flops", "sigma", "loss", "loss_stderr", "optimal_loss",
                "optimal_loss_stderr", "excess", "excess_stderr"]
    assert set(required) <= set(losses.columns)
    n_snap = sum(len(marks_of(cfg, m)) for m in cfg["models"])
    assert len(losses) == n_snap * (cfg["evaluation"]["num_sigmas"] + 1)
    assert losses["sigma"].isna().sum() == n_snap  # one weighted total per snapshot
    per = losses[losses["sigma"].notna()]
    assert (per["excess"] >= 0).all() and (per["optimal_loss"] >= 0).all()
    # every snapshot was evaluated on the same triples: one J* per σ
    assert per.groupby("sigma")["optimal_loss"].nunique().max() == 1
    inv = pd.read_csv(r / "analysis" / "invariant.csv")
    assert len(inv) == len(per) and inv["invariant_ok"].all()
    ex = pd.read_csv(r / "analysis" / "exponents.csv")
    assert {"raw", "minus_jstar"} <= set(ex["quantity"])
    assert (r / "analysis" / "exponents.md").read_text().strip()
    # a total interval holds its evaluation-only interval (it adds the models' spread); ρ never passes 1; fits with
    # fewer than 5 points carry no interval and say so
    for table in ("exponents.csv", "verdict.csv", "compute_optimal.csv"):
        t = pd.read_csv(r / "analysis" / table)
        for lo in [c for c in t.columns if c.endswith("_ci_lo") and not c.endswith("_eval_ci_lo")]:
            key = lo[: -len("_ci_lo")]
            has = t[lo].notna() & t[f"{key}_eval_ci_lo"].notna()
            assert ((t.loc[has, lo] <= t.loc[has, f"{key}_eval_ci_lo"] + 1e-12)
                    & (t.loc[has, f"{key}_eval_ci_hi"] <= t.loc[has, f"{key}_ci_hi"] + 1e-12)).all(), (table, key)
    assert (ex["rho_ci_hi"].dropna() <= 1).all()
    assert pd.read_csv(r / "analysis" / "forecast.csv")["note"].str.contains("needs ≥ 4 model sizes").all()
    few = ex[(ex["n"] < 5) & ex["exponent"].notna()]
    assert few["exponent_ci_lo"].isna().all() and few["note"].str.contains("no interval").all()
    verdict = pd.read_csv(r / "analysis" / "verdict.csv")
    assert {"delta_rho", "delta_rho_ci_lo", "delta_rho_ci_hi"} <= set(verdict.columns)
    for name in ("jstar", "loss_per_sigma", "gap_per_sigma", "scaling", "exponents_per_sigma", "residuals",
                 "offset_profile", "compute_optimal", "forecast"):
        assert (r / "figures" / f"{name}.png").stat().st_size > 1000, name


@pytest.mark.slow
def test_finished_study_reruns_nothing(smoke_study):
    _, out = smk("-n", "--configfile", CONFIGS / "smoke.yaml", directory=smoke_study)
    assert "Nothing to be done" in out, out[-3000:]


@pytest.mark.slow
def test_adding_a_model_to_a_finished_study_reruns_only_its_dependents(smoke_study, tmp_path):
    cfg = load_cfg("smoke")
    cfg["models"]["t3"] = {"arch": "t3"}
    _, out = smk("-n", "--configfile", write_cfg(cfg, tmp_path / "plus.yaml"), directory=smoke_study)
    counts = job_counts(out)
    assert counts == {"model_config": 1, "train_t3": 1, "evaluate_t3": 1, "collect_losses": 1,
                      "models_table": 1, "scaling": 1, "figures": 1, "benchmarks": 1, "all": 1}, counts


@pytest.mark.slow
def test_benchmark_files_are_collected_and_never_rerun_a_job(study_copy):
    """Every job of the smoke study wrote its benchmark file and benchmarks.csv has a line per rule that ran.
    Deleting the benchmark files (a study from before them, a cleaned folder) reruns nothing; deleting the table
    reruns only the rule that writes it."""
    import shutil

    r = study_copy / "results" / "smoke"
    table = pd.read_csv(r / "benchmarks.csv").set_index("rule")
    ran = {"dataset", "eval_set", "optimal_loss_estimator", "jstar", "estimators", "optimal_denoiser", "model_config",
           "train_t0", "train_t1", "train_t2", "evaluate_t0", "evaluate_t1", "evaluate_t2", "collect_losses",
           "models_table", "scaling", "figures"}
    assert set(table.index) == ran | {"total"}, table.index
    assert table.loc["train_t1", "jobs"] == 1 and table.loc["train_t1", "wall_s"] > 0
    assert table.loc["total", "jobs"] == len(list((r / "benchmarks").rglob("*.tsv")))
    shutil.rmtree(r / "benchmarks")
    _, out = smk("-n", "--configfile", CONFIGS / "smoke.yaml", directory=study_copy)
    assert "Nothing to be done" in out, out[-3000:]
    (r / "benchmarks.csv").unlink()
    _, out = smk("-n", "--configfile", CONFIGS / "smoke.yaml", directory=study_copy)
    assert job_counts(out) == {"benchmarks": 1, "all": 1}, out[-3000:]


@pytest.mark.slow
def test_report_html(smoke_study):
    smk("--configfile", CONFIGS / "smoke.yaml", "--report", "report.html", directory=smoke_study)
    html = (smoke_study / "report.html").read_text(errors="replace")
    assert len(html) > 10000 and "scaling.png" in html and "gap_per_sigma.png" in html
    assert "benchmarks.csv" in html and "Cost of the study" in html  # the per-rule cost table


def _rebuild_command(out: str, path) -> list[str]:
    """The error names the file and the command that rebuilds it (`snakemake … --forcerun RULE`)."""
    import shlex

    line = next(ln for ln in out.splitlines() if "rebuild it with:" in ln)
    assert str(path) in line, line
    cmd = shlex.split(line.split("rebuild it with:", 1)[1])
    assert cmd[0] == "snakemake" and "--forcerun" in cmd
    return cmd


def _run_from_repo(cmd: list[str], *extra) -> str:
    """A `snakemake …` command line run from the repository, as a user pastes it."""
    p = subprocess.run(SNAKEMAKE + cmd[1:] + list(extra), cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    return p.stdout + p.stderr


def _evaluate_cli(r, snapshot):
    return run_module("analysis.evaluate", "snapshot", "--snapshot", snapshot, "--dataset", r / "data" / "dataset.npz",
                      "--eval-set", r / "data" / "eval_set.npz", "--denoised", r / "optimal_loss" / "eval_denoised.npy",
                      "--out", r / "x.csv")


def _truncate(path):
    data = path.read_bytes()
    os.chmod(path, 0o644)  # published snapshots are read-only
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.slow
def test_truncated_snapshots_and_dataset_named_and_rebuilt_identically(study_copy):
    """Three damaged files, each named with the command that rebuilds it: t1's published snapshot (a copy: the
    run folder's is intact, so its job republishes it without training), a t2 snapshot in the run folder and its
    published copy (no state left to regenerate it: t2 is retrained, identically), the dataset. Each command
    schedules its file's job and everything downstream; the dataset's, run, rebuilds all three and the study ends
    with the same tables, nothing left to do."""
    r = study_copy / "results" / "smoke"
    tables = {t: (r / "analysis" / t).read_bytes() for t in ("losses.csv", "exponents.csv", "verdict.csv")}
    published = r / "snapshots" / "t1" / "snapshot-000001024.pt"
    assert published.stat().st_ino != (r / "runs" / "t1" / "snapshots" / published.name).stat().st_ino
    _truncate(published)
    rc, out = _evaluate_cli(r, published)
    assert rc == 2 and out.count("error:") == 1 and "Traceback" not in out
    downstream = {"collect_losses": 1, "scaling": 1, "figures": 1, "benchmarks": 1, "all": 1}
    plan = _run_from_repo(_rebuild_command(out, published), "-n")
    assert job_counts(plan) == {"train_t1": 1, "evaluate_t1": 1, **downstream}, plan[-3000:]

    in_run = r / "runs" / "t2" / "snapshots" / "snapshot-000000384.pt"
    _truncate(in_run)
    _truncate(r / "snapshots" / "t2" / in_run.name)
    rc, out = _evaluate_cli(r, r / "snapshots" / "t2" / in_run.name)
    assert rc == 2 and out.count("error:") == 1
    plan = job_counts(_run_from_repo(_rebuild_command(out, r / "snapshots" / "t2" / in_run.name), "-n"))
    # (t1's truncated copy, newer than its evaluation, adds evaluate_t1 here by its modification time)
    assert {"train_t2": 1, "evaluate_t2": 1, **downstream}.items() <= plan.items(), plan
    assert "train_t0" not in plan and "train_t1" not in plan and "dataset" not in plan, plan

    dataset = r / "data" / "dataset.npz"
    _truncate(dataset)
    rc, out = _evaluate_cli(r, r / "snapshots" / "t0" / "snapshot-000001024.pt")
    assert rc == 2 and out.count("error:") == 1 and "BadZipFile" not in out
    cmd = _rebuild_command(out, dataset)
    assert cmd[-1] == "dataset"
    _run_from_repo(cmd, "--cores", "2")
    assert "starting afresh" not in (r / "logs" / "train_t1.log").read_text()   # republished, not retrained
    assert "starting afresh" in (r / "logs" / "train_t2.log").read_text()
    assert {t: (r / "analysis" / t).read_bytes() for t in tables} == tables
    _, dry = smk("-n", "--configfile", CONFIGS / "smoke.yaml", directory=study_copy)
    assert "Nothing to be done" in dry
