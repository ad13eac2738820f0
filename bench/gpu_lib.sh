# Shared by bench/gpu_train.sh and bench/gpu_8b.sh (sourced, not run): sub-runs that cannot hang the script,
# the environment record, the 1B-shape settings and runs, and the summary.
#
#   bench_init OUT       OUT: what comes back (summaries, env, status, one tarball); WORK (default a fresh
#                        /tmp folder, never under OUT): logs and run folders, packed into OUT by `pack`
#   run NAME LIMIT CMD.. CMD's output, each line stamped with the seconds since its start, into WORK/NAME.log;
#                        GPU memory sampled into WORK/NAME.smi.csv; killed after LIMIT seconds, or at DEADLINE
#                        (epoch seconds, if set) less RESERVE_S; skipped if that leaves under MIN_RUN_S or if
#                        NAME is in SKIP (space-separated names). Every
#                        process CMD started (torchrun's workers too, which live in sessions of their own) is
#                        found by an environment marker and killed when CMD ends, so no hang outlives its run.
#                        `NAME rc=N Ss` (or `NAME skipped (...)`) goes to WORK/status.txt.

export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# Fewer fragmentation OOMs when a run changes sequence length (curriculum stages), as the launchers set it.
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}

bench_init() {  # OUT
    OUT=$(realpath -m "$1")
    WORK=$(realpath -m "${WORK:-$(mktemp -d /tmp/powerattn_bench.XXXXXX)}")
    mkdir -p "$OUT" "$WORK/runs"
    echo "results: $OUT; logs and run folders: $WORK"
}

env_json() {  # FILE: date, torch / CUDA / triton / deepspeed versions, GPUs
    python - > "$1" <<'EOF'
import datetime, json, torch
try:
    import deepspeed, triton
    versions = {"deepspeed": deepspeed.__version__, "triton": triton.__version__}
except ImportError as e:
    versions = {"import_error": str(e)}
gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
print(json.dumps({"date": datetime.datetime.now().isoformat(), "torch": torch.__version__,
                  "cuda": torch.version.cuda, "gpus": gpus, **versions}, indent=1))
EOF
    cat "$1"
}

stamp() {  # prefix each line of stdin with [seconds since start]
    python -u -c '
import sys, time
t0 = time.time()
for line in sys.stdin:
    sys.stdout.write(f"[{time.time() - t0:7.1f}s] {line}")'
}

kill_marked() {  # MARKER: SIGKILL every process whose environment holds BENCH_RUN_ID=MARKER (twice: stragglers)
    local p round
    for round in 1 2; do
        for p in /proc/[0-9]*; do
            grep -qzx "BENCH_RUN_ID=$1" "$p/environ" 2>/dev/null && kill -9 "${p#/proc/}" 2>/dev/null
        done
        sleep 1
    done
    return 0
}

run() {  # NAME LIMIT_SECONDS COMMAND...
    local name=$1 limit=$2 left start rc smi=""
    shift 2
    if [[ " ${SKIP:-} " == *" $name "* ]]; then
        echo "$name skipped (SKIP)" | tee -a "$WORK/status.txt"
        return 1
    fi
    if [ -n "${DEADLINE:-}" ]; then
        left=$(( DEADLINE - $(date +%s) - ${RESERVE_S:-15} ))
        if [ "$left" -lt "${MIN_RUN_S:-45}" ]; then
            echo "$name skipped (budget: ${left}s left)" | tee -a "$WORK/status.txt"
            return 1
        fi
        [ "$left" -ge "$limit" ] || limit=$left
    fi
    echo "== $name (limit ${limit}s): $*"
    if command -v nvidia-smi > /dev/null 2>&1; then
        nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits -lms 500 \
            > "$WORK/$name.smi.csv" 2> /dev/null &
        smi=$!
    fi
    local marker="$name.$$.$RANDOM"
    start=$(date +%s)
    # The marker goes only to COMMAND's process tree (env), not to this subshell's own helpers.
    ( env BENCH_RUN_ID="$marker" timeout -s KILL "$limit" "$@"; rc=$?; kill_marked "$marker"; exit "$rc" ) 2>&1 \
        | stamp > "$WORK/$name.log"
    rc=${PIPESTATUS[0]}
    [ -z "$smi" ] || kill "$smi" 2> /dev/null
    [ "$rc" -eq 0 ] || sleep 2  # the driver frees a killed process's memory asynchronously
    echo "$name rc=$rc $(( $(date +%s) - start ))s" | tee -a "$WORK/status.txt"
    grep -aE "\] (step [0-9]+:|error|model:|passkey|.*out of memory|\{)" "$WORK/$name.log" | tail -n 3
    return "$rc"
}

