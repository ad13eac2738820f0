#!/usr/bin/env bash
# Single node: one training process per GPU through torchrun. Arguments go to train.py (Hydra overrides).
#
#   launch/torchrun.sh +experiment=llama_128k
#   NPROC=4 launch/torchrun.sh +experiment=paper_qwen2_32k parallel.sequence_parallel_size=4
#
# NPROC: processes (default: the GPUs nvidia-smi lists, else 1). Running the same command again resumes
# from the run's latest checkpoint (resume=auto). Ctrl-C stops at once; `kill -TERM <torchrun pid>` or
# `touch <output_dir>/STOP` checkpoints after the current step and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${NPROC:-$(nvidia-smi -L 2>/dev/null | wc -l || true)}
[ "${NPROC:-0}" -ge 1 ] || NPROC=1
exec python -m torch.distributed.run --standalone --nproc_per_node "$NPROC" train.py "$@"
