# Use 2 of J*: the optimal-loss training schedule (models/loss_weighting.py) against each variant's own
# (baseline) schedule, at equal compute, over seeds (workflow/config/schedule.yaml: EDM and FM × baseline /
# optimal-loss × logvar off/on; workflow/config/schedule-sweep.yaml: the schedule's open choices). Per model: the
# final snapshot's per-σ gap (evaluate rules) and the Fréchet distance of its Heun samples to the training set in
# the feature space of a small classifier trained on the dataset's labels (analysis.sample_quality; FID too when
# sample_quality.inception points at local weights). analysis.weighting_study compares the arms, paired by seed.
#
#   snakemake schedule --configfile workflow/config/schedule.yaml
#   snakemake schedule_sweep --configfile workflow/config/schedule-sweep.yaml
#
# Uses scaling.smk's models_table rule and common.smk's final_eval.

SQ = config["sample_quality"]


rule feature_classifier:
    input:
        f"{R}/data/dataset.npz",
        sidecar(f"{R}/data/dataset.npz"),
    output:
        f"{R}/sample_quality/classifier.pt",
    params:
        epochs=SQ["classifier_epochs"],
        seed=SQ["seed"],
    benchmark:
        benchmark_file("feature_classifier")
    log:
        f"{R}/logs/feature_classifier.log",
    shell:
        "OMP_NUM_THREADS=1 {PYTHON} -m analysis.sample_quality train-classifier --data {input[0]:q} --out {output:q}"
        " --epochs {params.epochs} --seed {params.seed} > {log:q} 2>&1"


rule sample_quality:
    input:
        snapshot=lambda wc: snapshot_path(wc.model, MARKS[wc.model][-1]),
        classifier=f"{R}/sample_quality/classifier.pt",
        data=f"{R}/data/dataset.npz",
        checksums=lambda wc: sidecars(snapshot_path(wc.model, MARKS[wc.model][-1]), f"{R}/data/dataset.npz"),
    output:
        f"{R}/sample_quality/{{model}}.json",
    params:
        num=SQ["num_samples"],
        steps=SQ["steps"],
        seed=SQ["seed"],
        inception=f"--inception {SQ['inception']}" if SQ.get("inception") else "",
    threads: step_threads("evaluate")
    benchmark:
        benchmark_file("sample_quality", "{model}")
    log:
        f"{R}/logs/sample_quality_{{model}}.log",
    shell:
        "OMP_NUM_THREADS={threads} MKL_NUM_THREADS={threads} {PYTHON} -m analysis.sample_quality score"
        " --classifier {input.classifier:q} --data {input.data:q} --snapshot {input.snapshot:q} --num {params.num}"
        " --steps {params.steps} --seed {params.seed} {params.inception} --out {output:q} > {log:q} 2>&1"


rule schedule_comparison:
    input:
        evals=[final_eval(m) for m in MODELS],
        scores=[f"{R}/sample_quality/{m}.json" for m in MODELS],
        meta=f"{R}/analysis/models.json",
        jstar=f"{R}/optimal_loss/jstar.csv",
        checksums=sidecars(*[final_eval(m) for m in MODELS], f"{R}/optimal_loss/jstar.csv"),
    output:
        models=f"{R}/analysis/schedule_models.csv",
        table=f"{R}/analysis/schedule_comparison.csv",
        markdown=f"{R}/analysis/schedule_comparison.md",
        figure=f"{R}/figures/schedule_comparison.png",
    benchmark:
        benchmark_file("schedule_comparison")
    log:
        f"{R}/logs/schedule_comparison.log",
    shell:
        "{PYTHON} -m analysis.weighting_study --eval {input.evals:q} --scores {input.scores:q}"
        " --meta {input.meta:q} --jstar {input.jstar:q} --models {output.models:q} --out {output.table:q}"
        " --markdown {output.markdown:q} --figure {output.figure:q} > {log:q} 2>&1"


rule schedule:
    input:
        rules.schedule_comparison.output,


# The sweep of the schedule's open choices (workflow/config/schedule-sweep.yaml) is the same comparison over more
# optimal-loss arms; its own name only so the command says what it runs.
rule schedule_sweep:
    input:
        rules.schedule_comparison.output,
