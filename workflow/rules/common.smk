# Shared by every rule file: the validated config, the checks that fail `snakemake -n` before any job runs, the
# study's layout (R, MODELS, TRAINING, MARKS) and the resource / path helpers. Included first by the Snakefile.
import os
import shlex
import sys

from models.checks import accelerate_distributed_type, check_study, known_arch_names  # noqa: E402
from models.config import ConfigError, load_config, model_training, snapshot_marks  # noqa: E402
from models.config import step_resources as study_step_resources  # noqa: E402


# Validate once: models.config.load_config checks the config against workflow/schemas/config.schema.yaml, fills
# the schema's defaults (jsonschema's validator, as snakemake.utils.validate would) and lists every bad key, one
# line each, e.g. "workflow/config/my.yaml: training.batch_szie: unknown key".
try:
    _checked = load_config(dict(config), where=", ".join(map(str, workflow.overwrite_configfiles)) or DEFAULT_CONFIG)
except ConfigError as err:
    raise WorkflowError(f"invalid study config:\n{err}")
config.clear()
config.update(_checked)


# Values only a job would trip over (an unknown arch, an inverted σ range, a missing accelerate config, a batch
# that does not split over the processes, a bad dataset spec, ...) fail here, every one of them listed.
try:
    check_study(config, basedir=BASEDIR, arch_names=known_arch_names())  # the family's table (imports torch, ~1 s)
except ConfigError as err:
    raise WorkflowError(f"invalid study config:\n{err}")

