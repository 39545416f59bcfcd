# Use 1 of J*: diagnosis. Every model of the study (in workflow/config/diagnose.yaml: VP-ε, VE-ε,
# FM-velocity and EDM-F, one size, equal training images) is evaluated on the study's fixed triples in VE-x0
# coordinates; analysis.diagnose turns the final snapshots' per-σ rows into the gap curves J_σ(θ) − J*_σ, where
# each peaks, a table and a figure.
#
#   snakemake diagnose --configfile workflow/config/diagnose.yaml
#
# Works with any study config (it diagnoses that study's models). Needs the Snakefile's R, MODELS, MARKS,
# TRAINING, PYTHON, the evaluate/optimal_loss rules and scaling.smk's models_table rule.
# final_eval: workflow/rules/common.smk.


rule diagnosis:
    input:
        evals=[final_eval(m) for m in MODELS],
        meta=f"{R}/analysis/models.json",
        jstar=f"{R}/optimal_loss/jstar.csv",
        checksums=sidecars(*[final_eval(m) for m in MODELS], f"{R}/optimal_loss/jstar.csv"),
    output:
        table=f"{R}/analysis/diagnosis.csv",
        summary=f"{R}/analysis/diagnosis_summary.csv",
        markdown=f"{R}/analysis/diagnosis.md",
        figure=f"{R}/figures/diagnosis_gap.png",
    benchmark:
        benchmark_file("diagnosis")
    log:
        f"{R}/logs/diagnosis.log",
    shell:
        "{PYTHON} -m analysis.diagnose diagnose --eval {input.evals:q} --meta {input.meta:q} --jstar {input.jstar:q}"
        " --out {output.table:q} --summary {output.summary:q} --markdown {output.markdown:q}"
        " --figure {output.figure:q} > {log:q} 2>&1"


rule diagnose:
    input:
        rules.diagnosis.output,
