#!/usr/bin/env bash
# CPU-sized comparison of training methods on CIFAR-10 with identical data, model, schedule and
# evaluation: small CNN, a fixed class-balanced 4,000-image subset, 10 epochs, seed 0, then clean and
# PGD-20 (eps 8/255, step 1/255 = 2.5*eps/20, pinned: the default of 20 steps is now eps/4) accuracy on the first
# 1,000 test images.
# Each method uses configs/cifar10_small_cnn_<method>_cpu.yaml (pgd_at: cifar10_small_cnn_cpu.yaml).
# Finished runs are skipped, so the script can be re-run to add methods.
#   usage: benchmarks/cpu_compare.sh DATA_DIR OUT_DIR METHOD...
#   e.g.   benchmarks/cpu_compare.sh ~/data runs/cpu pgd_at iaat gairat gair_fat trades mixup_at
set -euo pipefail
DATA=${1:?usage: $0 DATA_DIR OUT_DIR METHOD...}
OUT=${2:?usage: $0 DATA_DIR OUT_DIR METHOD...}
shift 2
IAAT=${IAAT:-iaat}
for method in "$@"; do
  config=configs/cifar10_small_cnn_${method}_cpu.yaml
  [ "$method" = pgd_at ] && config=configs/cifar10_small_cnn_cpu.yaml
  run="$OUT/$method"
  if [ ! -f "$run/summary.json" ]; then
    if [ -d "$run" ]; then resume=(--resume); else resume=(--config "$config"); fi
    $IAAT train "${resume[@]}" --data-dir "$DATA" --train-subset 4000 --epochs 10 --device cpu --no-progress \
      --seed 0 --out "$run"
  fi
  [ -f "$run/eval-test1000-pgd20.json" ] || \
    $IAAT eval "$run" --n 1000 --steps 20 --step-size 1 --eps 8 --device cpu --no-progress --out "$run/eval-test1000-pgd20.json"
done
