# One training job per model of the config's table (a rule per model: its outputs — the snapshot marks — differ
# per model). Adding a model adds one rule and its jobs; nothing else reruns, because each model's training is
# driven by its own resolved config file (results/<study>/configs/<model>.yaml) whose content depends only on that
# model's settings (params rerun trigger).
#
# Resumption. The trainer's run folder results/<study>/runs/<model>/ (state.pt, snapshots/, log.jsonl, done.json)
# is deliberately NOT a declared output: Snakemake deletes a job's declared outputs before (re)running it and after
# it fails, which would throw away state.pt and the snapshots already written. The declared outputs are
# done.json (written last by the trainer, with each snapshot's sha256; losing it is harmless) and read-only copies
# of the snapshots in results/<study>/snapshots/<model>/ (each with a .sha256 sidecar naming the command that
# rebuilds it), made after training finishes: copies, not hard links, so a corrupted published snapshot never
# corrupts the run folder's. A killed job therefore resumes from state.pt on the next `snakemake`. The job is one
# command, training/run_job.py: the run folder is cleared and training starts afresh if the model's settings changed
# since it was started (its .study-config.yaml trains another model than the resolved config:
# training.run_folder.same_settings, which lets batch_gpu and the trackers change), or if one of its snapshots fails its checksum (the state to regenerate an earlier snapshot is
# gone; training is deterministic, so the retrained model is the same) or its state.pt (or the DeepSpeed
# checkpoint state.pt records) fails its checksum. A state.pt that holds more than tensors and plain data is
# refused (the job fails naming it), not trained over.
#
# Snakemake deletes a forced job's declared outputs before it runs it: a failed or killed `--forcerun train_<model>`
# leaves the model without its published snapshots, and the default target (rule all) lists them, so the next
# `snakemake` reruns the training job (it resumes from the complete state.pt at once) and everything downstream.
#
# Several nodes (training.launch.num_machines > 1, SLURM profile): the job script runs this shell once, on the
# job's first node; the launch line starts one `accelerate launch` per node with srun (launch_command). Every
# node reads and writes the run folder, so results/ must be on a file system all nodes share; only the global
# main process writes state.pt, snapshots, log.jsonl and done.json (DeepSpeed's checkpoint: every rank its part).
# snapshot_path: workflow/rules/common.smk (the evaluation rules read the snapshots too).
import os
import shlex

import yaml

from study.checks import accelerate_distributed_type


def resolved_config(model):
    """The study config as model's training job sees it: its merged training section, only its model entry,
    and only the sections training reads. Deterministic YAML text."""
    cfg = {
        "study": STUDY,
        "dataset": config["dataset"],
        "variant": SPECS[model].variant,
        "training": TRAINING[model],
        "models": {model: {"arch": SPECS[model].arch}},
    }
    if TRAINING[model]["schedule"]["name"] == "optimal-loss":
        cfg["optimal_loss"] = config["optimal_loss"]  # the schedule reads jstar.csv made with these settings
    return yaml.safe_dump(cfg, sort_keys=True, default_flow_style=False)


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
        return f"{PYTHON} -m training.train"
    accelerate = os.path.join(os.path.dirname(PYTHON), "accelerate")
    accelerate = f"{accelerate} launch" if os.path.exists(accelerate) else f"{PYTHON} -m accelerate.commands.launch"
    # without GPUs (the rehearsal on CPU) Accelerate makes a multi-process DDP job MULTI_CPU only when told; a
    # DeepSpeed job must not be told (it would run as DDP): training.train.make_accelerator sets it up on gloo
    cpu_ddp = not train_resources(model)["gpu"] and n > 1 and kind != "DEEPSPEED"
    cpu = "ACCELERATE_USE_CPU=1 " if cpu_ddp else ""
    launcher = f"{accelerate} --config_file {acc_cfg} --num_processes {n} --num_machines {machines}"
    if machines == 1:
        return f"{cpu}{launcher} --main_process_port {_free_port_command()} -m training.train"
    if kind == "DEEPSPEED":  # each node's own launcher (torchrun), not DeepSpeed's ssh/pdsh runner
        launcher += " --deepspeed_multinode_launcher standard"
    res = train_resources(model)
    node_launch = os.path.join(BASEDIR, "workflow", "scripts", "node_launch.sh")
    return (
        f"{cpu}srun --nodes={machines} --ntasks={machines} --ntasks-per-node=1 --cpus-per-task={res['threads']}"
        f" --kill-on-bad-exit=1 bash {shlex.quote(node_launch)} {_free_port_command()} {launcher} -- -m training.train"
    )


def train_resources(model):
    """gpu: GPUs of the job, one per training process over all its nodes (study.checks: a model's own
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


rule model_config:
    output:
        f"{R}/configs/{{model}}.yaml",
    params:
        text=lambda wc: resolved_config(wc.model),
    priority: PREREQUISITE_PRIORITY
    benchmark:
        benchmark_file("model_config", "{model}", in_snakemake=True)
    run:
        with open(output[0], "w") as f:
            f.write(params.text)


for _model in MODELS:
    _res = train_resources(_model)
    _jstar = TRAINING[_model]["schedule"]["name"] == "optimal-loss"

    rule:
        name:
            f"train_{_model}"
        input:
            config=f"{R}/configs/{_model}.yaml",
            data=f"{R}/data/dataset.npz",
            jstar=[f"{R}/optimal_loss/jstar.csv"] if _jstar else [],
            checksums=sidecars(f"{R}/data/dataset.npz", *([f"{R}/optimal_loss/jstar.csv"] if _jstar else [])),
        output:
            done=f"{R}/runs/{_model}/done.json",
            snapshots=[snapshot_path(_model, k) for k in MARKS[_model]],
            checksums=sidecars(*[snapshot_path(_model, k) for k in MARKS[_model]]),
        params:
            model=_model,
            rundir=f"{R}/runs/{_model}",
            launch=launch_command(_model),
            machines=_res["nodes"],
            jstar=f"--jstar {R}/optimal_loss/jstar.csv" if _jstar else "",
            omp=_res["omp"],
        threads: _res["threads"]
        priority: train_priority(_model)
        resources:
            **train_rule_resources(_model),
        benchmark:
            benchmark_file(f"train_{_model}")
        log:
            f"{R}/logs/train_{_model}.log",
        shell:
            # the trainer watches this job's snakemake process and stops when it is gone (training/lifeline.py);
            # training/run_job.py: clear the run folder where it must start afresh, train, publish the snapshots
            "TRAINER_JOB_PID=\"$PPID@$HOSTNAME\" {PYTHON} -m training.run_job --model {params.model}"
            " --run-dir {params.rundir:q} --data {input.data:q} {params.jstar} --threads {params.omp}"
            " --machines {params.machines} --config {input.config:q} --launch {params.launch:q} --log {log:q}"
            " --publish {output.snapshots:q} --rebuild {REBUILD:q}' --forcerun 'train_{params.model}"
