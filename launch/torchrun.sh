#!/usr/bin/env bash
# Single node: one training process per GPU through torchrun. Arguments go to train.py (Hydra overrides).
#
#   launch/torchrun.sh +experiment=llama_128k
#   NPROC=4 launch/torchrun.sh +experiment=paper_qwen2_32k parallel.sequence_parallel_size=4
#
# NPROC: processes (default: the GPUs nvidia-smi lists, else 1). Running the same command again resumes
# from the run's latest checkpoint (resume=auto). Ctrl-C stops at once; `kill -TERM <pid of this script>`
# (or SIGUSR1, or `touch <output_dir>/STOP`) makes every rank finish its step and write one checkpoint,
# and the script exits 0. The signal goes to the training processes, not to torchrun: torchrun would
# report it as a failure and SIGKILL workers still checkpointing after its --shutdown-timeout.
set -euo pipefail
cd "$(dirname "$0")/.."
# Expandable segments: fewer out-of-memory failures from fragmentation when allocation sizes change (long
# sequences, curriculum stages). Set PYTORCH_CUDA_ALLOC_CONF yourself to choose otherwise.
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
NPROC=${NPROC:-$(nvidia-smi -L 2>/dev/null | wc -l || true)}
[ "${NPROC:-0}" -ge 1 ] || NPROC=1

pending=""  # a SIGTERM / SIGUSR1 received, not yet passed on to the training processes
trap 'pending=TERM' TERM
trap 'pending=USR1' USR1

# The config, the paths it names and the checkpoint a resume would take, checked once for NPROC
# processes: a mistake is one line here, not one per rank inside torchrun's failure report.
WORLD_SIZE=$NPROC LOCAL_WORLD_SIZE=$NPROC python train.py "$@" check_only=true
if [ -n "$pending" ]; then
    echo "stopped by SIG$pending before training started"
    exit 0
fi

python -m torch.distributed.run --standalone --nproc_per_node "$NPROC" train.py "$@" &
TORCHRUN=$!
status=""
while [ -z "$status" ]; do
    if [ -n "$pending" ]; then  # pass the signal on to the workers (once torchrun has started them)
        workers=$(cat /proc/"$TORCHRUN"/task/*/children 2>/dev/null || true)
        if [ -n "$workers" ]; then
            kill -s "$pending" $workers 2>/dev/null || true
            pending=""
        else
            sleep 1
        fi
        kill -0 "$TORCHRUN" 2>/dev/null || { wait "$TORCHRUN" && status=0 || status=$?; }
        continue
    fi
    wait "$TORCHRUN" && status=0 || status=$?
    kill -0 "$TORCHRUN" 2>/dev/null && status=""  # `wait` was interrupted by a trapped signal
done
exit "$status"
