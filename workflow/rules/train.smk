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
# corrupts the run folder's. A killed job therefore resumes from state.pt on the next `snakemake`. The run folder is
# cleared and training starts afresh if the model's settings changed since it was started (its .study-config.yaml
# trains another model than the resolved config: models.run_folder same-settings, which lets batch_gpu and the
# trackers change), or if one of its snapshots fails its checksum (the state to regenerate an earlier snapshot is
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
# Helpers (resolved_config, snapshot_path, launch_command, train_resources, train_rule_resources):
# workflow/rules/common.smk.


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
            launcher_check=launcher_check(_model),
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
            """
            rundir={params.rundir:q}
            stamp="$rundir/.study-config.yaml"
            if [ -e "$stamp" ] && ! {PYTHON} -m models.run_folder same-settings "$stamp" {input.config:q}; then
                echo "train {params.model}: settings changed since $rundir was started: starting afresh" >> {log:q}
                rm -rf "$rundir"
            fi
            if [ -d "$rundir" ]; then
                check=0
                {PYTHON} -m models.integrity check-run "$rundir" >> {log:q} 2>&1 || check=$?
                if [ "$check" = 3 ]; then
                    echo "train {params.model}: a file in $rundir fails its checksum: starting afresh" >> {log:q}
                    rm -rf "$rundir"
                elif [ "$check" != 0 ]; then
                    exit "$check"
                fi
            fi
            {params.launcher_check} 2>> {log:q}
            mkdir -p "$rundir"
            cp {input.config:q} "$stamp"
            OMP_NUM_THREADS={params.omp} MKL_NUM_THREADS={params.omp} {params.launch} --config {input.config:q} \
                --model {params.model} --data {input.data:q} --out "$rundir" {params.jstar} --no-progress \
                >> {log:q} 2>&1
            for f in {output.snapshots:q}; do
                {PYTHON} -m models.integrity publish "$rundir/snapshots/$(basename "$f")" "$f" \
                    --rebuild {REBUILD:q}' --forcerun 'train_{params.model} >> {log:q} 2>&1
            done
            """
