# Every snapshot evaluated on the study's fixed evaluation set (same triples as D*), then losses.csv: one row
# per (model, snapshot, σ) plus the weighted totals, with the L(σ) ≥ J*(σ) − 3 s.e. invariant checked
# (analysis/invariant.csv; violations are also printed loudly).


def all_evaluations():
    return [eval_csv(m, k) for m in MODELS for k in MARKS[m]]


def eval_csv(model, images):
    return f"{R}/eval/{model}/{int(images):09d}.csv"


# One job per model evaluates all of its snapshots (they are published together when its training ends): one
# interpreter start and one reading of the evaluation set, the data rows and D* for all of them.
for _model in MODELS:
    _csvs = [eval_csv(_model, k) for k in MARKS[_model]]
    _npzs = [p[: -len(".csv")] + ".npz" for p in _csvs]  # per-triple errors, for the study's bootstrap
    _snapshots = [snapshot_path(_model, k) for k in MARKS[_model]]

    rule:
        name:
            f"evaluate_{_model}"
        input:
            snapshots=_snapshots,
            data=f"{R}/data/dataset.npz",
            eval_set=f"{R}/data/eval_set.npz",
            denoised=f"{R}/optimal_loss/eval_denoised.npy",
            checksums=sidecars(
                *_snapshots, f"{R}/data/dataset.npz", f"{R}/data/eval_set.npz", f"{R}/optimal_loss/eval_denoised.npy"
            ),
        output:
            csv=_csvs,
            triples=_npzs,
            checksums=sidecars(*_csvs, *_npzs),
        params:
            model=_model,
            batch=config["evaluation"]["batch_size"],
            device=device_flag("evaluate"),
        priority: train_priority(_model)
        threads: step_threads("evaluate")
        resources:
            **rule_resources("evaluate"),
        benchmark:
            benchmark_file(f"evaluate_{_model}")
        log:
            f"{R}/logs/evaluate_{_model}.log",
        shell:
            "OMP_NUM_THREADS={threads} MKL_NUM_THREADS={threads} {PYTHON} -m analysis.evaluate snapshot"
            " --snapshot {input.snapshots:q} --dataset {input.data:q} --eval-set {input.eval_set:q}"
            " --denoised {input.denoised:q} --batch-size {params.batch} {params.device} --out {output.csv:q}"
            " --per-triple --rebuild {REBUILD:q}' --forcerun evaluate_{params.model}' > {log:q} 2>&1"


def all_triples():
    return [p[: -len(".csv")] + ".npz" for p in all_evaluations()]


rule collect_losses:
    input:
        evals=all_evaluations(),
        triples=all_triples(),
        jstar=f"{R}/optimal_loss/jstar.csv",
        checksums=sidecars(*all_evaluations(), *all_triples(), f"{R}/optimal_loss/jstar.csv"),
    output:
        losses=f"{R}/analysis/losses.csv",
        invariant=f"{R}/analysis/invariant.csv",
        per_triple=f"{R}/analysis/per_triple.npz",
        checksums=sidecars(
            f"{R}/analysis/losses.csv", f"{R}/analysis/invariant.csv", f"{R}/analysis/per_triple.npz"
        ),
    benchmark:
        benchmark_file("collect_losses")
    log:
        f"{R}/logs/collect_losses.log",
    shell:
        # the invariant warning goes to the log and to the terminal (tee), so nobody misses it
        "{PYTHON} -m analysis.evaluate collect --eval {input.evals:q} --jstar {input.jstar:q}"
        " --out {output.losses:q} --invariant {output.invariant:q} --per-triple {output.per_triple:q}"
        " --rebuild {REBUILD:q}' --forcerun collect_losses' 2>&1 | tee {log:q} >&2"
