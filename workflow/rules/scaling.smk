# The study's statistics (analysis.scaling → analysis.study_stats): power-law fits of L, L − J*, the direct excess
# and a free offset against training compute (one frontier) and parameters, per σ and for the weighted total, with
# intervals from bootstrap replicates of the evaluation triples; the paired verdict on L − J* vs L; the profile over
# the subtracted constant; and the compute-optimal law L(N, D) = J* + A/N^a + B/D^b.


rule scaling:
    input:
        losses=f"{R}/analysis/losses.csv",
        per_triple=f"{R}/analysis/per_triple.npz",
        checksums=sidecars(f"{R}/analysis/losses.csv", f"{R}/analysis/per_triple.npz"),
    output:
        csv=f"{R}/analysis/exponents.csv",
        md=f"{R}/analysis/exponents.md",
        verdict=f"{R}/analysis/verdict.csv",
        profile=f"{R}/analysis/offset_profile.csv",
        compute_optimal=f"{R}/analysis/compute_optimal.csv",
        # several architecture families (report.smk's MODEL_FAMILIES): their paired exponent differences
        families=[f"{R}/analysis/family_differences.csv"] if len(MODEL_FAMILIES) > 1 else [],
    params:
        n_replicates=config["scaling"]["n_replicates"],
        seed=config["scaling"]["seed"],
        out_dir=f"{R}/analysis",
    log:
        f"{R}/logs/scaling.log",
    shell:
        "{PYTHON} -m analysis.scaling --losses {input.losses:q} --per-triple {input.per_triple:q}"
        " --out-dir {params.out_dir:q} --n-replicates {params.n_replicates} --seed {params.seed} > {log:q} 2>&1"
