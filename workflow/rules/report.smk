# Figures (analysis.plots, matplotlib Agg) marked for `snakemake --report report.html`, each with a caption from
# workflow/report/.

FIGURE_NAMES = ["jstar", "loss_per_sigma", "gap_per_sigma", "scaling", "exponents_per_sigma", "residuals",
                "offset_profile", "compute_optimal", "forecast"]
FIGURES = [f"{R}/figures/{name}.png" for name in FIGURE_NAMES]

# A study whose models come from several architecture families (MODEL_FAMILIES, common.smk) also gets per-family
# fits (analysis.scaling) and their figure.
if len(MODEL_FAMILIES) > 1:
    FIGURES.append(f"{R}/figures/families.png")


rule figures:
    input:
        losses=f"{R}/analysis/losses.csv",
        exponents=f"{R}/analysis/exponents.csv",
        verdict=f"{R}/analysis/verdict.csv",
        profile=f"{R}/analysis/offset_profile.csv",
        compute_optimal=f"{R}/analysis/compute_optimal.csv",
        forecast=f"{R}/analysis/forecast.csv",
        forecast_points=f"{R}/analysis/forecast_points.csv",
        jstar=f"{R}/optimal_loss/jstar.csv",
        estimators=f"{R}/optimal_loss/estimators.csv",
        checksums=sidecars(
            f"{R}/analysis/losses.csv", f"{R}/optimal_loss/jstar.csv", f"{R}/optimal_loss/estimators.csv"
        ),
    output:
        jstar=report(f"{R}/figures/jstar.png", caption="../report/jstar.rst", category="1. Optimal loss"),
        loss_per_sigma=report(
            f"{R}/figures/loss_per_sigma.png", caption="../report/loss_per_sigma.rst", category="2. Per-σ loss"
        ),
        gap_per_sigma=report(
            f"{R}/figures/gap_per_sigma.png", caption="../report/gap_per_sigma.rst", category="2. Per-σ loss"
        ),
        scaling=report(f"{R}/figures/scaling.png", caption="../report/scaling.rst", category="3. Scaling laws"),
        exponents_per_sigma=report(
            f"{R}/figures/exponents_per_sigma.png",
            caption="../report/exponents_per_sigma.rst",
            category="3. Scaling laws",
        ),
        residuals=report(
            f"{R}/figures/residuals.png", caption="../report/residuals.rst", category="3. Scaling laws"
        ),
        offset_profile=report(
            f"{R}/figures/offset_profile.png", caption="../report/offset_profile.rst", category="3. Scaling laws"
        ),
        compute_optimal=report(
            f"{R}/figures/compute_optimal.png", caption="../report/compute_optimal.rst", category="3. Scaling laws"
        ),
        forecast=report(f"{R}/figures/forecast.png", caption="../report/forecast.rst", category="3. Scaling laws"),
    benchmark:
        benchmark_file("figures")
    log:
        f"{R}/logs/figures.log",
    shell:
        "MPLBACKEND=Agg {PYTHON} -m analysis.plots all --losses {input.losses:q} --exponents {input.exponents:q}"
        " --jstar {input.jstar:q} --estimators {input.estimators:q} --profile {input.profile:q}"
        " --verdict {input.verdict:q} --compute-optimal {input.compute_optimal:q} --forecast {input.forecast:q}"
        " --forecast-points {input.forecast_points:q} --outdir $(dirname {output.jstar:q})"
        " > {log:q} 2>&1"


rule family_figure:
    input:
        losses=f"{R}/analysis/losses.csv",
        exponents=f"{R}/analysis/exponents.csv",
        checksums=sidecars(f"{R}/analysis/losses.csv"),
    output:
        report(f"{R}/figures/families.png", caption="../report/families.rst", category="3. Scaling laws"),
    benchmark:
        benchmark_file("family_figure")
    log:
        f"{R}/logs/family_figure.log",
    shell:
        "MPLBACKEND=Agg {PYTHON} -m analysis.plots families --losses {input.losses:q} --exponents {input.exponents:q}"
        " --out {output:q} > {log:q} 2>&1"
