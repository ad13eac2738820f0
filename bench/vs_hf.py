"""One training step of the same model three ways, in one run: HF transformers (LlamaForCausalLM + SDPA),
HF + SDPA + Liger-Kernel, and ours (pattern power and full; fused ops on and off; dense layers through SDPA
or our Triton kernel).

    python bench/vs_hf.py                                # GPU: Llama-3.2-1B shape, 8K and 32K tokens, bf16
    python bench/vs_hf.py --seq-lens 8192 32768 131072   # and 128K (plain HF is expected to run out of memory)
    python bench/vs_hf.py --smoke                        # CPU: tiny shapes; Liger rows recorded as skipped

Every row builds its randomly initialised model afresh (speed depends on shapes only), then empties the
CUDA cache and resets the peak-memory statistics. Each layer is activation-checkpointed, batch 1, one
forward + backward of the mean next-token loss per timed iteration, no optimizer (gradients are dropped
after each). --warmup untimed iterations (Triton compiles and tunes there), then the median of --steps.
Peak memory is torch.cuda.max_memory_allocated over the row: weights, gradients and activations.
Ratios are against HF + SDPA and HF + SDPA + Liger at the same length in the same run; MFU counts the
model's FLOPs (dense matmuls + the attended pairs, recomputation not counted, powerattn.model.flops).
A row that runs out of memory is recorded as "oom", one that cannot run here as "skipped" with the
reason. The HF + Liger rows run last: apply_liger_kernel_to_llama patches transformers' Llama classes for
the rest of the process. Writes <out>/<name>.json and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.metadata
import importlib.util
import json
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import MODELS, model_config, sync  # noqa: E402

# bench/ holds kernels.py, which would shadow the HF hub's `kernels` package that transformers (>= 5.2x)
# imports when it is installed: once train_step is in, bench/ leaves the import path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from powerattn import make_pattern  # noqa: E402
from powerattn.atomic import atomic_write  # noqa: E402
from powerattn.dtypes import DTYPES  # noqa: E402
from powerattn.memory import count_parameters  # noqa: E402
from powerattn.model import LlamaConfig, LlamaForCausalLM, flops_per_token  # noqa: E402
from powerattn.model.fused import liger_available  # noqa: E402
from powerattn.training.metrics import peak_tflops  # noqa: E402


@dataclass(frozen=True)
class Row:
    """One configuration. backend "kernel" is our Triton kernel (the portable torch backend under --smoke)."""

    name: str
    impl: str                 # hf | ours
    liger: bool = False       # hf: apply_liger_kernel_to_llama; ours: fused_ops=liger (else none)
    pattern: str = "full"
    backend: str | None = None


ROWS = [
    Row("hf_sdpa", "hf"),
    Row("full_sdpa", "ours", pattern="full", backend="sdpa"),
    Row("full_sdpa_liger", "ours", liger=True, pattern="full", backend="sdpa"),
    Row("full_kernel", "ours", pattern="full", backend="kernel"),
    Row("power", "ours", pattern="power", backend="kernel"),
    Row("power_liger", "ours", liger=True, pattern="power", backend="kernel"),
    Row("hf_sdpa_liger", "hf", liger=True),
]
NAMES = [r.name for r in ROWS]


def plan(rows: list[Row], seq_lens: list[int]) -> list[tuple[Row, int]]:
    """(row, length) in run order: every HF + Liger row after all others (its patch cannot be undone)."""
    first = [(r, n) for n in seq_lens for r in rows if not (r.impl == "hf" and r.liger)]
    return first + [(r, n) for n in seq_lens for r in rows if r.impl == "hf" and r.liger]


def skip_reason(row: Row, device: torch.device) -> str | None:
    if row.liger and device.type != "cuda":
        return "Liger-Kernel's Triton kernels need CUDA"
    if row.liger and not liger_available():
        return "liger-kernel is not installed"
    if row.impl == "hf" and importlib.util.find_spec("transformers") is None:
        return "transformers is not installed"
    return None


def build_hf(config: LlamaConfig, liger: bool, device: torch.device, dtype: torch.dtype):
    """transformers' LlamaForCausalLM of the same shape: SDPA attention, activation checkpointing, no KV cache."""
    import transformers

    if liger:
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, fused_linear_cross_entropy=True)
    hf_config = transformers.LlamaConfig(**config.to_hf_dict())
    hf_config.use_cache = False
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa")
    model.to(device=device, dtype=dtype).train()
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the older name warns there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model, lambda ids: model(input_ids=ids, labels=ids).loss


