#!/usr/bin/env bash
# The length frontier of the Llama-3-8B shape on two H200s (issue 16), in one command of under 9 minutes.
# Random init (model.path=null: memory and speed do not depend on the weights), power, ZeRO-3, Ulysses SP=2,
# one row of one long document per step, so attention costs what it costs at the full length. In order:
#   1. 8b_switched:     model.offload_activations=true model.tiled_mlp=8192, STEPS steps at each of LENGTHS
#                       (default 128K 256K 512K) in one run (one start-up)
#   2. 8b_offload_128k: the activation offload alone at 128K  } what each switch saves on its own, beside
#   3. 8b_tiled_128k:   the tiled MLP alone at 128K            } gpu_8b.sh's 128K run with neither
#   4. 8b_full_64k:     full attention at 64K (the ratio to gpu_8b.sh's power at 64K; the most expendable)
# (2. and 3. run at the first of LENGTHS and are named by it, 4. at SHORT.)
# Beside them, OUT/plan_frontier.txt: the memory planner's prediction of each (python -m powerattn.memory).
#
#   BUDGET_S=540 bash bench/gpu_frontier.sh OUT   # OUT: table_frontier.txt (also printed), summary_frontier.json,
#                                                 # plan_frontier.txt, status_frontier.txt, env_frontier.json,
#                                                 # logs_frontier.tar.gz
# BUDGET_S, SKIP, MIN_RUN_S as in bench/gpu_lib.sh; EXTRA: more overrides for every run (a CPU rehearsal:
# DS_ACCELERATOR=cpu LENGTHS="256 512" SHORT=256 EXTRA="model.arch.hidden_size=64 ... precision=fp32").
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_lib.sh
bench_init "${1:?usage: bench/gpu_frontier.sh OUT}"
DEADLINE=$(( $(date +%s) + ${BUDGET_S:-540} ))
STEPS=${STEPS:-3}
read -r -a LENGTHS <<< "${LENGTHS:-131072 262144 524288}"
LONG=${LENGTHS[0]}
SHORT=${SHORT:-65536}
read -r -a EXTRA <<< "${EXTRA:-}"
env_json "$OUT/env_frontier.json"
trap 'pack frontier' EXIT
K=$(( LONG / 1024 ))k
NAMES=(8b_switched "8b_offload_$K" "8b_tiled_$K" "8b_full_$(( SHORT / 1024 ))k")
report() {
    summarize frontier "${NAMES[@]}" > /dev/null
    pack frontier
}

TOK=$(default_tok)
BIGGEST=0
for len in "${LENGTHS[@]}"; do [ "$len" -le "$BIGGEST" ] || BIGGEST=$len; done
EIGHT_B=(+experiment=llama3_8b_128k model.path=null data=default "data.tokenizer=$TOK" ++data.num_proc=6
         $(docs 2 $(( BIGGEST / 8 + 4000 ))) "${BENCH_ARGS[@]}" checkpoint.every=0 "${EXTRA[@]}")
SWITCHED=(model.offload_activations=true model.tiled_mlp=8192)
rows() {  # seq_len: one row per step and per micro-batch (micro_batch_tokens counts one GPU's share, SP=2)
    echo "batch.tokens_per_step=$1" "batch.micro_batch_tokens=$(( $1 / 2 ))"
}

plan() {  # NAME OVERRIDES...: the planner's prediction for the run, appended to OUT/plan_frontier.txt
    local name=$1
    shift
    { echo "== $name"; LOCAL_WORLD_SIZE=2 python -m powerattn.memory --gpus 2 --gpu-mem 139.8 "$@"; } \
        >> "$OUT/plan_frontier.txt" 2>&1
}
: > "$OUT/plan_frontier.txt"
plan 8b_switched "${EIGHT_B[@]}" "${SWITCHED[@]}" "$(stages "${LENGTHS[@]}")" $(rows "$BIGGEST")
plan "8b_offload_$K" "${EIGHT_B[@]}" model.offload_activations=true "$(stages "$LONG")" $(rows "$LONG")
plan "8b_tiled_$K" "${EIGHT_B[@]}" model.tiled_mlp=8192 "$(stages "$LONG")" $(rows "$LONG")
plan "8b_neither_$K" "${EIGHT_B[@]}" "$(stages "$SHORT" "$LONG")" $(rows "$LONG")

run 8b_switched 330 "${torchrun2[@]}" "${EIGHT_B[@]}" "${SWITCHED[@]}" "$(stages "${LENGTHS[@]}")" \
    $(rows "$BIGGEST") "output_dir=$WORK/runs/8b_switched"
report
run "${NAMES[1]}" 120 "${torchrun2[@]}" "${EIGHT_B[@]}" model.offload_activations=true "$(stages "$LONG")" \
    $(rows "$LONG") "output_dir=$WORK/runs/${NAMES[1]}"
report
run "${NAMES[2]}" 120 "${torchrun2[@]}" "${EIGHT_B[@]}" model.tiled_mlp=8192 "$(stages "$LONG")" \
    $(rows "$LONG") "output_dir=$WORK/runs/${NAMES[2]}"
report
run "${NAMES[3]}" 150 "${torchrun2[@]}" "${EIGHT_B[@]}" pattern=full "$(stages "$SHORT")" $(rows "$SHORT") \
    "output_dir=$WORK/runs/${NAMES[3]}"
report
cat "$OUT/table_frontier.txt"
echo "total $(( $(date +%s) - DEADLINE + ${BUDGET_S:-540} ))s of ${BUDGET_S:-540}s; results in $OUT"
