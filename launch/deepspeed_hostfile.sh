#!/usr/bin/env bash
# Multi-node without SLURM: DeepSpeed's launcher starts one process per GPU on every host of a hostfile
# over ssh (pdsh when installed). Needs passwordless ssh between the hosts, this repository and its
# Python environment at the same path on each, and an output folder they share.
#
#   HOSTFILE=launch/hostfile launch/deepspeed_hostfile.sh +experiment=llama_128k
#
# HOSTFILE: lines of `hostname slots=<GPUs>` (see launch/hostfile.example); the first host is the master.
# PORT: rendezvous port (default 29500). --no_local_rank: train.py reads LOCAL_RANK from the environment.
set -euo pipefail
cd "$(dirname "$0")/.."
# Expandable segments: fewer out-of-memory failures from fragmentation when allocation sizes change (long
# sequences, curriculum stages). Set PYTORCH_CUDA_ALLOC_CONF yourself to choose otherwise. DeepSpeed passes
# only some variables to other hosts: for them, a line PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True in
# ./.deepspeed_env (or ~/.deepspeed_env).
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
: "${HOSTFILE:?set HOSTFILE to a hostfile (see launch/hostfile.example)}"
exec deepspeed --hostfile "$HOSTFILE" --master_port "${PORT:-29500}" --no_local_rank train.py "$@"