def build_ours(config: LlamaConfig, row: Row, backend: str, block_size: int, device: torch.device,
               dtype: torch.dtype):
    config = dataclasses.replace(config, fused_ops="liger" if row.liger else "none")
    with torch.device(device):
        model = LlamaForCausalLM(config, make_pattern(row.pattern, block_size=block_size), None, backend)
    model.to(dtype).train()
    return model, lambda ids: model(ids, labels=ids)


def run_row(row: Row, seq_len: int, args, config: LlamaConfig, device: torch.device) -> dict:
    """Median fwd + bwd time, tokens/s, peak memory and FLOP rate of one configuration at one length."""
    backend = row.backend
    if backend == "kernel":
        backend = "torch" if args.smoke else "triton"
    pattern = make_pattern(row.pattern, block_size=args.block_size)
    out = {"name": row.name, "impl": row.impl, "liger": row.liger, "pattern": row.pattern,
           "attention_backend": backend if row.impl == "ours" else "sdpa", "seq_len": seq_len,
           "flops_per_token": flops_per_token(config, seq_len, [pattern] * config.num_hidden_layers, training=True)}
    reason = skip_reason(row, device)
    if reason:
        return {**out, "status": "skipped", "reason": reason}
    try:
        times, first_loss = time_steps(row, backend, seq_len, args, config, device)
        out["status"] = "ok"
    except torch.cuda.OutOfMemoryError:
        out["status"] = "oom"
    except Exception as e:  # a row that breaks must not cost the others: record it, exit 1 at the end
        traceback.print_exc()
        out.update(status="error", reason=f"{type(e).__name__}: {e}"[:500])
    # The model died with time_steps' frame (also on an error, once the handler above ended).
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    fresh(device)
    if out["status"] != "ok":
        return out
    step_s = statistics.median(times)
    out.update(step_ms=1e3 * step_s, step_ms_all=[1e3 * t for t in times], tokens_per_s=seq_len / step_s,
               tflops=out["flops_per_token"] * seq_len / step_s / 1e12, loss=first_loss)
    if peak is not None:
        out["peak_memory_gib"] = peak
    return out


def time_steps(row: Row, backend: str, seq_len: int, args, config: LlamaConfig,
               device: torch.device) -> tuple[list[float], float]:
    """Build the row's model, then (seconds of each timed fwd + bwd, the first iteration's loss)."""
    dtype = DTYPES[args.dtype]
    if row.impl == "hf":
        model, loss_of = build_hf(config, row.liger, device, dtype)
    else:
        model, loss_of = build_ours(config, row, backend, args.block_size, device, dtype)
    ids = torch.randint(0, config.vocab_size, (1, seq_len), device=device)

    def step() -> float:
        loss = loss_of(ids)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return float(loss.detach())

    fresh(device)  # the peak counts from here: weights in their final dtype, no construction leftovers
    losses = [step() for _ in range(args.warmup)]
    sync(device)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        losses.append(step())
        sync(device)
        times.append(time.perf_counter() - t0)
    return times, losses[0]


