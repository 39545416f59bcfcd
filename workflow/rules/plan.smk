# The cost of the study before anything runs: `snakemake plan --configfile STUDY` writes results/<study>/plan.csv
# (per model: parameters, counted training FLOPs per image, images, total FLOPs, GPUs, GPU-hours at the config's
# `plan` throughput; study.plan) and prints it with the study's total. It trains nothing and reads no dataset.
import json


def _plan_settings():
    """What the plan depends on (its rerun trigger): models, their merged training, dataset and plan sections."""
    return json.dumps(
        {
            "models": config["models"],
            "training": TRAINING,
            "dataset": config["dataset"],
            "plan": config.get("plan"),
        },
        sort_keys=True,
    )


rule plan_table:
    output:
        f"{R}/plan.csv",
    params:
        settings=_plan_settings(),
    benchmark:
        benchmark_file("plan_table", in_snakemake=True)
    run:
        from study.plan import write_plan

        write_plan(config, output[0])


rule plan:
    input:
        f"{R}/plan.csv",
    run:
        from study.plan import format_plan, plan_notes, read_plan

        print(format_plan(read_plan(input[0]), plan_notes(config), STUDY))
