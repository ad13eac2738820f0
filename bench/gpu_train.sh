#!/usr/bin/env bash
# train.py on GPUs (issue 6): throughput and MFU per pattern, and ZeRO-3 + Ulysses at 128K. Writes every
# run's log and metrics.jsonl under OUT, and a summary JSON (also printed).
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
# attention costs what it costs at the full length). Every command runs under `timeout -s KILL`; a failed or
# timed-out run is recorded in OUT/status.txt and the script goes on. Checkpoints are off (benchmarks).
set -uo pipefail
OUT=$(realpath -m "${1:?usage: bench/gpu_train.sh OUT 1gpu|2gpu}")
MODE=${2:-1gpu}
cd "$(dirname "$0")/.."
mkdir -p "$OUT/runs"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

python - > "$OUT/env_$MODE.json" <<'EOF'
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
cat "$OUT/env_$MODE.json"

# The tokenizer is the default one (sentencepiece cannot be fitted to documents without line breaks), built
# here on first use. Documents: ~200K tokens (24,000 sentences) unless a mode needs longer ones.
TOK=$(python -c "from data import default_tokenizer; print(default_tokenizer('.cache/powerattn_data').path)")
COMMON=(logger=none progress=false final_eval.enabled=false checkpoint.final=false precision=bf16 "data.tokenizer=$TOK")
docs() {  # number and sentences of the synthetic documents (~8.3 tokens a sentence)
    echo data.synthetic.num_docs="$1" data.synthetic.min_sentences="$2" data.synthetic.max_sentences="$2"
}
# lr 3e-4: the tiny default's 3e-3 makes a 1B model's loss jump in its first steps.
ONE_B=(model=llama3_1b model.attention_backend=triton pattern.block_size=256 curriculum=constant optim.lr=3e-4)

run() {  # name timeout_seconds command...
    local name=$1 limit=$2 start rc
    shift 2
    echo "== $name (limit ${limit}s): $*"
    start=$(date +%s)
    timeout -s KILL "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    # timeout kills the launcher, not necessarily its workers: clear any that still hold the GPU.
    [ "$rc" -eq 0 ] || { pkill -9 -f "python.* train.py" 2>/dev/null; sleep 2; }
    echo "$name rc=$rc $(( $(date +%s) - start ))s" | tee -a "$OUT/status.txt"
    grep -E "^(step|error|model:|passkey)" "$OUT/$name.log" | tail -n 4
}

summarize() {  # mode run names...
    python - "$OUT" "$@" <<'EOF'
import json, statistics, sys
from pathlib import Path
out, mode, names = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
rows = {}
for name in names:
    path = out / "runs" / name / "metrics.jsonl"
    recs = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    timed = recs[2:] or recs  # the first steps include Triton compilation and autotuning
    med = lambda key: statistics.median(r[key] for r in timed) if timed and timed[0][key] is not None else None
    rows[name] = {"steps": len(recs), "seq_len": recs[-1]["seq_len"] if recs else None,
                  "tokens_per_s": med("tokens_per_s"), "mfu": med("mfu"),
                  "peak_mem_gb": max((r["peak_mem_gb"] for r in recs), default=None),
                  "losses": [round(r["loss"], 5) for r in recs]}
for name, v in rows.items():  # against full at the same model and length: 1b_32k_power vs 1b_32k_full
    full = rows.get("_".join(name.split("_")[:2]) + "_full")
    if full and full["tokens_per_s"] and v["tokens_per_s"]:
        v["speedup_vs_full"] = v["tokens_per_s"] / full["tokens_per_s"]
if "sp2_16k" in rows and "sp1_16k" in rows:
    a, b = rows["sp2_16k"]["losses"], rows["sp1_16k"]["losses"]
    rows["sp2_vs_sp1_max_abs_loss_diff"] = max((abs(x - y) for x, y in zip(a, b)), default=None)
(out / f"summary_{mode}.json").write_text(json.dumps(rows, indent=1))
print(json.dumps(rows, indent=1))
EOF
}

if [ "$MODE" = 1gpu ]; then
    run tiny 90 python train.py logger=none "output_dir=$OUT/runs/tiny"
    names=()
    for p in full power sliding_window stride_slash dilated longnet; do
        run "1b_32k_$p" 65 python train.py "${ONE_B[@]}" "${COMMON[@]}" $(docs 12 24000) "pattern=$p" \
            curriculum.stages.0.seq_len=32768 curriculum.stages.0.steps=6 batch.tokens_per_step=32768 \
            batch.micro_batch_tokens=32768 deepspeed=zero1 "output_dir=$OUT/runs/1b_32k_$p"
        names+=("1b_32k_$p")
    done
    summarize 1gpu tiny "${names[@]}"
elif [ "$MODE" = 2gpu ]; then
    run sp2_128k 240 python -m torch.distributed.run --standalone --nproc_per_node 2 train.py "${ONE_B[@]}" \
        "${COMMON[@]}" $(docs 12 24000) deepspeed=zero3 parallel.sequence_parallel_size=2 curriculum.stages.0.seq_len=131072 \
        curriculum.stages.0.steps=4 batch.tokens_per_step=131072 batch.micro_batch_tokens=65536 \
        "output_dir=$OUT/runs/sp2_128k"
    short=("${ONE_B[@]}" "${COMMON[@]}" $(docs 12 24000) deepspeed=zero3 curriculum.stages.0.seq_len=16384
           curriculum.stages.0.steps=6 batch.tokens_per_step=16384 batch.micro_batch_tokens=16384)
    run sp2_16k 120 python -m torch.distributed.run --standalone --nproc_per_node 2 train.py "${short[@]}" \
        parallel.sequence_parallel_size=2 "output_dir=$OUT/runs/sp2_16k"
    run sp1_16k 120 env CUDA_VISIBLE_DEVICES=0 python train.py "${short[@]}" "output_dir=$OUT/runs/sp1_16k"
    summarize 2gpu sp2_128k sp2_16k sp1_16k
elif [ "$MODE" = long ]; then
    # Documents of ~530K tokens, so every row up to 512K is one document and attention costs its full length.
    long=("${ONE_B[@]}" "${COMMON[@]}" data=default $(docs 6 64000) deepspeed=zero3 parallel.sequence_parallel_size=1
          checkpoint.every=0)
    names=()
    # Most expendable last: the call that runs this may stop at its own time limit.
    for spec in power:131072:3:120 full:131072:3:150 power:262144:3:120 power:524288:3:180 full:262144:2:220; do
        IFS=: read -r p len steps limit <<< "$spec"
        name="1b_$((len / 1024))k_$p"
        run "$name" "$limit" env NPROC=1 launch/torchrun.sh +experiment=llama_128k "${long[@]}" "pattern=$p" \
            curriculum.stages.0.seq_len="$len" curriculum.stages.0.steps="$steps" batch.tokens_per_step="$len" \
            batch.micro_batch_tokens="$len" "output_dir=$OUT/runs/$name"
        names+=("$name")
        summarize long "${names[@]}" > /dev/null  # after each run, so a cut-off call still has a summary
    done
    cat "$OUT/summary_long.json"
else
    echo "unknown mode $MODE (1gpu | 2gpu | long)" >&2
    exit 2
fi
