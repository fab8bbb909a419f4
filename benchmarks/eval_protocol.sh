#!/usr/bin/env bash
# The whole evaluation protocol on the CPU-sized PGD-AT model of cpu_compare.sh: first 1,000 test images,
# `--protocol full` (PGD-10 x5, PGD-100 x5, PGD-1000 x2, CW-40, MI-FGSM, DeepFool, targeted PGD-100,
# AutoAttack standard, eps sweep 0-16/255, steps sweep 1-1000, sanity checks), a transfer attack from an
# independently trained copy (same recipe, seed 1), and generated corruptions.
#   usage: benchmarks/eval_protocol.sh DATA_DIR RUNS_DIR OUT_JSON
#   e.g.   benchmarks/eval_protocol.sh ~/data runs/cpu benchmarks/results/eval-protocol-cpu.json
# RUNS_DIR/pgd_at must exist (cpu_compare.sh DATA_DIR RUNS_DIR pgd_at); the surrogate is trained if missing.
# Re-running resumes an interrupted evaluation.
set -euo pipefail
DATA=${1:?usage: $0 DATA_DIR RUNS_DIR OUT_JSON}
RUNS=${2:?usage: $0 DATA_DIR RUNS_DIR OUT_JSON}
OUT=${3:?usage: $0 DATA_DIR RUNS_DIR OUT_JSON}
IAAT=${IAAT:-iaat}
if [ ! -f "$RUNS/pgd_at_seed1/summary.json" ]; then
  if [ -d "$RUNS/pgd_at_seed1" ]; then resume=(--resume); else resume=(--config configs/cifar10_small_cnn_cpu.yaml); fi
  $IAAT train "${resume[@]}" --data-dir "$DATA" --train-subset 4000 --epochs 10 --device cpu --no-progress \
    --seed 1 --out "$RUNS/pgd_at_seed1"
fi
start=$(date +%s)
$IAAT eval "$RUNS/pgd_at" --protocol full --surrogate "$RUNS/pgd_at_seed1" --corruptions generated --n 1000 \
  --device cpu --no-progress --out "$OUT"
echo "evaluation wall time: $(( $(date +%s) - start )) s"
