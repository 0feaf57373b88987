#!/usr/bin/env bash
# The GPU check (issue 10): one script, under ten minutes (run it with timeout_s 600)
# and about five when all goes well, on a machine with a CUDA
# device. It installs only what it carries, probes the machine, builds ext/ there, runs
# the tests marked `gpu`, then `python -m bench.gpu` (table, goal lines, gpu.json).
#
#   bash bench/gpu_check.sh --fetch-wheels    here, with network: the wheels the GPU
#                                             image lacks (pyzmq), into .whl/ (ignored)
#   bash bench/gpu_check.sh                   there: everything else; logs and JSON go
#                                             to $OUT (the device tool's), else
#                                             bench/results/gpu/
#
# The GPU machine's image has Python 3.12, CUDA 13, CuPy, PyTorch, ONNX and ONNX Runtime
# (CPU), Cython and a compiler, and no network; it lacks pyzmq, which travels as a wheel.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
WHEELS=.whl
PYZMQ=pyzmq==27.1.0

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    exec "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$WHEELS" "$PYZMQ"
fi

OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
step() { echo "== $* ($(date +%T))"; }

if compgen -G "$WHEELS/*.whl" > /dev/null; then
    step "installing carried wheels"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$WHEELS"/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi

step "probe"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee "$OUT/nvidia-smi.txt"
"$PY" - <<'EOF' 2>&1 | tee "$OUT/probe.txt"
from bench.gpu import probe
import json
print(json.dumps(probe(), indent=1))
EOF

step "building ext/"
timeout 150 "$PY" setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1 \
    || { echo "ext/ did not build (the pure-Python twins stand in):"; tail -20 "$OUT/build.log"; }
"$PY" -c "import ext; print('ext:', ext.IMPLEMENTATIONS)"

step "tests marked gpu"
timeout 120 "$PY" -m pytest -q -m gpu -p no:cacheprovider -o addopts="" \
    tests/test_gpu_pools.py tests/test_engines.py tests/test_torch_engine.py tests/test_tensorrt.py 2>&1 \
    | tee "$OUT/pytest_gpu.log" | tail -25

step "bench.gpu"
timeout 270 "$PY" -m bench.gpu --quick --out "$OUT" 2>&1 | tee "$OUT/bench_gpu.log" | tail -40
step "done"
