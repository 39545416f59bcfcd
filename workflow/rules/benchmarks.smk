# Where a study's time and memory go. Every rule has a `benchmark:` file (Snakemake writes the job's wall time,
# peak memory, CPU time, I/O) under results/<study>/benchmarks/: <rule>.tsv, or <rule>/<wildcards>.tsv for a rule
# with wildcards. The `benchmarks` rule runs last in the default target and collects them into
# results/<study>/benchmarks.csv, one line per rule (benchmarks/study_timing.py, which also prints the table for any
# study folder), shown in `snakemake --report`.
#
# The benchmark files are not inputs of the `benchmarks` rule: a benchmark file counts as a product of its job, so
# declaring one as an input would make a missing or deleted benchmark file (a study run before benchmarks existed,
# a cleaned folder) rerun the job that writes it — a retraining. The rule's inputs are instead the study's finished
# files: it runs after every other job of the default target and whenever one of them reran (their outputs are then
# newer than benchmarks.csv), and never makes another job run.


def benchmark_file(rule, wildcards="", *, in_snakemake=False):
    """A job's benchmark file: results/<study>/benchmarks/<rule>.tsv, or <rule>/<wildcards>.tsv (wildcards as a
    pattern, e.g. "{model}"). A rule whose body runs inside Snakemake's own process (`run:`) passes in_snakemake:
    Snakemake then measures its own process, so only the wall time means anything, and the file's name
    (….in-snakemake.tsv) tells benchmarks/study_timing.py so."""
    name = f"{rule}/{wildcards}" if wildcards else rule
    return f"{R}/benchmarks/{name}{'.in-snakemake' if in_snakemake else ''}.tsv"


rule benchmarks:
    input:
        # everything the default target makes besides this table (rule all, the Snakefile)
        lambda wildcards: study_products(),
    output:
        report(f"{R}/benchmarks.csv", caption="../report/benchmarks.rst", category="4. Cost of the study"),
    params:
        script=repo_path("benchmarks/study_timing.py"),
        study=R,
    log:
        f"{R}/logs/benchmarks.log",
    shell:
        "{PYTHON} {params.script:q} {params.study:q} --csv {output:q} > {log:q} 2>&1"