summarize() {  # TAG [--compare A B] [--warmup N] RUN...: OUT/summary_TAG.json and table_TAG.txt, printed
    local tag=$1
    shift
    cp "$WORK/status.txt" "$OUT/status_$tag.txt" 2> /dev/null
    python bench/summarize_runs.py "$WORK" "$OUT/summary_$tag.json" --table "$OUT/table_$tag.txt" "$@"
}

pack() {  # TAG: every log, metrics.jsonl, config.yaml and report of WORK into OUT/logs_TAG.tar.gz
    tar -czf "$OUT/logs_$1.tar.gz" -C "$WORK" --exclude='*.safetensors' --exclude='checkpoints' . 2> /dev/null
}

docs() {  # number and sentences of the synthetic documents (~8.8 tokens a sentence)
    echo data.synthetic.num_docs="$1" data.synthetic.min_sentences="$2" data.synthetic.max_sentences="$2"
}

# Benchmarks: no logger, no progress bar, no final passkey check, no checkpoint.
BENCH_ARGS=(logger=none progress=false final_eval.enabled=false checkpoint.final=false precision=bf16)
# The Llama-3.2-1B shape, random init. lr 3e-4: the tiny default's 3e-3 makes its loss jump in the first steps.
ONE_B=(model=llama3_1b model.attention_backend=triton pattern.block_size=256 curriculum=constant optim.lr=3e-4)

default_tok() {  # the embedded default tokenizer, built on first use (sentencepiece cannot be fitted to the
    # benchmark's documents, which have no line breaks)
    python -c "from powerattn.data import default_tokenizer; print(default_tokenizer('.cache/powerattn_data').path)"
}

# The 8B scripts' runs (gpu_8b.sh, gpu_frontier.sh): two processes, one curriculum stage of STEPS one-row steps
# per length.
torchrun2=(python -m torch.distributed.run --standalone --nproc_per_node 2 train.py)
stages() {  # seq_len...: the curriculum.stages override
    local s=() len
    for len in "$@"; do s+=("{seq_len:$len,steps:$STEPS,tokens_per_step:$len}"); done
    local IFS=,
    echo "curriculum.stages=[${s[*]}]"
}

# The two-GPU checks (`gpu_train.sh OUT 2gpu`); TOK must hold default_tok's path. Documents: ~210K tokens.
run_1b_sp2_128k() {  # ZeRO-3 + SP=2 at 128K: throughput and memory per GPU
    run sp2_128k "${1:-240}" python -m torch.distributed.run --standalone --nproc_per_node 2 train.py \
        "${ONE_B[@]}" "${BENCH_ARGS[@]}" "data.tokenizer=$TOK" $(docs 12 24000) deepspeed=zero3 \
        parallel.sequence_parallel_size=2 curriculum.stages.0.seq_len=131072 curriculum.stages.0.steps=4 \
        batch.tokens_per_step=131072 batch.micro_batch_tokens=65536 "output_dir=$WORK/runs/sp2_128k"
}
ONE_B_16K=(curriculum.stages.0.seq_len=16384 curriculum.stages.0.steps=6 batch.tokens_per_step=16384
           batch.micro_batch_tokens=16384 deepspeed=zero3)
