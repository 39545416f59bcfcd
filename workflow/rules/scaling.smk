# Power-law fits of the raw loss L and of L − J* against training compute (and parameters), per σ and for the
# weighted total: exponents, ρ, R², bootstrap intervals (analysis.scaling).


rule scaling:
    input:
        f"{R}/analysis/losses.csv",
    output:
        csv=f"{R}/analysis/exponents.csv",
        md=f"{R}/analysis/exponents.md",
    params:
        n_bootstrap=config["scaling"]["n_bootstrap"],
    log:
        f"{R}/logs/scaling.log",
    shell:
        "{PYTHON} -m analysis.scaling --losses {input:q} --out-csv {output.csv:q} --out-md {output.md:q}"
        " --n-bootstrap {params.n_bootstrap} > {log:q} 2>&1"
