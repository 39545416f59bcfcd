"""benchmarks/study_timing.py: the per-rule table of a study's Snakemake benchmark files (fast, synthetic files)."""

import importlib.util
import math
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"


@pytest.fixture(scope="module")
def timing():
    spec = importlib.util.spec_from_file_location("study_timing", REPO / "benchmarks" / "study_timing.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench(study, name, seconds, cpu, rss, end):
    """A benchmark file as Snakemake writes it, modified (written) at `end`."""
    path = study / "benchmarks" / f"{name}.tsv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(HEADER + f"{seconds}\t0:00:00\t{rss}\t0\t0\t0\t0\t0\t50\t{cpu}\n")
    os.utime(path, (end, end))


def test_per_rule_table_and_span(tmp_path, timing):
    study = tmp_path / "results" / "s"
    bench(study, "train_t0", 40.0, 38.5, 400.0, end=1000.0)              # 960 → 1000
    bench(study, "evaluate/t0/000000384", 5.0, 4.0, 300.0, end=1010.0)   # 1005 → 1010
    bench(study, "evaluate/t0/000001024", 7.0, 6.5, 310.0, end=1020.0)
    bench(study, "model_config/t0.in-snakemake", 0.1, 9.0, 129.0, end=950.0)  # 949.9 → 950: the first start
    jobs = timing.read_benchmarks(study)
    assert sorted(jobs["rule"]) == ["evaluate", "evaluate", "model_config", "train_t0"]
    assert set(jobs.loc[jobs["rule"] == "evaluate", "job"]) == {"t0/000000384", "t0/000001024"}
    table = timing.per_rule(jobs).set_index("rule")
    assert list(table.index) == ["train_t0", "evaluate", "model_config", "total"]   # by total wall time
    ev = table.loc["evaluate"]
    assert (ev["jobs"], ev["wall_s"], ev["wall_s_max"], ev["cpu_s"], ev["max_rss_mb"]) == (2, 12.0, 7.0, 10.5, 310)
    # a rule run inside Snakemake's process: its wall time only (the CPU and memory would be Snakemake's)
    assert math.isnan(table.loc["model_config", "cpu_s"]) and math.isnan(table.loc["model_config", "max_rss_mb"])
    total = table.loc["total"]
    assert (total["jobs"], total["wall_s"], total["cpu_s"], total["max_rss_mb"]) == (4, 52.1, 49.0, 400)
    assert timing.span_seconds(jobs) == pytest.approx(1020.0 - 949.9)
    text = timing.format_table(timing.per_rule(jobs), jobs, study)
    assert "first job start → last job end: 70 s" in text and "—" in text


def test_cli_writes_the_table_and_names_a_bad_file(tmp_path, timing, capsys):
    study = tmp_path / "study"
    assert timing.main([str(study)]) == 2 and "no benchmark files" in capsys.readouterr().err
    bench(study, "scaling", 4.0, 3.9, 120.0, end=100.0)
    assert timing.main([str(study), "--csv", str(study / "benchmarks.csv")]) == 0
    assert (study / "benchmarks.csv").read_text().splitlines()[:2] == [
        "rule,jobs,wall_s,wall_s_max,cpu_s,max_rss_mb", "scaling,1,4.0,4.0,3.9,120.0"]
    (study / "benchmarks" / "figures.tsv").write_text("not a benchmark\n")
    assert timing.main([str(study)]) == 2
    assert "figures.tsv: not a Snakemake benchmark file" in capsys.readouterr().err
