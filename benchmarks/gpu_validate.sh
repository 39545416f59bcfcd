#!/usr/bin/env bash
# One prepared validation of a GPU machine (benchmarks/gpu_validate.py): every paper model's training step under
# DDP and ZeRO-2, ZeRO-2 vs DDP parity, a short study through snakemake, D* at ImageNet-64's dimension; writes
# results/gpu-validate/{report.md,results.csv}. From the repository root, in its environment:
#   bash benchmarks/gpu_validate.sh                   # one GPU, ≤ 8 minutes
#   bash benchmarks/gpu_validate.sh --cpu-rehearsal   # tiny sizes on the CPU (≤ 3 minutes; CI runs it)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" benchmarks/gpu_validate.py "$@"
