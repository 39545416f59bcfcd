# Use 1 of J*: diagnosis. Every model of the study (in workflow/config/diagnose.yaml: VP-ε, VE-ε,
# FM-velocity and EDM-F, one size, equal training images) is evaluated on the study's fixed triples in VE-x0
# coordinates; analysis.diagnose turns the final snapshots' per-σ rows into the gap curves J_σ(θ) − J*_σ, where
# each peaks, a table and a figure.
#
#   snakemake diagnose --configfile workflow/config/diagnose.yaml
#
# Works with any study config (it diagnoses that study's models). Needs the Snakefile's R, MODELS, MARKS,
# TRAINING, PYTHON and the evaluate/optimal_loss rules; schedule.smk uses models_table and final_eval from here.
import json


def final_eval(model):
    """The evaluation CSV of a model's last snapshot."""
    return f"{R}/eval/{model}/{MARKS[model][-1]:09d}.csv"


def schedule_settings(schedule):
    """A model's schedule settings beyond its name: the named keys and the free-form kwargs, as one dict."""
    named = {k: v for k, v in schedule.items() if k not in ("name", "kwargs", "update_every_images")}
    return {**named, **(schedule.get("kwargs") or {})}


def model_table():
    """model → {variant, schedule, seed, arch, logvar, schedule_kwargs}: what the analyses group by (a model's own
    variant, else the study's)."""
    return {
        m: {
            "variant": (config["models"][m].get("variant") or config["variant"])["name"],
            "schedule": TRAINING[m]["schedule"]["name"],
            "seed": int(TRAINING[m]["seed"]),
            "arch": config["models"][m]["arch"],
            "logvar": bool(TRAINING[m].get("logvar", True)),
            "schedule_kwargs": schedule_settings(TRAINING[m]["schedule"]),
        }
        for m in MODELS
    }


rule models_table:
    output:
        f"{R}/analysis/models.json",
    params:
        table=json.dumps(model_table(), sort_keys=True),
    run:
        with open(output[0], "w") as f:
            f.write(params.table + "\n")


rule diagnosis:
    input:
        evals=[final_eval(m) for m in MODELS],
        meta=f"{R}/analysis/models.json",
        jstar=f"{R}/optimal_loss/jstar.csv",
    output:
        table=f"{R}/analysis/diagnosis.csv",
        summary=f"{R}/analysis/diagnosis_summary.csv",
        markdown=f"{R}/analysis/diagnosis.md",
        figure=f"{R}/figures/diagnosis_gap.png",
    log:
        f"{R}/logs/diagnosis.log",
    shell:
        "{PYTHON} -m analysis.diagnose diagnose --eval {input.evals:q} --meta {input.meta:q} --jstar {input.jstar:q}"
        " --out {output.table:q} --summary {output.summary:q} --markdown {output.markdown:q}"
        " --figure {output.figure:q} > {log:q} 2>&1"


rule diagnose:
    input:
        rules.diagnosis.output,
