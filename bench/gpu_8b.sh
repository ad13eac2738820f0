#!/usr/bin/env bash
# Llama-3-8B through train.py on two H200s (issue 17), in one command of under 8.5 minutes:
#  - a random-init Llama-3.1-8B-shaped HF folder (bench/make_random_hf.py: config.json with llama3 RoPE
#    scaling, 16 GB of bf16 safetensors shards + index, tokenizer.json) written to local disk;
#  - `+experiment=llama3_8b_128k model.path=<folder>` (ZeRO-3, Ulysses over both GPUs, power) for STEPS steps
#    at 64K and then at 128K in one run (one load), and `full` at 64K for the ratio;
#  - the two-GPU checks of `bench/gpu_train.sh OUT 2gpu` (Llama-3.2-1B shape: the loss curve of SP=2 against
#    SP=1 at 16K, ZeRO-3 + SP=2 at 128K);
#  - preemption and a changed GPU count (bench/gpu_lib.sh run_preempt_checks): the SP=2 16K run SIGTERMed after
#    its second step, resumed, and its checkpoint continued on one GPU.
# Per run and length: load time (from the log's timestamps), tokens/s, MFU, peak memory (torch, rank 0) and
# the most memory nvidia-smi saw on each GPU.
#
#   bash bench/gpu_8b.sh OUT    # OUT gets table_8b.txt (also printed), summary_8b.json, status_8b.txt,
#                               # env_8b.json, logs_8b.tar.gz (every log, metrics.jsonl, config.yaml)
#
# Time: BUDGET_S (default 490) for the whole script. Every run has its own limit, clipped to what is left, and
# is skipped when less than MIN_RUN_S would remain; the summary is rewritten after each run. In order:
#   1. the 8B folder on GPU 0 (background) while the 1B SP=1 16K run uses GPU 1
#   2. 8B power: 64K, then 128K
#   3. 1B SP=2 16K (its loss curve against 1.'s)
#   4. preemption, resume, the checkpoint on one GPU (their loss curves against 3.'s)
#   5. 1B ZeRO-3 + SP=2 at 128K
#   6. 8B full at 64K (the ratio; the most expendable)
# SKIP="sp2_128k 8b_full" leaves runs out (PREEMPT=0: the four runs of 4.); WITH_256K=1 adds, after 2., power at 256K with
# model.offload_activations and model.tiled_mlp=8192 (issue 16; predicted 76.5 GiB per GPU, 128 without).
# MODEL_DIR (default /tmp/powerattn_llama3_8b) receives the folder, never OUT. A CPU rehearsal of the script's logic (tests/test_gpu_8b.py): DS_ACCELERATOR=cpu SHAPE=tiny
# SHORT=256 LONG=512 ONLY_8B=1 EXTRA='model.arch=null pattern.block_size=64 precision=fp32'.
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_lib.sh
bench_init "${1:?usage: bench/gpu_8b.sh OUT}"
DEADLINE=$(( $(date +%s) + ${BUDGET_S:-490} ))
STEPS=${STEPS:-3}
SHAPE=${SHAPE:-llama3_8b}
SHORT=${SHORT:-65536}
LONG=${LONG:-131072}
MODEL_DIR=$(realpath -m "${MODEL_DIR:-/tmp/powerattn_llama3_8b}")
read -r -a EXTRA <<< "${EXTRA:-}"
env_json "$OUT/env_8b.json"
trap 'pack 8b' EXIT
NAMES=(make_hf 8b_power 8b_full)
[ -z "${WITH_256K:-}" ] || NAMES+=(8b_256k_switched)
[ -n "${ONLY_8B:-}" ] || NAMES+=(sp1_16k sp2_16k preempt preempt_resume one_gpu_refused one_gpu_weights sp2_128k)
report() {
    summarize 8b --compare sp2_16k sp1_16k --compare preempt sp2_16k --compare one_gpu_weights sp2_16k \
        "${NAMES[@]}" > /dev/null
    pack 8b
}

# 1. The folder (GPU 0), while the 1B SP=1 run has GPU 1.
rm -rf "$MODEL_DIR"
run make_hf 150 env CUDA_VISIBLE_DEVICES=0 bash -c "python bench/make_random_hf.py --shape $SHAPE --rope llama3.1 \
    --out $MODEL_DIR > $WORK/make_hf.json" &
folder=$!
if [ -z "${ONLY_8B:-}" ]; then
    TOK=$(default_tok)
    run_1b_sp1_16k 1 150
fi
wait "$folder"
report

# 2-6. train.py runs; one row of one long document per step (documents of ~560K tokens).
EIGHT_B=(+experiment=llama3_8b_128k "model.path=$MODEL_DIR" data=default "data.tokenizer=$MODEL_DIR" ++data.num_proc=6
         $(docs 6 64000) "${BENCH_ARGS[@]}" checkpoint.every=0 "batch.tokens_per_step=$LONG"
         "batch.micro_batch_tokens=$(( LONG / 2 ))" "${EXTRA[@]}")
if [ -f "$MODEL_DIR/config.json" ]; then
    run 8b_power 280 "${torchrun2[@]}" "${EIGHT_B[@]}" pattern=power "$(stages "$SHORT" "$LONG")" \
        "output_dir=$WORK/runs/8b_power"
else
    echo "8b_power skipped (no model folder)" | tee -a "$WORK/status.txt"
fi
report
if [ -n "${WITH_256K:-}" ] && [ -f "$MODEL_DIR/config.json" ]; then  # issue 16: the memory switches at 256K
    run 8b_256k_switched 240 "${torchrun2[@]}" "${EIGHT_B[@]}" pattern=power "$(stages $(( 2 * LONG )))" \
        "batch.tokens_per_step=$(( 2 * LONG ))" "batch.micro_batch_tokens=$LONG" model.offload_activations=true \
        model.tiled_mlp=8192 "output_dir=$WORK/runs/8b_256k_switched"
    report
fi
if [ -z "${ONLY_8B:-}" ]; then
    run_1b_sp2_16k 120
    report
    if [ "${PREEMPT:-1}" != 0 ]; then
        run_preempt_checks
        report
    fi
    run_1b_sp2_128k 180
    report
fi
if [ -f "$MODEL_DIR/config.json" ]; then
    run 8b_full 220 "${torchrun2[@]}" "${EIGHT_B[@]}" pattern=full "$(stages "$SHORT")" "output_dir=$WORK/runs/8b_full"
fi
report
cat "$OUT/table_8b.txt"
echo "total $(( $(date +%s) - DEADLINE + ${BUDGET_S:-490} ))s of ${BUDGET_S:-490}s; results in $OUT"
