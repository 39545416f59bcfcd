#!/usr/bin/env bash
# The device checks, as one run on a GPU machine (each step's output also lands in $OUT):
#   1. the CUDA tests of the estimator (screened and unscreened D* against the float64 reference),
#   2. bench: the optimal-loss benchmark at CIFAR-10 shape, σ = 1, with the naive versions, cDOL and the
#      amortised (steady-state) cost,
#   3. profile: where the exact estimator's GPU time goes (torch.profiler), σ = 1,
#   4. sweep: the exact estimator with and without the screen at σ = 0.01 and 10,
#   5. train: the EDM2 family's training throughput and MFU, xs … xxl, bf16 autocast.
# Usage (repo root, on the GPU machine):  STEPS="tests bench profile sweep train" bash benchmarks/gpu_checks.sh
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_checks}
STEPS=${STEPS:-tests bench profile sweep train}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/card.txt"
$PY -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name(0))" | tee -a "$OUT/card.txt"
if [[ $STEPS == *tests* ]]; then
  echo "== CUDA tests"
  $PY -m pytest -q -p no:cacheprovider tests/test_optimal_loss.py -k cuda 2>&1 | tail -15 | tee "$OUT/tests_cuda.txt"
fi
if [[ $STEPS == *bench* ]]; then
  echo "== optimal-loss benchmark"
  $PY benchmarks/bench_optimal_loss.py --device cuda --repeats 5 --amortised 16 2>&1 | tee "$OUT/bench_optimal_loss.txt"
fi
if [[ $STEPS == *profile* ]]; then
  echo "== profile"
  $PY benchmarks/profile_optimal_loss.py --device cuda --rows 12 2>&1 | tee "$OUT/profile_optimal_loss.txt" | cut -c1-150
fi
if [[ $STEPS == *sweep* ]]; then
  for s in 0.01 10; do
    $PY benchmarks/bench_optimal_loss.py --device cuda --repeats 5 --sigma $s --skip-naive --skip-cdol 2>&1 \
      | tee -a "$OUT/bench_optimal_loss.txt"
  done
fi
if [[ $STEPS == *train* ]]; then
  echo "== training throughput"
  $PY benchmarks/bench_train_gpu.py --sizes xs,s,m,l,xl,xxl --batch ${TRAIN_BATCH:-128} --steps 8 --warmup 3 2>&1 \
    | tee "$OUT/bench_train_gpu.txt"
fi
