#!/usr/bin/env bash
# Peak memory (maximum RSS, /usr/bin/time -v) of the dataset, J* (cDOL), D* and evaluation jobs, each run as its
# workflow rule runs it, on a synthetic uint8 image set.
#
#   bash benchmarks/memory_jobs.sh [OUT]        # default OUT=results/memory; N=200000 (614 MB at 32×32×3)
#
# Environment: N (images), RES (resolution), PYTHON (default python), THREADS (OMP threads per job, default 2),
# JSTAR_SAMPLES (cDOL n_samples, default 1024) and JSTAR_SIGMAS (default 4), DSTAR_SIGMAS × DSTAR_PER_SIGMA (the
# eval set D* is computed on, default 4 × 16 = 64 triples: exact D* over N = 200,000 points takes minutes per
# hundred triples on two cores). The evaluation job uses the workflow's default evaluation set (12 σ × 256 =
# 3,072 triples) with an all-zero D* file of the right shape: its memory does not depend on D*'s values.
# Needs /usr/bin/time (apt-get install -y time).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-results/memory}
N=${N:-200000}
RES=${RES:-32}
PY=${PYTHON:-python}
THREADS=${THREADS:-2}
JSTAR_SAMPLES=${JSTAR_SAMPLES:-1024}
JSTAR_SIGMAS=${JSTAR_SIGMAS:-4}
DSTAR_SIGMAS=${DSTAR_SIGMAS:-4}
DSTAR_PER_SIGMA=${DSTAR_PER_SIGMA:-16}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
mkdir -p "$OUT"
[ -x /usr/bin/time ] || { echo "error: /usr/bin/time is missing (apt-get install -y time)" >&2; exit 2; }

[ -f "$OUT/source.npy" ] || $PY benchmarks/make_synthetic_dataset.py --out "$OUT/source.npy" --n "$N" --resolution "$RES"

ROWS=()
measure() {   # measure NAME CMD...: runs CMD under /usr/bin/time -v, log in OUT/NAME.log
    local name=$1; shift
    if ! /usr/bin/time -v -o "$OUT/$name.time" "$@" > "$OUT/$name.log" 2>&1; then
        echo "error: job $name failed; see $OUT/$name.log" >&2; exit 1
    fi
    local kb wall
    kb=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$OUT/$name.time")
    wall=$(awk -F': ' '/Elapsed \(wall clock\)/ {print $2}' "$OUT/$name.time")
    ROWS+=("$(awk -v n="$name" -v kb="$kb" -v w="$wall" 'BEGIN { printf "| %-34s | %6.0f MiB | %8s |", n, kb / 1024, w }')")
    echo "${ROWS[-1]}"
}

measure "dataset (training.dataset)" $PY -m training.dataset "$OUT/source.npy" --compact --out "$OUT/dataset.npz"
$PY -m analysis.evaluate make-set --dataset "$OUT/dataset.npz" --num-sigmas 12 --sigma-min 0.002 --sigma-max 80 \
    --samples-per-sigma 256 --seed 1234 --out "$OUT/eval_set.npz" > /dev/null
$PY -m analysis.evaluate make-set --dataset "$OUT/dataset.npz" --num-sigmas "$DSTAR_SIGMAS" --sigma-min 0.002 \
    --sigma-max 80 --samples-per-sigma "$DSTAR_PER_SIGMA" --seed 1234 --out "$OUT/eval_set_small.npz" > /dev/null
measure "J* (cdol, $JSTAR_SIGMAS sigmas x $JSTAR_SAMPLES samples)" $PY -m analysis.optimal_loss \
    --dataset "$OUT/dataset.npz" --estimator cdol --num-sigmas "$JSTAR_SIGMAS" --sigma-min 0.002 --sigma-max 80 \
    --n-samples "$JSTAR_SAMPLES" --out "$OUT/cdol.csv"
measure "D* ($((DSTAR_SIGMAS * DSTAR_PER_SIGMA)) triples)" $PY -m analysis.optimal_loss denoise \
    --dataset "$OUT/dataset.npz" --eval-set "$OUT/eval_set_small.npz" --out "$OUT/eval_denoised_small.npy"

# a t0 snapshot to evaluate (64 images of training, straight from the memory-mapped file)
cat > "$OUT/study.yaml" <<YAML
study: memory
models: {t0: {arch: t0}}
training: {total_images: 64, batch_size: 32, lr_rampup_images: 0, lr_decay_images: 0, snapshots: {count: 1},
           log_every_images: 64}
YAML
measure "train (t0, 64 images)" $PY -m training.train --config "$OUT/study.yaml" --model t0 \
    --data "$OUT/dataset.npz" --out "$OUT/run" --no-progress
SNAP=$(ls "$OUT"/run/snapshots/snapshot-*.pt | tail -1)
$PY -c "import numpy as np, sys; m = len(np.load(sys.argv[1])['index']); \
np.save(sys.argv[2], np.zeros((m, $((RES * RES * 3))), np.float32))" "$OUT/eval_set.npz" "$OUT/zeros_denoised.npy"
measure "evaluate (3,072 triples)" $PY -m analysis.evaluate snapshot --snapshot "$SNAP" \
    --dataset "$OUT/dataset.npz" --eval-set "$OUT/eval_set.npz" --denoised "$OUT/zeros_denoised.npy" \
    --batch-size 512 --out "$OUT/eval.csv"

echo
echo "N = $N × ${RES}×${RES}×3 uint8 ($(du -h "$OUT/source.npy" | cut -f1) source, $(du -h "$OUT/dataset.npz" | cut -f1) dataset.npz), OMP threads $THREADS"
echo "| job | peak RSS | wall |"
echo "|---|---|---|"
printf '%s\n' "${ROWS[@]}"
