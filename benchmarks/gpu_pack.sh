#!/usr/bin/env bash
# Fill .gpu/ (ignored by git) with what benchmarks/gpu_check.sh needs on a machine without network:
# the JPEG-75 CIFAR-10 archive and AutoAttack's pure-Python package (from this machine's environment).
#
#   bash benchmarks/gpu_pack.sh [ARCHIVE.npz]     # default ../shared/data/cifar10_jpeg75.npz
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
archive="${1:-$here/../shared/data/cifar10_jpeg75.npz}"
py="${PYTHON:-$here/.venv/bin/python}"
[ -f "$archive" ] || { echo "gpu_pack: $archive not found (pass the JPEG-75 archive's path)" >&2; exit 2; }
mkdir -p "$here/.gpu/site"
cp "$archive" "$here/.gpu/cifar10_jpeg75.npz"
src="$("$py" -c 'import pathlib, pyautoattack; print(pathlib.Path(pyautoattack.__file__).parent)' 2>/dev/null || true)"
if [ -n "$src" ]; then
    rm -rf "$here/.gpu/site/pyautoattack"
    # the package's code only: its examples hold a 45 MB model file
    mkdir -p "$here/.gpu/site/pyautoattack"
    cp "$src"/*.py "$here/.gpu/site/pyautoattack/"
else
    echo "gpu_pack: pyautoattack is not installed here; the GPU check will run without AutoAttack" >&2
fi
du -sh "$here/.gpu"
echo "carry .gpu to the GPU machine beside the checkout, then: bash benchmarks/gpu_check.sh OUT_DIR"
