#!/usr/bin/env bash
# CPU-sized comparison of PGD-AT (eps 8/255) and IAAT on CIFAR-10: small CNN, a 4,000-image
# class-balanced subset, 10 epochs each, then clean and PGD-20 accuracy on the first 1,000 test images.
# About 20 minutes on 2 CPU cores.   usage: benchmarks/cpu_iaat_vs_pgd_at.sh DATA_DIR [OUT_DIR]
set -euo pipefail
DATA=${1:?usage: $0 DATA_DIR [OUT_DIR]}
OUT=${2:-runs/cpu-iaat-vs-pgd_at}
IAAT=${IAAT:-iaat}
COMMON=(--data-dir "$DATA" --train-subset 4000 --epochs 10 --device cpu --no-progress --seed 0)
$IAAT train --config configs/cifar10_small_cnn_cpu.yaml "${COMMON[@]}" --out "$OUT/pgd_at"
$IAAT train --config configs/cifar10_small_cnn_iaat_cpu.yaml "${COMMON[@]}" --out "$OUT/iaat"
for run in pgd_at iaat; do
  $IAAT eval "$OUT/$run" --n 1000 --steps 20 --eps 8 --no-progress --out "$OUT/$run/eval-test1000-pgd20.json"
done
