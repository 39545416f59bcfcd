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
    output:
        f"{R}/optimal_loss/estimators/{{est}}.csv",
    params:
        flags=optimal_loss_flags(),
    threads: step_threads("optimal_loss")
    resources:
        **rule_resources("optimal_loss"),
    log:
        f"{R}/logs/optimal_loss_{{est}}.log",
    shell:
        "OMP_NUM_THREADS={threads} {PYTHON} -m analysis.optimal_loss --dataset {input:q} --estimator {wildcards.est}"
        " {params.flags} --out {output:q} > {log:q} 2>&1"


rule jstar:
    input:
        f"{R}/optimal_loss/estimators/{OL['estimator']}.csv",
    output:
        f"{R}/optimal_loss/jstar.csv",
    shell:
        "cp {input:q} {output:q}"


rule estimators:
    input:
        expand(f"{R}/optimal_loss/estimators/{{est}}.csv", est=ESTIMATORS),
    output:
        f"{R}/optimal_loss/estimators.csv",
    run:
        import pandas as pd

        pd.concat([pd.read_csv(p) for p in input], ignore_index=True).to_csv(output[0], index=False)


rule optimal_denoiser:
    input:
        data=f"{R}/data/dataset.npz",
        eval_set=f"{R}/data/eval_set.npz",
    output:
        f"{R}/optimal_loss/eval_denoised.npy",
    params:
        conditional="--conditional" if config["dataset"]["conditional"] else "",
        device=device_flag("optimal_loss"),
    threads: step_threads("optimal_loss")
    resources:
        **rule_resources("optimal_loss"),
    log:
        f"{R}/logs/optimal_denoiser.log",
    shell:
        "OMP_NUM_THREADS={threads} {PYTHON} -m analysis.optimal_loss denoise --dataset {input.data:q}"
        " --eval-set {input.eval_set:q} {params.conditional} {params.device} --out {output:q} > {log:q} 2>&1"
