#!/usr/bin/env bash
# train.py on GPUs (issue 6): throughput and MFU per pattern, and ZeRO-3 + Ulysses at 128K. Results go to OUT
# (summary_MODE.json and table_MODE.txt, env_MODE.json, status_MODE.txt, logs_MODE.tar.gz with every run's
# log, metrics.jsonl and config.yaml); WORK (default a fresh /tmp folder) holds the run folders meanwhile.
#
#   bash bench/gpu_train.sh OUT 1gpu   # one H100/H200, ~5 min: the tiny default run; a Llama-3.2-1B-shaped
#                                      # model (random init, bf16, ZeRO-1, activation checkpointing) at 32K with
#                                      # the triton backend for full, power, sliding_window, stride_slash,
#                                      # dilated, longnet: tokens/s, MFU (sparse FLOPs as executed), memory
#   bash bench/gpu_train.sh OUT 2gpu   # two H200, ~5 min: the 1B shape with ZeRO-3 + SP=2 at 128K; and the
#                                      # loss curve of SP=2 (2 GPUs) against SP=1 (1 GPU) at 16K
#   bash bench/gpu_train.sh OUT long   # one GPU (H200: 139 GiB), ~8 min: +experiment=llama_128k on the 1B shape
#                                      # through launch/torchrun.sh (ZeRO-3, SP=1): power vs full at 128K and
#                                      # 256K, and power at 512K (the longest length that fits one GPU)
#
# Data: the built-in synthetic corpus with ~200K-token documents (so rows are single long documents and
# attention costs what it costs at the full length). Every run has its own time limit and is killed with all
# its processes when it passes it (bench/gpu_lib.sh); a failed or timed-out run is recorded in status and the
# script goes on. Checkpoints are off (benchmarks). bench/gpu_8b.sh runs the 2gpu checks beside the 8B runs.
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_lib.sh
MODE=${2:-1gpu}
bench_init "${1:?usage: bench/gpu_train.sh OUT 1gpu|2gpu|long}"
env_json "$OUT/env_$MODE.json"
TOK=$(default_tok)
trap 'pack "$MODE"' EXIT

if [ "$MODE" = 1gpu ]; then
    run tiny 90 python train.py logger=none "output_dir=$WORK/runs/tiny"
    names=()
    for p in full power sliding_window stride_slash dilated longnet; do
        run "1b_32k_$p" 65 python train.py "${ONE_B[@]}" "${BENCH_ARGS[@]}" "data.tokenizer=$TOK" $(docs 12 24000) \
            "pattern=$p" curriculum.stages.0.seq_len=32768 curriculum.stages.0.steps=6 batch.tokens_per_step=32768 \
            batch.micro_batch_tokens=32768 deepspeed=zero1 "output_dir=$WORK/runs/1b_32k_$p"
        names+=("1b_32k_$p")
    done
    summarize 1gpu --warmup 2 tiny "${names[@]}"
elif [ "$MODE" = 2gpu ]; then
    run_1b_sp2_128k
    run_1b_sp2_16k
    run_1b_sp1_16k 0
    summarize 2gpu --warmup 2 --compare sp2_16k sp1_16k sp2_128k sp2_16k sp1_16k
elif [ "$MODE" = long ]; then
    # Documents of ~530K tokens, so every row up to 512K is one document and attention costs its full length.
    long=("${ONE_B[@]}" "${BENCH_ARGS[@]}" "data.tokenizer=$TOK" data=default $(docs 6 64000) deepspeed=zero3
          parallel.sequence_parallel_size=1 checkpoint.every=0)
    names=()
    # Most expendable last: the call that runs this may stop at its own time limit.
    for spec in power:131072:3:120 full:131072:3:150 power:262144:3:120 power:524288:3:180 full:262144:2:220; do
        IFS=: read -r p len steps limit <<< "$spec"
        name="1b_$((len / 1024))k_$p"
        run "$name" "$limit" env NPROC=1 launch/torchrun.sh +experiment=llama_128k "${long[@]}" "pattern=$p" \
            curriculum.stages.0.seq_len="$len" curriculum.stages.0.steps="$steps" batch.tokens_per_step="$len" \
            batch.micro_batch_tokens="$len" "output_dir=$WORK/runs/$name"
        names+=("$name")
        summarize long --warmup 2 "${names[@]}" > /dev/null  # after each run: a cut-off call still has one
        pack long
    done
    cat "$OUT/table_long.txt"
else
    echo "unknown mode $MODE (1gpu | 2gpu | long)" >&2
    exit 2
fi
