"""Training-step benchmark: forward + backward + AdamW of a LLaMA-shaped model, for each pattern and full.

    python bench/train_step.py --model llama-3.2-1b --seq-lens 32768     # GPU: bf16, triton backend
    python bench/train_step.py --model tiny --seq-lens 8192 32768 131072
    python bench/train_step.py --smoke                                   # CPU: tiny sizes, torch backend

The model is randomly initialised (speed depends on shapes only); the patterns keep their paper
parameters at --block-size. One model and one optimizer serve every pattern (configure_attention
swaps the pattern), so weights, gradients and AdamW state are identical across rows. Per pattern:
--warmup untimed steps (they include the Triton kernels' one-off tuning), then --steps timed steps;
the median gives tokens/s. MFU = flops_per_token (dense matmuls + attention over the pairs the
pattern actually attends; recomputation not counted) x tokens/s / the GPU's dense bf16 peak, looked
up by device name (--peak-tflops overrides). Peak memory is torch.cuda.max_memory_allocated over the
pattern's steps. Ratios are against `full` measured in the same run. Writes <out>/<name>.json and
<out>/<name>.png and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from powerattn import make_pattern, pattern_names  # noqa: E402
from powerattn.atomic import atomic_write, save_figure
from powerattn.dtypes import DTYPES  # noqa: E402
from powerattn.model import LlamaConfig, LlamaForCausalLM, flops_per_token  # noqa: E402
from powerattn.training.metrics import peak_tflops  # noqa: E402

# LlamaConfig fields of the shapes worth timing (random init: only the shapes matter).
MODELS = {
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                         rope_theta=500000.0),
    "llama-3.2-3b": dict(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                         num_attention_heads=24, num_key_value_heads=8, head_dim=128,
                         tie_word_embeddings=True, rope_theta=500000.0),
    "llama-3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0),
    "qwen2-7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                     num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, rope_theta=1e6),
    "tiny": dict(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=2, head_dim=64),
    "smoke": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2),
}
PATTERNS = ["power", "sliding_window", "stride_slash", "dilated", "longnet", "full"]


def model_config(spec: str, seq_len: int, checkpointing: bool) -> LlamaConfig:
    """A preset name from MODELS, or an HF folder / config.json path (shapes only)."""
    overrides = dict(max_position_embeddings=max(seq_len, 4096), activation_checkpointing=checkpointing)
    if spec in MODELS:
        return LlamaConfig(**MODELS[spec], **overrides)
    path = Path(spec)
    if path.is_file():
        path = path.parent
    if not (path / "config.json").is_file():
        raise SystemExit(f"--model {spec!r}: neither a preset ({', '.join(MODELS)}) nor a folder with "
                         "config.json")
    from powerattn.model import load_config

    cfg = load_config(path, activation_checkpointing=checkpointing)
    cfg.max_position_embeddings = max(cfg.max_position_embeddings, seq_len)
    return cfg


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_pattern(model, opt, pattern, schedule, backend: str, seq_len: int, batch: int, steps: int,
                  warmup: int, device: torch.device) -> dict:
    """Median step time, tokens/s, FLOP/s and peak memory of fwd + bwd + AdamW with `pattern`."""
    model.configure_attention(pattern, None if pattern.name == "full" else schedule, backend)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), device=device)
    row = {"pattern": pattern.name, "key": pattern.key, "seq_len": seq_len, "batch": batch,
           "density": pattern.density(seq_len), "full_attention_layers": list(model.full_attention_layers),
           "flops_per_token": flops_per_token(model.config, seq_len, model.layer_patterns, training=True)}

    def step() -> float:
        loss = model(ids, labels=ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        for _ in range(warmup):
            step()
        sync(device)
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            loss = step()
            sync(device)
            times.append(time.perf_counter() - t0)
    except torch.cuda.OutOfMemoryError:
        opt.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        return {**row, "oom": True}
    step_s = statistics.median(times)
    tokens = batch * seq_len
    row.update(step_ms=1e3 * step_s, step_ms_all=[1e3 * t for t in times], tokens_per_s=tokens / step_s,
               tflops=row["flops_per_token"] * tokens / step_s / 1e12, loss=float(loss.detach()))
    if device.type == "cuda":
        row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return row


def add_ratios(rows: list[dict], peak: float | None) -> None:
    full = {r["seq_len"]: r for r in rows if r["pattern"] == "full" and not r.get("oom")}
    for r in rows:
        if r.get("oom"):
            continue
        r["mfu"] = r["tflops"] / peak if peak else None
        if r["seq_len"] in full:
            r["speedup_vs_full"] = r["tokens_per_s"] / full[r["seq_len"]]["tokens_per_s"]


def table(rows: list[dict]) -> str:
    head = (f"{'seq_len':>8} {'pattern':<15} {'density':>7} {'step ms':>9} {'tokens/s':>10} {'x full':>6} "
            f"{'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>8}")
    lines = [head]
    for r in rows:
        if r.get("oom"):
            lines.append(f"{r['seq_len']:>8} {r['pattern']:<15} {r['density']:>7.3f}  out of memory")
            continue
        mfu = f"{100 * r['mfu']:5.1f}%" if r.get("mfu") is not None else "    - "
        mem = f"{r['peak_memory_gib']:8.1f}" if "peak_memory_gib" in r else "       -"
        x = f"{r['speedup_vs_full']:6.2f}" if "speedup_vs_full" in r else "     -"
        lines.append(f"{r['seq_len']:>8} {r['pattern']:<15} {r['density']:>7.3f} {r['step_ms']:>9.1f} "
                     f"{r['tokens_per_s']:>10.0f} {x} {r['tflops']:>8.1f} {mfu} {mem}")
    return "\n".join(lines)


def plot(rows: list[dict], meta: dict, path: Path) -> None:
    """Grouped bars per sequence length: tokens/s, speed-up vs full, peak memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lens = sorted({r["seq_len"] for r in rows})
    pats = list(dict.fromkeys(r["pattern"] for r in rows))
    panels = [("tokens_per_s", "tokens / s"), ("speedup_vs_full", "speed-up vs full (same run)"),
              ("peak_memory_gib", "peak memory (GiB)")]
    panels = [p for p in panels if any(p[0] in r for r in rows)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), dpi=150, squeeze=False)
    width = 0.8 / len(pats)
    for ax, (key, label) in zip(axes[0], panels):
        for j, p in enumerate(pats):
            vals = [next((r.get(key) or 0.0 for r in rows if (r["seq_len"], r["pattern"]) == (n, p)), 0.0)
                    for n in lens]
            ax.bar([i + (j - (len(pats) - 1) / 2) * width for i in range(len(lens))], vals, width, label=p)
        ax.set_xticks(range(len(lens)), [f"{n // 1024}K" if n >= 1024 else str(n) for n in lens])
        ax.set(xlabel="sequence length (tokens)", ylabel=label)
        if key == "speedup_vs_full":
            ax.axhline(1.0, color="black", lw=0.8)
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"train step (fwd+bwd+AdamW): {meta['model']}, {meta['device']}, {meta['dtype']}, "
                 f"{meta['backend']}", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-3.2-1b", help=f"preset ({', '.join(MODELS)}) or an HF folder")
    p.add_argument("--seq-lens", type=int, nargs="+", default=[32768])
    p.add_argument("--patterns", nargs="+", default=PATTERNS, choices=pattern_names())
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--attention-schedule", default=None, help="full-attention layers of the sparse rows, "
                   "e.g. hybrid:2/7 (default: all layers sparse)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="timed steps per pattern (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (kernel tuning, allocator)")
    p.add_argument("--backend", default="triton", choices=["triton", "flex", "torch", "auto"])
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--no-activation-checkpointing", action="store_true",
                   help="keep every layer's activations (default: recompute each layer in backward)")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense peak TFLOP/s for MFU (overrides "
                   "the table by device name)")
    p.add_argument("--out", default="bench/results")
    p.add_argument("--name", default=None, help="output file stem (default train_step_<model>)")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny sizes, torch backend (keeps the script "
                   "from rotting)")
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.seq_lens, args.block_size = "smoke", [512], 32
        args.backend, args.dtype, args.steps, args.warmup, args.batch_size = "torch", "fp32", 1, 1, 1
    for n in args.seq_lens:
        if n < 1:
            p.error(f"--seq-lens must be positive, got {n}")
    if min(args.steps, args.warmup + 1, args.batch_size, args.block_size) < 1:
        p.error("--steps, --batch-size and --block-size must be >= 1, --warmup >= 0")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device("cpu" if args.smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench/train_step.py needs a CUDA GPU (use --smoke for the CPU check)")
    dtype = DTYPES[args.dtype]
    patterns = [make_pattern(n, block_size=args.block_size) for n in args.patterns]
    cfg = model_config(args.model, max(args.seq_lens), not args.no_activation_checkpointing)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    model.to(dtype).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = platform.processor() or platform.machine() or "cpu"
    peak = args.peak_tflops or (peak_tflops(device_name) if device.type == "cuda" else None)
    rows = []
    for n in args.seq_lens:
        for pat in patterns:
            rows.append(bench_pattern(model, opt, pat, args.attention_schedule, args.backend, n,
                                      args.batch_size, args.steps, args.warmup, device))
            print(json.dumps(rows[-1]), flush=True)
    add_ratios(rows, peak)
    meta = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": device_name,
        "torch": torch.__version__, "triton": _triton_version(), "model": args.model,
        "parameters": sum(p.numel() for p in model.parameters()), "dtype": args.dtype,
        "backend": args.backend, "block_size": args.block_size, "attention_schedule": args.attention_schedule,
        "activation_checkpointing": not args.no_activation_checkpointing,
        "optimizer": "AdamW (fused on CUDA)" if device.type == "cuda" else "AdamW",
        "steps": args.steps, "warmup": args.warmup, "peak_tflops": peak,
        "peak_tflops_source": "--peak-tflops" if args.peak_tflops else ("device table" if peak else None),
        "config": {k: v for k, v in cfg.to_hf_dict().items() if not isinstance(v, dict)},
        "command": "python bench/train_step.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = args.name or f"train_step_{args.model if args.model in MODELS else Path(args.model).name}"
    atomic_write(out / f"{name}.json", json.dumps({"meta": meta, "rows": rows}, indent=1))
    plot(rows, meta, out / f"{name}.png")
    print(json.dumps({k: v for k, v in meta.items() if k != "config"}))
    print(table(rows))
    if peak is None and device.type == "cuda":
        print(f"MFU not computed: no peak for {device_name!r} in the table; pass --peak-tflops")
    print(f"wrote {out / (name + '.json')} and {out / (name + '.png')}")


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


if __name__ == "__main__":
    main()
