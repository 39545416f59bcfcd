# Shared by the rule files: the validated config, the checks that fail `snakemake -n` before any job runs, the
# study's layout (R, MODELS, SPECS and the TRAINING / MARKS views of them) and the resource / path helpers more than
# one rule file uses (a helper of one rule file lives in that file). Included first by the Snakefile; imports only
# torch-free modules.
import os
import shlex
import sys

from study.checks import check_study, known_arch_names
from study.config import ConfigError, load_config
from study.spec import resolve_specs
from study.spec import step_resources as study_step_resources
from models.sizes import SIZES


# Validate once: study.config.load_config checks the config against workflow/schemas/config.schema.yaml, fills
# the schema's defaults (jsonschema's validator, as snakemake.utils.validate would) and lists every bad key, one
# line each, e.g. "workflow/config/my.yaml: training.batch_szie: unknown key".
CONFIG_FILES = ", ".join(map(str, workflow.overwrite_configfiles)) or DEFAULT_CONFIG  # named in every error line
try:
    _checked = load_config(dict(config), where=CONFIG_FILES)
except ConfigError as err:
    raise WorkflowError(f"invalid study config:\n{err}")
config.clear()
config.update(_checked)


# Values only a job would trip over (an unknown arch, an inverted σ range, a missing accelerate config, a batch
# that does not split over the processes, a bad dataset spec, ...) fail here, every one of them listed.
try:
    check_study(config, basedir=BASEDIR, arch_names=known_arch_names(), where=CONFIG_FILES)  # models.sizes' table
except ConfigError as err:
    raise WorkflowError(f"invalid study config:\n{err}")

PYTHON = sys.executable  # the interpreter running Snakemake (the venv's), also for every job
STUDY = config["study"]
R = f"results/{STUDY}"
MODELS = list(config["models"])
SPECS = resolve_specs(config)  # model -> study.spec.ModelSpec: merged training, variant, arch, family, marks, total
TRAINING = {m: SPECS[m].training for m in MODELS}
MARKS = {m: list(SPECS[m].marks) for m in MODELS}


def repo_path(path):
    """A config path relative to the repository root (accelerate configs), absolute ones unchanged."""
    return path if os.path.isabs(path) else os.path.join(BASEDIR, path)


def _rebuild_prefix():
    """`snakemake` with this run's --directory and --configfile: the start of the command that remakes a file
    of this study (a checksum sidecar records it, so a corrupted file's error names it). Used in shell commands as a
    global, not a param: another working directory or config path must not rerun finished jobs."""
    parts = ["snakemake"]
    here = os.getcwd()
    if os.path.realpath(here) != os.path.realpath(BASEDIR):
        parts += ["--directory", here]
    base = os.path.realpath(BASEDIR)
    for f in workflow.overwrite_configfiles:
        f = os.path.realpath(f)
        parts += ["--configfile", os.path.relpath(f, base) if os.path.commonpath([f, base]) == base else f]
    return " ".join(shlex.quote(p) for p in parts)


REBUILD = _rebuild_prefix()


def sidecar(path):
    """The checksum sidecar of a study file (study/integrity.py: FILE.sha256, with the command that rebuilds FILE).
    Every rule that writes a file the study reads again declares its sidecar as an output and every rule that reads
    the file declares it as an input, so a missing sidecar reruns the job that writes the file."""
    return f"{path}.sha256"


def sidecars(*paths):
    return [sidecar(p) for p in paths]


def step_resources(step, model=None):
    """Resources of one rule: built-in defaults < config `resources.<step>` < the model's `resources`."""
    return study_step_resources(config, step, model)


def rule_resources(step, model=None, *, gpus=None, keys=("gpu", "cpus_per_gpu", "runtime", "mem_mb")):
    """A rule's Snakemake resources (the SLURM executor plugin's names) from step_resources: `resources:
    **rule_resources("evaluate")`. `gpus` overrides the count (the train rule's processes; 0 for CPU-only steps)."""
    r = step_resources(step, model)
    full = {"gpu": r["gpus"] if gpus is None else gpus, "cpus_per_gpu": r["cpus_per_gpu"], "runtime": r["runtime"],
            "mem_mb": r["mem_mb"]}
    return {k: full[k] for k in keys}


def step_threads(step, model=None):
    r = step_resources(step, model)
    return r["gpus"] * r["cpus_per_gpu"] if r["gpus"] else r["cpus"]


def device_flag(step):
    """--device cuda for GPU steps (the CLIs default to the CPU / autodetect)."""
    return "--device cuda" if step_resources(step)["gpus"] else ""


# the architecture families of the model table (U-Net "edm2", "dit"); several → per-family fits
MODEL_FAMILIES = sorted({SPECS[m].family for m in MODELS})


# ---- snapshots and the final evaluation of each model (train, evaluate, diagnose and schedule rules) ----
def snapshot_path(model, images):
    return f"{R}/snapshots/{model}/snapshot-{int(images):09d}.pt"


def train_cost(model):
    """A proxy of a model's training cost known without building its net: images × width² (× depth for a DiT)."""
    size = SIZES[SPECS[model].arch]
    width = size.get("model_channels") or size.get("hidden_size") or 1
    return SPECS[model].total * width**2 * size.get("depth", 1)


def train_priority(model):
    """A training job's Snakemake priority, its rank by cost: the costliest training starts first, so the longest
    job never starts last with the other cores idle beside it (longest-processing-time first). A model's
    evaluation job has the same rank."""
    return sorted(MODELS, key=lambda m: (train_cost(m), m)).index(model)


# Above every training rank: the quick jobs that trainings and evaluations wait for (model configs, the evaluation
# set, D*, the J* estimators) run first, so no evaluation waits behind a training it does not need.
PREREQUISITE_PRIORITY = len(MODELS)


def final_eval(model):
    """The evaluation CSV of a model's last snapshot."""
    return f"{R}/eval/{model}/{MARKS[model][-1]:09d}.csv"
