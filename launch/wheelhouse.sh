#!/usr/bin/env bash
# Offline install for air-gapped GPU nodes. On a machine with internet and the same OS, CPU architecture,
# Python and CUDA as the nodes, with torch already installed (DeepSpeed's source package builds against it):
#
#   launch/wheelhouse.sh [WHEEL_DIR]                  # default WHEEL_DIR=wheelhouse
#   TORCH_INDEX=https://download.pytorch.org/whl/cu126 launch/wheelhouse.sh
#
# then copy WHEEL_DIR to the nodes and install with no index:
#
#   pip install --no-index --find-links WHEEL_DIR 'powerattn[test]'
#
# The folder holds wheels of powerattn, torch (from TORCH_INDEX, default CUDA 12.6 builds), DeepSpeed
# (built here from its source package, ops compiled just in time on the nodes) and everything else.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-wheelhouse}
TORCH_INDEX=${TORCH_INDEX:-https://download.pytorch.org/whl/cu126}
PY=${PYTHON:-python}
mkdir -p "$OUT"
"$PY" -m pip wheel --no-deps --wheel-dir "$OUT" .
"$PY" -m pip download --dest "$OUT" --extra-index-url "$TORCH_INDEX" ".[test]"
# Source packages (DeepSpeed ships one) become wheels; no build isolation so they see the installed torch.
shopt -s nullglob
for sdist in "$OUT"/*.tar.gz; do
    "$PY" -m pip wheel --no-deps --no-build-isolation --wheel-dir "$OUT" "$sdist" && rm "$sdist"
done
echo "wheelhouse ready: $(ls "$OUT" | wc -l) files in $OUT"
echo "on the nodes: pip install --no-index --find-links $OUT 'powerattn[test]'"
