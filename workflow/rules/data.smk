# The dataset, materialised once as results/<study>/data/dataset.npz (training.dataset) in its compact form (uint8 where
# the images are exactly u/127.5 − 1, float32 otherwise; uncompressed, so every later job memory-maps it and reads
# only its rows), and the study's fixed evaluation set of (x0 index, σ, noise seed) triples (analysis.evaluate
# make-set).
#
# The raw data location (config dataset.spec) is a parameter, not an input: a dry-run of a study whose data lives
# on a cluster file system works anywhere, and a changed spec still reruns the rule (params trigger).


# A study may read the PNG folder that rule digits_imagefolder generates (paper-rehearsal.yaml): then it is an input.
DIGITS_PNGS = f"{R}/data/digits-png"


def dataset_needs():
    """The dataset job's --at-least flags: a set smaller than a batch, or than the estimators' subset, is refused
    where it enters (training.dataset.check_images), not by whichever job meets it first. A global in the shell text,
    not a param: a new model's batch size must not remake the dataset."""
    needs = {"training.batch_size": max(int(TRAINING[m]["batch_size"]) for m in MODELS)}
    ol = config["optimal_loss"]
    if {ol["estimator"], *(ol.get("compare_estimators") or [])} - {"full"} and ol.get("subset_size"):
        needs["optimal_loss.subset_size"] = int(ol["subset_size"])
    return " ".join(f"--at-least {what}={n}" for what, n in needs.items())


DATASET_NEEDS = dataset_needs()


rule dataset:
    input:
        [DIGITS_PNGS] if config["dataset"]["spec"] == f"imagefolder:{DIGITS_PNGS}" else [],
    output:
        f"{R}/data/dataset.npz",
        sidecar(f"{R}/data/dataset.npz"),
    params:
        spec=config["dataset"]["spec"],
        resolution=(
            f"--resolution {config['dataset']['resolution']}" if config["dataset"].get("resolution") else ""
        ),
    threads: step_threads("dataset")
    resources:
        **rule_resources("dataset", gpus=0, keys=("gpu", "runtime", "mem_mb")),
    benchmark:
        benchmark_file("dataset")
    log:
        f"{R}/logs/dataset.log",
    shell:
        # its checksum beside it (dataset.npz.sha256, --rebuild): readers detect a truncated or corrupted copy
        "{PYTHON} -m training.dataset {params.spec:q} --compact --out {output[0]:q} {params.resolution} {DATASET_NEEDS}"
        " --rebuild {REBUILD:q}' --forcerun dataset' > {log:q} 2>&1"


rule eval_set:
    input:
        f"{R}/data/dataset.npz",
        sidecar(f"{R}/data/dataset.npz"),
    output:
        f"{R}/data/eval_set.npz",
        sidecar(f"{R}/data/eval_set.npz"),
    params:
        ev=config["evaluation"],
    priority: PREREQUISITE_PRIORITY
    resources:
        gpu=0,
        runtime=10,
    benchmark:
        benchmark_file("eval_set")
    log:
        f"{R}/logs/eval_set.log",
    shell:
        "{PYTHON} -m analysis.evaluate make-set --dataset {input[0]:q} --num-sigmas {params.ev[num_sigmas]}"
        " --sigma-min {params.ev[sigma_min]} --sigma-max {params.ev[sigma_max]}"
        " --samples-per-sigma {params.ev[samples_per_sigma]} --seed {params.ev[seed]} --out {output[0]:q}"
        " --rebuild {REBUILD:q}' --forcerun eval_set' > {log:q} 2>&1"


rule digits_imagefolder:
    output:
        directory(DIGITS_PNGS),
    params:
        script=repo_path("workflow/scripts/digits_imagefolder.py"),
        resolution=config["dataset"].get("resolution") or 16,
    resources:
        gpu=0,
        runtime=10,
    benchmark:
        benchmark_file("digits_imagefolder")
    log:
        f"{R}/logs/digits_imagefolder.log",
    shell:
        "{PYTHON} {params.script:q} --out {output:q} --resolution {params.resolution} > {log:q} 2>&1"
