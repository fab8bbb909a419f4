#!/usr/bin/env bash
# Fill .gpu/ (ignored by git) with what benchmarks/gpu_check.sh needs on a machine without network:
# the JPEG-75 CIFAR-10 archive (its first 1,000 test images) and AutoAttack's pure-Python package (from this
# machine's environment).
#
#   bash benchmarks/gpu_pack.sh [ARCHIVE.npz]     # default ../shared/data/cifar10_jpeg75.npz
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
archive="${1:-$here/../shared/data/cifar10_jpeg75.npz}"
py="${PYTHON:-$here/.venv/bin/python}"
[ -f "$archive" ] || { echo "gpu_pack: $archive not found (pass the JPEG-75 archive's path)" >&2; exit 2; }
mkdir -p "$here/.gpu/site"
# all 50,000 training images and the first 1,000 test images (all the kit evaluates): 8 MB less to carry
"$py" - "$archive" "$here/.gpu/cifar10_jpeg75.npz" <<'PY'
import sys
import numpy as np

z, n = np.load(sys.argv[1]), 1000
cut = int(z["test_offsets"][n])
np.savez(sys.argv[2], **{k: z[k] for k in ("train_offsets", "train_jpeg", "train_labels")},
         test_offsets=z["test_offsets"][:n + 1], test_jpeg=z["test_jpeg"][:cut], test_labels=z["test_labels"][:n])
PY
src="$("$py" -c 'import pathlib, pyautoattack; print(pathlib.Path(pyautoattack.__file__).parent)' 2>/dev/null || true)"
if [ -n "$src" ]; then
    rm -rf "$here/.gpu/site/pyautoattack"
    # the package's code only: its examples hold a 45 MB model file
    mkdir -p "$here/.gpu/site/pyautoattack"
    cp "$src"/*.py "$here/.gpu/site/pyautoattack/"
else
    echo "gpu_pack: pyautoattack is not installed here; the GPU check will run without AutoAttack" >&2
fi
# the device machine takes the checkout (tracked and untracked, not ignored files) and .gpu: 64 MiB in all
tree=$(cd "$here" && { git ls-files -z; git ls-files -z --others --exclude-standard; } \
       | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
packed=$(du -sb "$here/.gpu" | cut -f1)
limit=$((64 * 1024 * 1024))
echo "to carry: $((tree + packed)) bytes (checkout $tree, .gpu $packed) of at most $limit"
if [ $((tree + packed)) -gt $limit ]; then
    echo "gpu_pack: that is over the device machine's 64 MiB; remove untracked files or large results first" >&2
    exit 1
fi
echo "carry .gpu to the GPU machine beside the checkout, then: bash benchmarks/gpu_check.sh OUT_DIR"
