#!/usr/bin/env bash
# The CUDA checks on a GPU machine, from a source tree, with the machine's own torch:
#   bash bench/cuda_check.sh [tests|decode|all] [extra args for offload bench decode]
# Builds the C++ extension in place, runs tests/cuda and the CUDA-relevant suites, then the decode
# benchmark on the GPU (real PCIe link, transformers' offloaded cache as (a)). Logs and results go
# to $OUT (default bench/results/cuda). Wheels in .whl/ (e.g. transformers 5.23) are installed
# first into /tmp/site when present: GPU images often carry an older transformers.
set -uo pipefail
what=${1:-all}
shift || true
OUT=${OUT:-bench/results/cuda}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    $PY -c "import torch, transformers, numba; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0)); print('transformers', transformers.__version__, 'numba', numba.__version__)"
    nproc; uptime
} 2>&1 | tee "$OUT/env.txt"
$PY setup.py -q build_ext --inplace >"$OUT/build.log" 2>&1 || echo "C++ extension build failed (see build.log)"
$PY -c "from offload.kernels import available_kernels; print('kernels', available_kernels())" | tee -a "$OUT/env.txt"
status=0
if [[ $what == tests || $what == all ]]; then
    timeout=$($PY -c "import pytest_timeout" 2>/dev/null && echo --timeout=300)
    $PY -m pytest -q -p no:cacheprovider $timeout tests/cuda 2>&1 | tee "$OUT/tests_cuda.log" || status=1
fi
if [[ $what == decode || $what == all ]]; then
    $PY -m offload.bench decode --device cuda --out "$OUT/decode_cuda" "$@" 2>&1 | tee "$OUT/decode.log" || status=1
fi
exit $status