PYTHON = sys.executable  # the interpreter running Snakemake (the venv's), also for every job
STUDY = config["study"]
R = f"results/{STUDY}"
MODELS = list(config["models"])
TRAINING = {m: model_training(config, m) for m in MODELS}
MARKS = {m: snapshot_marks(TRAINING[m]) for m in MODELS}


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
    """The checksum sidecar of a study file (models/integrity.py: FILE.sha256, with the command that rebuilds FILE).
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


# the architecture families of the model table (models.sizes.FAMILY: U-Net "edm2", "dit"); several → per-family fits
from models.sizes import FAMILY as _FAMILY  # noqa: E402  (no torch)

MODEL_FAMILIES = sorted({_FAMILY.get(config["models"][m]["arch"], config["models"][m]["arch"]) for m in MODELS})


# ---- training jobs (train.smk) ----
import yaml


def resolved_config(model):
    """The study config as model's training job sees it: its merged training section, only its model entry,
    and only the sections training reads. Deterministic YAML text."""
    entry = config["models"][model]
    cfg = {
        "study": STUDY,
        "dataset": config["dataset"],
        "variant": entry.get("variant") or config["variant"],  # a model's own variant or the study's
        "training": TRAINING[model],
        "models": {model: {"arch": entry["arch"]}},
    }
    if TRAINING[model]["schedule"]["name"] == "optimal-loss":
        cfg["optimal_loss"] = config["optimal_loss"]  # the schedule reads jstar.csv made with these settings
    return yaml.safe_dump(cfg, sort_keys=True, default_flow_style=False)


def snapshot_path(model, images):
    return f"{R}/snapshots/{model}/snapshot-{int(images):09d}.pt"


def _free_port_command():
    """Shell text that prints a free TCP port of the host it runs on (the job's first node under SLURM)."""
    return f"$({PYTHON} -c 'import socket; s = socket.socket(); s.bind((\"\", 0)); print(s.getsockname()[1])')"


def launch_command(model):
    """`accelerate launch …` (or plain python for one non-DeepSpeed process) up to the module name.
    Multi-process jobs get a free rendezvous port picked when the job starts, so concurrent jobs on one node
    never collide. A multi-node job (training.launch.num_machines > 1) runs under srun, one task per node, each
    starting its node's `accelerate launch` (workflow/scripts/node_launch.sh: machine rank from SLURM_NODEID, the
    rendezvous on the first node of the job, at the port picked on the node that runs the job script)."""
    launch = TRAINING[model]["launch"]
    n, machines = int(launch["num_processes"]), int(launch["num_machines"])
    acc_cfg = repo_path(launch["accelerate_config"])
    kind = accelerate_distributed_type(acc_cfg, BASEDIR)
    if n == 1 and kind in ("NO", "no"):
        return f"{PYTHON} -m models.train"
    accelerate = os.path.join(os.path.dirname(PYTHON), "accelerate")
    accelerate = f"{accelerate} launch" if os.path.exists(accelerate) else f"{PYTHON} -m accelerate.commands.launch"
    # without GPUs (the rehearsal on CPU) Accelerate makes a multi-process DDP job MULTI_CPU only when told; a
    # DeepSpeed job must not be told (it would run as DDP): models.train.make_accelerator sets it up on gloo
    cpu_ddp = not train_resources(model)["gpu"] and n > 1 and kind != "DEEPSPEED"
    cpu = "ACCELERATE_USE_CPU=1 " if cpu_ddp else ""
    launcher = f"{accelerate} --config_file {acc_cfg} --num_processes {n} --num_machines {machines}"
    if machines == 1:
        return f"{cpu}{launcher} --main_process_port {_free_port_command()} -m models.train"
    if kind == "DEEPSPEED":  # each node's own launcher (torchrun), not DeepSpeed's ssh/pdsh runner
        launcher += " --deepspeed_multinode_launcher standard"
    res = train_resources(model)
    node_launch = os.path.join(BASEDIR, "workflow", "scripts", "node_launch.sh")
    return (
        f"{cpu}srun --nodes={machines} --ntasks={machines} --ntasks-per-node=1 --cpus-per-task={res['threads']}"
        f" --kill-on-bad-exit=1 bash {shlex.quote(node_launch)} {_free_port_command()} {launcher} -- -m models.train"
    )


def launcher_check(model):
    """Shell text run before a multi-node training job: it needs SLURM's srun (the SLURM profile)."""
    machines = int(TRAINING[model]["launch"]["num_machines"])
    if machines == 1:
        return ":"
    return (
        f"command -v srun > /dev/null || {{ echo 'train {model}: training.launch.num_machines = {machines} runs "
        "under SLURM (srun not found): use --profile workflow/profiles/slurm' >&2; exit 1; }"
    )


def train_resources(model):
    """gpu: GPUs of the job, one per training process over all its nodes (models.checks: a model's own
    resources.gpus equals num_processes); nodes; threads: the CPUs of one node; omp: each process's threads."""
    r = step_resources("train", model)
    launch = TRAINING[model]["launch"]
    n, machines = int(launch["num_processes"]), int(launch["num_machines"])
    gpus = n if r["gpus"] else 0
    return {
        "gpu": gpus,
        "nodes": machines,
        "threads": gpus // machines * r["cpus_per_gpu"] if gpus else r["cpus"],
        # intra-op threads of each training process: its share of the node's CPUs
        "omp": r["cpus_per_gpu"] if gpus else r["cpus"],
    }


def train_cost(model):
    """A proxy of a model's training cost known without building its net: images × width² (× depth for a DiT)."""
    from models.config import total_images
    from models.sizes import SIZES

    size = SIZES.get(config["models"][model]["arch"], {})
    width = size.get("model_channels") or size.get("hidden_size") or 1
    return total_images(TRAINING[model]) * width**2 * size.get("depth", 1)


def train_priority(model):
    """The training job's Snakemake priority, its rank by cost: the costliest training starts first, so the
    longest job never starts last with the other cores idle beside it (longest-processing-time first). A model's
    evaluation job has the same rank."""
    return sorted(MODELS, key=lambda m: (train_cost(m), m)).index(model)


# Above every training rank: the quick jobs that trainings and evaluations wait for (model configs, the evaluation
# set, D*, the J* estimators) run first, so no evaluation waits behind a training it does not need.
PREREQUISITE_PRIORITY = len(MODELS)


def train_rule_resources(model):
    """The train rule's Snakemake resources. One node: gpu, cpus_per_gpu, runtime, mem_mb. Several nodes: the
    SLURM executor plugin's MPI form — `mpi` makes its job step run the rule's shell once, on the first node,
    which starts one task per node with srun; sbatch gets --nodes=M --ntasks=M --cpus-per-task (one node's
    CPUs) and, through slurm_extra, --ntasks-per-node=1 and --gpus-per-node (the plugin's `gpu` would ask for
    GPUs over the whole job, not per node). mem_mb is per node."""
    res = train_resources(model)
    base = rule_resources("train", model, gpus=res["gpu"])
    if res["nodes"] == 1:
        return base
    extra = "--ntasks-per-node=1" + (f" --gpus-per-node={res['gpu'] // res['nodes']}" if res["gpu"] else "")
    return {"nodes": res["nodes"], "tasks": res["nodes"], "mpi": "srun", "cpus_per_task": res["threads"],
            "runtime": base["runtime"], "mem_mb": base["mem_mb"], "slurm_extra": extra}


# ---- diagnosis and schedule studies (diagnose.smk, schedule.smk) ----
def final_eval(model):
    """The evaluation CSV of a model's last snapshot."""
    return f"{R}/eval/{model}/{MARKS[model][-1]:09d}.csv"


def schedule_settings(schedule):
    """A model's schedule settings beyond its name: the named keys and the free-form kwargs, as one dict."""
    named = {k: v for k, v in schedule.items() if k not in ("name", "kwargs", "update_every_images")}
    return {**named, **(schedule.get("kwargs") or {})}


def model_table():
    """model → {variant, schedule, seed, arch, logvar, schedule_kwargs, size}: what the analyses group by (a model's
    own variant, else the study's; size: the model-table entry a `seeds` run replicates, else the model itself)."""
    return {
        m: {
            "size": config["models"][m].get("replicate_of") or m,
            "variant": (config["models"][m].get("variant") or config["variant"])["name"],
            "schedule": TRAINING[m]["schedule"]["name"],
            "seed": int(TRAINING[m]["seed"]),
            "arch": config["models"][m]["arch"],
            "logvar": bool(TRAINING[m].get("logvar", True)),
            "schedule_kwargs": schedule_settings(TRAINING[m]["schedule"]),
        }
        for m in MODELS
    }
