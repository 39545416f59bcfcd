# Loss against the EMA length (config section `ema_sweep`; absent = off, and then this file adds no rule): each
# model's final snapshot rebuilt at every σ_rel of the grid from its power-EMA profiles (its published snapshots
# and the profile files of its run folder, ema_profiles/, written by the finished training job) and evaluated on
# the study's triples; the best σ_rel chosen on one half of them, its loss reported on the other
# (analysis/ema_sweep.py). Cost: one evaluation of one snapshot per σ_rel and model.


def ema_sweep_products():
    """The sweep's table, its checksum and its figure, when the config asks for it."""
    if config.get("ema_sweep") is None:
        return []
    table = f"{R}/analysis/ema_sweep.csv"
    return [table, sidecar(table), f"{R}/analysis/ema_exponents.csv", f"{R}/analysis/ema_sweep.md",
            f"{R}/figures/ema_sweep.png"]


if config.get("ema_sweep") is not None:
    for _model in MODELS:
        _snapshots = [snapshot_path(_model, k) for k in MARKS[_model]]

        rule:
            name:
                f"ema_sweep_{_model}"
            input:
                snapshots=_snapshots,
                done=f"{R}/runs/{_model}/done.json",
                data=f"{R}/data/dataset.npz",
                eval_set=f"{R}/data/eval_set.npz",
                denoised=f"{R}/optimal_loss/eval_denoised.npy",
                checksums=sidecars(
                    *_snapshots,
                    f"{R}/data/dataset.npz",
                    f"{R}/data/eval_set.npz",
                    f"{R}/optimal_loss/eval_denoised.npy",
                ),
            output:
                f"{R}/ema_sweep/{_model}.csv",
                f"{R}/ema_sweep/{_model}.npz",
            params:
                profiles=f"{R}/runs/{_model}/ema_profiles",
                grid=" ".join(str(s) for s in config["ema_sweep"]["sigma_rel"]),
                batch=config["evaluation"]["batch_size"],
                device=device_flag("evaluate"),
            threads: step_threads("evaluate")
            resources:
                **rule_resources("evaluate"),
            benchmark:
                benchmark_file(f"ema_sweep_{_model}")
            log:
                f"{R}/logs/ema_sweep_{_model}.log",
            shell:
                "OMP_NUM_THREADS={threads} MKL_NUM_THREADS={threads} {PYTHON} -m analysis.ema_sweep evaluate"
                " --files {input.snapshots:q} $(ls {params.profiles:q}/profile-*.pt 2> /dev/null || true)"
                " --dataset {input.data:q} --eval-set {input.eval_set:q} --denoised {input.denoised:q}"
                " --sigma-rel {params.grid} --batch-size {params.batch} {params.device} --out {output[0]:q}"
                " > {log:q} 2>&1"

    rule ema_sweep:
        input:
            csv=[f"{R}/ema_sweep/{m}.csv" for m in MODELS],
            npz=[f"{R}/ema_sweep/{m}.npz" for m in MODELS],
        output:
            table=f"{R}/analysis/ema_sweep.csv",
            exponents=f"{R}/analysis/ema_exponents.csv",
            md=f"{R}/analysis/ema_sweep.md",
            figure=f"{R}/figures/ema_sweep.png",
            checksum=sidecar(f"{R}/analysis/ema_sweep.csv"),
        params:
            fixed=config["ema_sweep"]["fixed_sigma_rel"],
            replicates=config["scaling"]["n_replicates"],
            seed=config["scaling"]["seed"],
        benchmark:
            benchmark_file("ema_sweep")
        log:
            f"{R}/logs/ema_sweep.log",
        shell:
            "{PYTHON} -m analysis.ema_sweep collect --sweeps {input.csv:q} --out {output.table:q}"
            " --figure {output.figure:q} --exponents {output.exponents:q} --markdown {output.md:q}"
            " --fixed-sigma-rel {params.fixed} --n-replicates {params.replicates} --seed {params.seed}"
            " --rebuild {REBUILD:q}' --forcerun ema_sweep' > {log:q} 2>&1"