run_1b_sp2_16k() {  # the loss curve under ZeRO-3 + SP=2 on 2 GPUs ...
    run sp2_16k "${1:-120}" python -m torch.distributed.run --standalone --nproc_per_node 2 train.py \
        "${ONE_B[@]}" "${BENCH_ARGS[@]}" "data.tokenizer=$TOK" $(docs 12 24000) "${ONE_B_16K[@]}" \
        parallel.sequence_parallel_size=2 "output_dir=$WORK/runs/sp2_16k"
}
run_1b_sp1_16k() {  # ... and on one GPU (GPU index, default 0): the two must agree to bf16 rounding
    run sp1_16k "${2:-120}" env CUDA_VISIBLE_DEVICES="${1:-0}" python train.py "${ONE_B[@]}" "${BENCH_ARGS[@]}" \
        "data.tokenizer=$TOK" $(docs 12 24000) "${ONE_B_16K[@]}" "output_dir=$WORK/runs/sp1_16k"
}

# Preemption and a changed GPU count on two GPUs (issue 17), on the sp2_16k run's exact config, so its loss curve
# is the uninterrupted reference: `preempt` is SIGTERMed (the launcher script, launch/torchrun.sh, as SLURM
# would) once its second step is logged; every rank finishes its step and writes one checkpoint, exit 0.
# `preempt_resume` is the same command again (resume=auto). Then the checkpoint on ONE GPU (SP=1):
# `one_gpu_refused` must stop with the one-line layout error, `one_gpu_weights` (resume_optimizer=false)
# continues from its model/ weights with a fresh optimizer. TOK must hold default_tok's path.
preempt_cmd() {  # the launcher with the sp2_16k config into runs/preempt
    echo env PREEMPT_TARGET=1 NPROC=2 launch/torchrun.sh "${ONE_B[@]}" "${BENCH_ARGS[@]}" "data.tokenizer=$TOK" \
        $(docs 12 24000) "${ONE_B_16K[@]}" parallel.sequence_parallel_size=2 "output_dir=$WORK/runs/preempt"
}
sigterm_launcher_after() {  # STEPS: SIGTERM launch/torchrun.sh once runs/preempt logged STEPS steps
    local metrics=$WORK/runs/preempt/metrics.jsonl p
    for _ in $(seq 600); do
        if [ -f "$metrics" ] && [ "$(wc -l < "$metrics")" -ge "$1" ]; then
            for p in /proc/[0-9]*; do
                grep -qzx PREEMPT_TARGET=1 "$p/environ" 2>/dev/null && grep -qa "launch/torchrun.sh" "$p/cmdline" \
                    && kill -TERM "${p#/proc/}" && echo "SIGTERM to launch/torchrun.sh (pid ${p#/proc/})" \
                    "after step $(wc -l < "$metrics")" >> "$WORK/status.txt"
            done
            return 0
        fi
        sleep 0.5
    done
}
run_preempt_checks() {
    local cmd
    read -r -a cmd <<< "$(preempt_cmd)"
    sigterm_launcher_after 2 &
    local watcher=$!
    run preempt 150 "${cmd[@]}"
    kill "$watcher" 2> /dev/null
    run preempt_resume 120 "${cmd[@]}"
    local ckpt
    ckpt=$(ls -d "$WORK"/runs/preempt/checkpoints/step_* 2> /dev/null | head -n 1)
    [ -n "$ckpt" ] || { echo "no preemption checkpoint" | tee -a "$WORK/status.txt"; return 1; }
    local one_gpu=(env CUDA_VISIBLE_DEVICES=0 python train.py "${ONE_B[@]}" "${BENCH_ARGS[@]}" "data.tokenizer=$TOK"
             $(docs 12 24000) "${ONE_B_16K[@]}" parallel.sequence_parallel_size=1 "resume=$ckpt")
    run one_gpu_refused 60 "${one_gpu[@]}" "output_dir=$WORK/runs/one_gpu_refused"
    run one_gpu_weights 90 "${one_gpu[@]}" resume_optimizer=false "output_dir=$WORK/runs/one_gpu_weights"
}
