# A scaling-law study of diffusion models, measured against the dataset's optimal loss J*.
#
#   snakemake                                           # the embedded default study, on the CPU (profile default)
#   snakemake --configfile workflow/config/smoke.yaml   # another study (replaces the default config entirely)
#   snakemake --report report.html                      # figures + captions as one HTML file
#
# DAG: dataset → eval set → J* and D*(eval set) → one training job per model → one evaluation per snapshot →
# losses.csv (with the L ≥ J* check) → exponents (fits of L and L − J*) → figures / report.
# Paths and formats: docs/internals.md ("The study folder" and "Contracts between jobs").
import os
import sys

from snakemake.utils import min_version

min_version("9.0")

BASEDIR = workflow.basedir  # the repository root: configs, schemas and accelerate configs live below it
sys.path.insert(0, BASEDIR)  # the Snakefile imports study.config (no torch) to lay out the DAG
DEFAULT_CONFIG = os.path.join(BASEDIR, "workflow/config/default.yaml")

# `configfile:` merges into any --configfile given on the command line, which would mix the default study's model
# table into another study's. So the default is read only when no config file was given. Its YAML is read here
# first: Snakemake's own syntax error names neither the file nor the line (a --configfile is parsed by Snakemake
# before this file runs; `python -m study.config FILE` names both).
if not workflow.overwrite_configfiles:
    from study.config import ConfigError, read_yaml

    try:
        read_yaml(DEFAULT_CONFIG)
    except ConfigError as err:
        raise WorkflowError(f"invalid study config:\n{err}")

    configfile: DEFAULT_CONFIG


# validation + DAG-time checks, R / MODELS / TRAINING / MARKS, resource and path helpers
include: "workflow/rules/common.smk"
# benchmark_file(): every rule's benchmark file; rule benchmarks: results/<study>/benchmarks.csv
include: "workflow/rules/benchmarks.smk"


wildcard_constraints:
    model="[A-Za-z0-9_]+",
    images="[0-9]+",
    est="[a-z]+",


# every job finds the repository's packages, even under `snakemake --directory elsewhere`
# (the prefix is formatted like a shell command: {BASEDIR} is filled in per job, $ braces are doubled)
shell.prefix("set -euo pipefail; export PYTHONPATH={BASEDIR:q}${{PYTHONPATH:+:$PYTHONPATH}}; ")


include: "workflow/rules/data.smk"
include: "workflow/rules/optimal_loss.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/scaling.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/ema_sweep.smk"  # loss against the EMA length, where the config has an `ema_sweep`
include: "workflow/rules/diagnose.smk"  # `snakemake diagnose` (diagnosis of the variants)
include: "workflow/rules/schedule.smk"  # `snakemake schedule` (optimal-loss schedule study)
include: "workflow/rules/plan.smk"  # `snakemake plan`: parameters, FLOPs and GPU-hours of every model


report: "workflow/report/workflow.rst"


# trivial steps (write a small file, copy, concatenate) never go to a cluster queue
localrules:
    all,
    model_config,
    models_table,
    jstar,
    estimators,
    plan_table,
    plan,
    benchmarks,


def study_files():
    """Every file the study's jobs write on the way to its tables and figures, with their checksum sidecars.
    Snakemake looks for a missing output only in jobs that run anyway: a deleted intermediate (an evaluation CSV,
    a published snapshot after a failed --forcerun) whose consumers are finished would otherwise be left missing
    ("Nothing to be done"). Listed here, it is rebuilt by the next `snakemake`, and everything downstream of it
    reruns."""
    files = [
        f"{R}/data/dataset.npz",
        f"{R}/data/eval_set.npz",
        f"{R}/optimal_loss/eval_denoised.npy",
        f"{R}/optimal_loss/jstar.csv",
        f"{R}/optimal_loss/estimators.csv",
        *[f"{R}/optimal_loss/estimators/{est}.csv" for est in ESTIMATORS],
        *[snapshot_path(m, k) for m in MODELS for k in MARKS[m]],
        *all_evaluations(),
        *all_triples(),
        f"{R}/analysis/losses.csv",
        f"{R}/analysis/invariant.csv",
        f"{R}/analysis/per_triple.npz",
    ]
    return files + sidecars(*files) + [f"{R}/runs/{m}/done.json" for m in MODELS]


def study_products():
    """Everything the default target makes but the cost table: the intermediates, the tables and the figures."""
    return study_files() + [f"{R}/analysis/exponents.csv", f"{R}/analysis/exponents.md"] + FIGURES + ema_sweep_products()


rule all:
    default_target: True
    input:
        study_products(),
        f"{R}/benchmarks.csv",  # the cost of every rule (benchmarks.smk), collected last
