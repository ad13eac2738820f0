#!/usr/bin/env bash
# Wheels for a GPU machine with no package index (Python 3.12, x86-64, torch/triton/transformers already
# there: 2.11 / 3.6 / 5.17 with tokenizers, safetensors and regex): what train.py, eval.py and the bench
# scripts import beyond that image, into .whl/ (gitignored). liger-kernel (model.fused_ops, bench/vs_hf.py)
# is pure Python and needs only torch and triton.
# Built once here, carried to the device, installed there with
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
# Versions are the ones this repo's CPU environment resolved; datasets 5.2 needs pyarrow >= 24 and
# huggingface_hub >= 1.31, newer than some images have. ~58 MB, under a 64 MiB transfer limit.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-.whl}
mkdir -p "$OUT"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 any; do
    platforms+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$OUT" \
    hydra-core==1.3.8 omegaconf==2.3.1 hjson==3.1.0 pydantic==2.13.4 pydantic_core==2.46.4 \
    annotated-types==0.7.0 typing-inspection==0.4.2 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
    pyarrow==24.0.0 huggingface-hub==1.31.0 liger-kernel==0.8.5
# Source-only packages become wheels here (DeepSpeed compiles its ops just in time on the device).
python3 -m pip wheel -q --no-deps -w "$OUT" antlr4-python3-runtime==4.9.3 deepspeed==0.19.8
ls "$OUT" | wc -l | xargs echo "wheels in $OUT:"