def fresh(device: torch.device) -> None:
    """Free what the last row left and restart the peak-memory count."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def add_ratios(rows: list[dict], peak: float | None, measured_peak: float | None) -> None:
    """tokens/s and peak memory against HF + SDPA and HF + SDPA + Liger at the same length."""
    base = {(r["name"], r["seq_len"]): r for r in rows if r["status"] == "ok"}
    for r in rows:
        if r["status"] != "ok":
            continue
        r["mfu"] = r["tflops"] / peak if peak else None
        if measured_peak:
            r["mfu_measured_peak"] = r["tflops"] / measured_peak
        for ref, tag in (("hf_sdpa", "hf_sdpa"), ("hf_sdpa_liger", "hf_liger")):
            b = base.get((ref, r["seq_len"]))
            if b is None:
                continue
            r[f"speed_x_{tag}"] = r["tokens_per_s"] / b["tokens_per_s"]
            if "peak_memory_gib" in r:
                r[f"memory_x_{tag}"] = r["peak_memory_gib"] / b["peak_memory_gib"]


def table(rows: list[dict]) -> str:
    def num(r, key, fmt):
        return format(r[key], fmt) if r.get(key) is not None else "-"

    head = (f"{'seq_len':>8} {'row':<16} {'step ms':>9} {'tokens/s':>10} {'x HF':>6} {'x HF+Liger':>10} "
            f"{'peak GiB':>8} {'mem x HF+Liger':>14} {'MFU':>6}")
    lines = [head]
    for r in rows:
        if r["status"] != "ok":
            why = f": {r['reason']}" if "reason" in r else ""
            lines.append(f"{r['seq_len']:>8} {r['name']:<16} {r['status']}{why}")
            continue
        mfu = f"{100 * r['mfu']:5.1f}%" if r.get("mfu") is not None else "-"
        lines.append(f"{r['seq_len']:>8} {r['name']:<16} {r['step_ms']:>9.1f} {r['tokens_per_s']:>10.0f} "
                     f"{num(r, 'speed_x_hf_sdpa', '.2f'):>6} {num(r, 'speed_x_hf_liger', '.2f'):>10} "
                     f"{num(r, 'peak_memory_gib', '.1f'):>8} {num(r, 'memory_x_hf_liger', '.2f'):>14} {mfu:>6}")
    return "\n".join(lines)


def versions() -> dict[str, str | None]:
    found = {}
    for name in ("torch", "triton", "transformers", "liger-kernel"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-3.2-1b", help=f"preset ({', '.join(MODELS)}) or an HF folder")
    p.add_argument("--seq-lens", type=int, nargs="+", default=[8192, 32768])
    p.add_argument("--rows", nargs="+", default=NAMES, choices=NAMES)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=4, help="timed iterations per row (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations first (compilation, tuning)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--measured-peak-tflops", type=float, default=None,
                   help="a matmul peak measured on this GPU, for a second MFU (the first uses the spec table)")
    p.add_argument("--out", default="bench/results")
    p.add_argument("--name", default=None, help="output file stem (default vs_hf_<model>)")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny sizes (keeps the script from rotting)")
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.seq_lens, args.block_size, args.dtype = "smoke", [256], 16, "fp32"
        args.steps, args.warmup = 1, 1
    if min(args.seq_lens) < 2 or args.steps < 1 or args.warmup < 0 or args.block_size < 1:
        p.error("--seq-lens must be >= 2, --steps and --block-size >= 1, --warmup >= 0")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device("cpu" if args.smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench/vs_hf.py needs a CUDA GPU (use --smoke for the CPU check)")
    config = model_config(args.model, max(args.seq_lens), checkpointing=True)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        platform.processor() or platform.machine() or "cpu")
    peak = peak_tflops(device_name) if device.type == "cuda" else None
    rows = []
    for row, n in plan([r for r in ROWS if r.name in args.rows], args.seq_lens):
        torch.manual_seed(0)
        rows.append(run_row(row, n, args, config, device))
        print(json.dumps(rows[-1]), flush=True)
    # Table order: by length, as ROWS lists them (the run order moved the HF + Liger rows to the end).
    rows.sort(key=lambda r: (r["seq_len"], NAMES.index(r["name"])))
    add_ratios(rows, peak, args.measured_peak_tflops)
    meta = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": device_name,
        "versions": versions(), "model": args.model, "dtype": args.dtype, "batch": 1,
        "parameters": count_parameters(config)[0],
        "block_size": args.block_size, "activation_checkpointing": "every layer", "optimizer": None,
        "steps": args.steps, "warmup": args.warmup, "peak_tflops": peak,
        "measured_peak_tflops": args.measured_peak_tflops,
        "configs": [dataclasses.asdict(r) for r in ROWS if r.name in args.rows],
        "config": {k: v for k, v in config.to_hf_dict().items() if not isinstance(v, dict)},
        "command": "python bench/vs_hf.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = args.name or f"vs_hf_{args.model if args.model in MODELS else Path(args.model).name}"
    atomic_write(out / f"{name}.json", json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(json.dumps(meta))
    print(table(rows))
    print(f"wrote {out / (name + '.json')}")
    if any(r["status"] == "error" for r in rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
