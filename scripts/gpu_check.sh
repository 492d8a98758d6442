#!/usr/bin/env bash
# The GPU check of issue 20 (docs/gpu.md): every stage on one CUDA device, a pass/fail table, <= 8 minutes.
#
#   scripts/gpu_check.sh                 # CUDA (torchrun on nccl)
#   scripts/gpu_check.sh --device cpu    # the dry run: the same steps on the CPU with gloo
#
# Works on a machine with a preinstalled CUDA torch and no network: nanoseek is imported from this checkout through
# PYTHONPATH (no pip install, no native kernel build: NANOSEEK_KERNELS=off). Packages the machine lacks can travel as
# wheels in .whl/ (scripts/gpu_wheels.sh downloads them where pip has a network); they are installed into /tmp/site.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec timeout 570 "$PY" scripts/gpu_check.py "$@"
