# The study's statistics (python -m analysis.scaling; its docstring names the module of each piece): power-law fits
# of L, L − J*, the direct excess and a free offset against training compute (one frontier) and parameters, per σ and
# for the weighted total; the paired verdict on L − J* vs L; the profile over the subtracted constant; the
# compute-optimal law L(N, D); and the verdict by forecasting the next larger model. Intervals from bootstrap
# replicates of the evaluation triples (and of the seed runs of a size with `seeds`), widened by leaving each model
# out. models.json tells the statistics which runs are seeds of one size.
import json
import shlex

from study.spec import ema_label


def schedule_settings(schedule):
    """A model's schedule settings beyond its name: the named keys and the free-form kwargs, as one dict."""
    named = {k: v for k, v in schedule.items() if k not in ("name", "kwargs", "update_every_images")}
    return {**named, **(schedule.get("kwargs") or {})}


def model_table():
    """model → {variant, schedule, seed, arch, logvar, schedule_kwargs, size, ema}: what the analyses group by (a
    model's own variant, else the study's; size: the model-table entry a `seeds` run replicates, else the model
    itself; ema: the EMA its snapshots are evaluated at, in words, which exponents.csv states)."""
    return {
        m: {
            "size": SPECS[m].size,
            "variant": SPECS[m].variant["name"],
            "schedule": TRAINING[m]["schedule"]["name"],
            "seed": int(TRAINING[m]["seed"]),
            "arch": SPECS[m].arch,
            "logvar": bool(TRAINING[m].get("logvar", True)),
            "schedule_kwargs": schedule_settings(TRAINING[m]["schedule"]),
            "ema": ema_label(TRAINING[m]),
        }
        for m in MODELS
    }


rule models_table:
    output:
        f"{R}/analysis/models.json",
    params:
        table=json.dumps(model_table(), sort_keys=True),
    benchmark:
        benchmark_file("models_table", in_snakemake=True)
    run:
        with open(output[0], "w") as f:
            f.write(params.table + "\n")


# with an `ema_sweep` (ema_sweep.smk), exponents.md sets its exponents at each model's best EMA length beside a
# fixed one's
EMA_EXPONENTS = [f"{R}/analysis/ema_exponents.csv"] if config.get("ema_sweep") is not None else []


rule scaling:
    input:
        losses=f"{R}/analysis/losses.csv",
        per_triple=f"{R}/analysis/per_triple.npz",
        models=f"{R}/analysis/models.json",
        checksums=sidecars(f"{R}/analysis/losses.csv", f"{R}/analysis/per_triple.npz"),
        ema_exponents=EMA_EXPONENTS,
    output:
        csv=f"{R}/analysis/exponents.csv",
        md=f"{R}/analysis/exponents.md",
        verdict=f"{R}/analysis/verdict.csv",
        profile=f"{R}/analysis/offset_profile.csv",
        compute_optimal=f"{R}/analysis/compute_optimal.csv",
        forecast=f"{R}/analysis/forecast.csv",
        forecast_pairs=f"{R}/analysis/forecast_pairs.csv",
        forecast_points=f"{R}/analysis/forecast_points.csv",
        information=f"{R}/analysis/information.csv",
        floor_profile=f"{R}/analysis/floor_profile.csv",
        joint_floor=f"{R}/analysis/joint_floor.csv",
        # several architecture families (report.smk's MODEL_FAMILIES): their paired exponent differences
        families=[f"{R}/analysis/family_differences.csv"] if len(MODEL_FAMILIES) > 1 else [],
    params:
        n_replicates=config["scaling"]["n_replicates"],
        seed=config["scaling"]["seed"],
        out_dir=f"{R}/analysis",
        ema_exponents="".join(f" --ema-exponents {shlex.quote(p)}" for p in EMA_EXPONENTS),
    benchmark:
        benchmark_file("scaling")
    log:
        f"{R}/logs/scaling.log",
    shell:
        "{PYTHON} -m analysis.scaling --losses {input.losses:q} --per-triple {input.per_triple:q}"
        " --models {input.models:q} --out-dir {params.out_dir:q} --n-replicates {params.n_replicates}"
        " --seed {params.seed}{params.ema_exponents} > {log:q} 2>&1"
