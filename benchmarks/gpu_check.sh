#!/usr/bin/env bash
# Every owed GPU figure in one command on a bare GPU machine (see benchmarks/gpu_check.py for the stages).
#
#   bash benchmarks/gpu_check.sh OUT_DIR [--budget SECONDS] [--data FILE.npz] [--stages env speed paper late]
#   bash benchmarks/gpu_check.sh OUT2 --stages late --budget SECONDS   # a second command: torch.compile's checks
#   bash benchmarks/gpu_check.sh OUT_DIR --smoke      # CPU dry run of every stage (tiny data and models)
#
# Nothing is downloaded or installed system-wide: the package runs from src/ and the tests from tests/;
# what benchmarks/gpu_pack.sh put in .gpu/ comes along (the data archive, .gpu/site on the import path for
# pure-Python extras such as pyautoattack, wheels in .gpu/wheels installed offline into /tmp).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
py="${PYTHON:-}"
if [ -z "$py" ]; then
    if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
fi
extra=""
if compgen -G ".gpu/wheels/*.whl" >/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/iaat-site \
        .gpu/wheels/*.whl
    extra="/tmp/iaat-site"
fi
[ -d .gpu/site ] && extra="${extra:+$extra:}$here/.gpu/site"
export PYTHONPATH="$here/src${extra:+:$extra}${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
exec "$py" benchmarks/gpu_check.py "$@"
