# A scaling-law study of diffusion models, measured against the dataset's optimal loss J* (issue #4).
#
#   snakemake                                           # the embedded default study, on the CPU (profile default)
#   snakemake --configfile workflow/config/smoke.yaml   # another study (replaces the default config entirely)
#   snakemake --report report.html                      # figures + captions as one HTML file
#
# DAG: dataset → eval set → J* and D*(eval set) → one training job per model → one evaluation per snapshot →
# losses.csv (with the L ≥ J* check) → exponents (fits of L and L − J*) → figures / report.
# Paths and formats: docs/internals.md ("Study folders" and "The workflow").
import hashlib
import os
import sys

from snakemake.utils import min_version, validate

min_version("9.0")

BASEDIR = workflow.basedir  # the repository root: configs, schemas and accelerate configs live below it
sys.path.insert(0, BASEDIR)  # the Snakefile imports models.config (no torch) to lay out the DAG
from models.config import ConfigError, load_config, model_training, snapshot_marks  # noqa: E402

# `configfile:` merges into any --configfile given on the command line, which would mix the default study's model
# table into another study's. So the default is read only when no config file was given.
if not workflow.overwrite_configfiles:

    configfile: os.path.join(BASEDIR, "workflow/config/default.yaml")


# Validate: models.config.load_config first (one line naming the bad key, e.g. "training.batch_szie: unknown
# key"), then Snakemake's own validation against the same schema (fills the same defaults).
try:
    _checked = load_config(dict(config))
except ConfigError as err:
    raise WorkflowError(f"invalid study config: {err}")
config.clear()
config.update(_checked)
validate(config, os.path.join(BASEDIR, "workflow/schemas/config.schema.yaml"))

PYTHON = sys.executable  # the interpreter running Snakemake (the venv's), also for every job
STUDY = config["study"]
R = f"results/{STUDY}"
MODELS = list(config["models"])
TRAINING = {m: model_training(config, m) for m in MODELS}
MARKS = {m: snapshot_marks(TRAINING[m]) for m in MODELS}

wildcard_constraints:
    model="[A-Za-z0-9_]+",
    images="[0-9]+",
    est="[a-z]+",


# every job finds the repository's packages, even under `snakemake --directory elsewhere`
# (the prefix is formatted like a shell command: {BASEDIR} is filled in per job, $ braces are doubled)
shell.prefix("set -euo pipefail; export PYTHONPATH={BASEDIR:q}${{PYTHONPATH:+:$PYTHONPATH}}; ")


def repo_path(path):
    """A config path relative to the repository root (accelerate configs), absolute ones unchanged."""
    return path if os.path.isabs(path) else os.path.join(BASEDIR, path)


def step_resources(step, model=None):
    """Resources of one rule: built-in defaults < config `resources.<step>` < the model's `resources`."""
    r = {"gpus": 0, "cpus": 1, "cpus_per_gpu": 8, "runtime": 60, "mem_mb": 4000}
    r.update(config.get("resources", {}).get(step) or {})
    if model is not None:
        r.update(config["models"][model].get("resources") or {})
    return r


def step_threads(step, model=None):
    r = step_resources(step, model)
    return r["gpus"] * r["cpus_per_gpu"] if r["gpus"] else r["cpus"]


def device_flag(step):
    """--device cuda for GPU steps (the CLIs default to the CPU / autodetect)."""
    return "--device cuda" if step_resources(step)["gpus"] else ""


include: "workflow/rules/data.smk"
include: "workflow/rules/optimal_loss.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/scaling.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/diagnose.smk"  # issue 5: `snakemake diagnose` (diagnosis of the variants)
include: "workflow/rules/schedule.smk"  # issue 5: `snakemake schedule` (optimal-loss schedule study)


report: "workflow/report/workflow.rst"


# trivial steps (write a small file, copy, concatenate) never go to a cluster queue
localrules:
    all,
    model_config,
    jstar,
    estimators,


rule all:
    default_target: True
    input:
        f"{R}/analysis/losses.csv",
        f"{R}/analysis/invariant.csv",
        f"{R}/analysis/exponents.csv",
        f"{R}/analysis/exponents.md",
        FIGURES,
