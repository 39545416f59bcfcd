# The optimal loss, once per dataset (no model involved): J*(σ) on the σ grid with every estimator to compare
# (optimal_loss/estimators/<est>.csv → estimators.csv), the study's estimator copied to jstar.csv, and D* on every
# evaluation triple (eval_denoised.npy), which every snapshot's evaluation shares.
#
# Conditioning: J* curves are class-conditional when optimal_loss.conditional (default: dataset.conditional);
# D* on the evaluation set always follows dataset.conditional, because it must be the optimum of the models being
# evaluated (conditional models ⇔ conditional D*).

OL = config["optimal_loss"]
JSTAR_CONDITIONAL = bool(
    config["dataset"]["conditional"] if OL.get("conditional") is None else OL["conditional"]
)
ESTIMATORS = list(dict.fromkeys([OL["estimator"], *OL["compare_estimators"]]))


def optimal_loss_flags():
    flags = [f"--num-sigmas {OL['num_sigmas']}", f"--sigma-min {OL['sigma_min']}", f"--sigma-max {OL['sigma_max']}"]
    for key, flag in (("n_samples", "--n-samples"), ("subset_size", "--subset-size"), ("C", "--C")):
        if OL.get(key) is not None:
            flags.append(f"{flag} {OL[key]}")
    if JSTAR_CONDITIONAL:
        flags.append("--conditional")
    flags.append(device_flag("optimal_loss"))
    return " ".join(flags)


rule optimal_loss_estimator:
    input:
        f"{R}/data/dataset.npz",
        sidecar(f"{R}/data/dataset.npz"),
    output:
        f"{R}/optimal_loss/estimators/{{est}}.csv",
        sidecar(f"{R}/optimal_loss/estimators/{{est}}.csv"),
    params:
        flags=optimal_loss_flags(),
    priority: PREREQUISITE_PRIORITY
    threads: step_threads("optimal_loss")
    resources:
        **rule_resources("optimal_loss"),
    benchmark:
        benchmark_file("optimal_loss_estimator", "{est}")
    log:
        f"{R}/logs/optimal_loss_{{est}}.log",
    shell:
        "OMP_NUM_THREADS={threads} {PYTHON} -m analysis.optimal_loss --dataset {input[0]:q} --estimator {wildcards.est}"
        " {params.flags} --out {output[0]:q} --rebuild {REBUILD:q}' --forcerun '{output[0]:q} > {log:q} 2>&1"


# jstar.csv: the study estimator's table, verified against its checksum and copied read-only with its own
rule jstar:
    input:
        f"{R}/optimal_loss/estimators/{OL['estimator']}.csv",
        sidecar(f"{R}/optimal_loss/estimators/{OL['estimator']}.csv"),
    output:
        f"{R}/optimal_loss/jstar.csv",
        sidecar(f"{R}/optimal_loss/jstar.csv"),
    priority: PREREQUISITE_PRIORITY
    benchmark:
        benchmark_file("jstar")
    shell:
        "{PYTHON} -m study.integrity publish {input[0]:q} {output[0]:q} --rebuild {REBUILD:q}' --forcerun jstar'"


rule estimators:
    input:
        tables=expand(f"{R}/optimal_loss/estimators/{{est}}.csv", est=ESTIMATORS),
        checksums=expand(sidecar(f"{R}/optimal_loss/estimators/{{est}}.csv"), est=ESTIMATORS),
    output:
        f"{R}/optimal_loss/estimators.csv",
        sidecar(f"{R}/optimal_loss/estimators.csv"),
    benchmark:
        benchmark_file("estimators", in_snakemake=True)
    run:
        import pandas as pd

        from study import integrity

        for p in input.tables:
            integrity.verify(p)
        pd.concat([pd.read_csv(p) for p in input.tables], ignore_index=True).to_csv(output[0], index=False)
        integrity.stamp(output[0], rebuild=f"{REBUILD} --forcerun estimators")


rule optimal_denoiser:
    input:
        data=f"{R}/data/dataset.npz",
        eval_set=f"{R}/data/eval_set.npz",
        checksums=sidecars(f"{R}/data/dataset.npz", f"{R}/data/eval_set.npz"),
    output:
        f"{R}/optimal_loss/eval_denoised.npy",
        sidecar(f"{R}/optimal_loss/eval_denoised.npy"),
    params:
        conditional="--conditional" if config["dataset"]["conditional"] else "",
        device=device_flag("optimal_loss"),
    priority: PREREQUISITE_PRIORITY
    threads: step_threads("optimal_loss")
    resources:
        **rule_resources("optimal_loss"),
    benchmark:
        benchmark_file("optimal_denoiser")
    log:
        f"{R}/logs/optimal_denoiser.log",
    shell:
        "OMP_NUM_THREADS={threads} {PYTHON} -m analysis.optimal_loss denoise --dataset {input.data:q}"
        " --eval-set {input.eval_set:q} {params.conditional} {params.device} --out {output[0]:q}"
        " --rebuild {REBUILD:q}' --forcerun optimal_denoiser' > {log:q} 2>&1"
