#!/usr/bin/env bash
# One GPU session in one command: correctness first (the `gpu` tests), then the kernel benchmark.
# Usage (on a CUDA machine, from the repo root): bash bench/gpu_check.sh OUT_DIR [bench/kernels.py args...]
set -uo pipefail
out=${1:?usage: bench/gpu_check.sh OUT_DIR [bench args]}; shift
mkdir -p "$out"
export PYTHONUNBUFFERED=1 POWERATTN_CACHE="$out/cache"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -x -q -m gpu tests/test_kernels.py tests/test_backends.py 2>&1 \
  | tee "$out/tests.log" | tail -n 25
echo "tests exit: ${PIPESTATUS[0]}"
timeout "${BENCH_TIMEOUT:-400}" python3 bench/kernels.py --out "$out" "$@" 2>&1 | tee "$out/bench.log" | grep -v '^{'
