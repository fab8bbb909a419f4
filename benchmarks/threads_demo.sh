#!/usr/bin/env bash
# CPU threads on a quiet and on a busy machine: `iaat demo --epochs 2` with PyTorch's default thread count
# (all cores: --threads $(nproc)) against iaat's default (all cores, or 1 when the 1-minute load average is at
# least the number of cores), first on the machine as it is, then beside BUSY busy-loop processes.
#
#   benchmarks/threads_demo.sh [OUT.md] [BUSY]      (default benchmarks/results/threads-demo-cpu.md, 5)
#
# Run it on an otherwise idle machine: the "quiet" rows wait for a 1-minute load below 1.
set -euo pipefail
out=${1:-benchmarks/results/threads-demo-cpu.md}
busy=${2:-5}
iaat=${IAAT:-iaat}
cores=$(nproc)
unset OMP_NUM_THREADS
work=$(mktemp -d)
loaders=()
trap 'kill "${loaders[@]}" 2>/dev/null || true; rm -rf "$work"' EXIT

load() { cut -d' ' -f1 /proc/loadavg; }
wait_load() {  # wait_load below|above LIMIT
    until awk -v l="$(load)" -v lim="$2" -v w="$1" 'BEGIN { exit !((w == "below") ? l < lim : l >= lim) }'; do
        sleep 5
    done
}
measure() {  # measure LABEL [--threads N]
    local label=$1; shift
    local start end
    start=$(date +%s.%N)
    "$iaat" demo --epochs 2 --out "$work/$label" "$@" > "$work/$label.log" 2>&1
    end=$(date +%s.%N)
    printf '| %s | %s | %.1f s |\n' "$label" "$(load)" "$(echo "$end - $start" | bc)" >> "$out"
}

{
    echo "# iaat demo --epochs 2: PyTorch's default threads against iaat's default"
    echo
    echo "$(date -u +%Y-%m-%d), $(nproc)-core $(uname -m) CPU, $(python -c 'import torch; print("torch", torch.__version__)'),"
    echo "busy = $busy \`yes > /dev/null\` processes beside it. Command: benchmarks/threads_demo.sh $*"
    echo
    echo "| run | 1-minute load after it | wall time |"
    echo "|---|---|---|"
} > "$out"
wait_load below 1
measure "quiet, --threads $cores (PyTorch's default)" --threads "$cores"
wait_load below 1
measure "quiet, iaat's default"
for _ in $(seq "$busy"); do yes > /dev/null & loaders+=($!); done
wait_load above "$cores"
measure "busy, --threads $cores (PyTorch's default)" --threads "$cores"
measure "busy, iaat's default"
grep -h "machine is busy" "$work"/*.log | head -1 | sed 's/^/note printed: /' >> "$out" || true
cat "$out"
