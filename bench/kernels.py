"""Kernel benchmark: sparse_attention (triton) vs FlexAttention (same BlockMask) vs dense causal SDPA.

    python bench/kernels.py                       # GPU: 8K..128K, Llama-3-8B shapes, head_dim 128 and 64
    python bench/kernels.py --smoke               # CPU: tiny sizes, torch backend, so the script cannot rot

Times are medians of CUDA-event timings (triton.testing.do_bench), every ratio comes from this one
run. TFLOP/s count only attended (q, k) pairs: forward 4*pairs*d*heads, backward 2.5x that.
Writes <out>/kernels.json, <out>/kernels.png (when attention lengths were timed) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import powerattn  # noqa: E402
from powerattn.atomic import save_figure  # noqa: E402
from powerattn.ops import flex_sparse_attention  # noqa: E402


def median_ms(fn, smoke: bool) -> float:
    if smoke:
        fn()
        t = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - t)
    import triton

    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def fwd_bwd_timers(attn, q, k, v, smoke: bool) -> dict[str, float]:
    """Forward, backward (given a retained graph) and forward+backward times of attn(q, k, v)."""
    grad = torch.randn_like(q)
    out = attn(q, k, v)
    fwd = median_ms(lambda: attn(q, k, v), smoke)
    bwd = median_ms(lambda: torch.autograd.grad(out, (q, k, v), grad, retain_graph=True), smoke)

    def step():
        torch.autograd.grad(attn(q, k, v), (q, k, v), grad)

    return {"fwd": fwd, "bwd": bwd, "fwd_bwd": median_ms(step, smoke)}


def dense_sdpa(q, k, v):
    """Dense causal attention through SDPA's fastest kernel (cuDNN, else flash), heads pre-expanded."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]):
        return torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        ).transpose(1, 2)


def bench_length(pat, s, heads, kv_heads, d, dtype, device, smoke, dense_max, flex: bool) -> dict:
    make = lambda h: torch.randn(1, s, h, d, device=device, dtype=dtype, requires_grad=True)  # noqa: E731
    q, k, v = make(heads), make(kv_heads), make(kv_heads)
    pairs = pat.attended_pairs(s)
    fwd_flop = 4 * pairs * d * heads
    row = {"seq_len": s, "head_dim": d, "attended_pairs": pairs, "density": pat.density(s)}
    backend = "torch" if smoke else "triton"
    row["sparse_backend"] = backend  # the "triton" columns hold the torch backend in --smoke runs
    row["triton"] = fwd_bwd_timers(lambda a, b, c: powerattn.sparse_attention(a, b, c, pat, backend=backend),
                                   q, k, v, smoke)
    if flex:
        scale = d**-0.5
        row["flex"] = fwd_bwd_timers(lambda a, b, c: flex_sparse_attention(a, b, c, pat, None, scale), q, k, v, smoke)
    if not smoke and s <= dense_max:
        group = heads // kv_heads
        kd, vd = (t.detach().repeat_interleave(group, 2).requires_grad_() for t in (k, v))
        row["dense"] = fwd_bwd_timers(dense_sdpa, q, kd, vd, smoke)
        dense_flop = 4 * (s * (s + 1) // 2) * d * heads
        row["dense_tflops"] = {m: dense_flop * f / row["dense"][m] / 1e9
                               for m, f in (("fwd", 1), ("bwd", 2.5), ("fwd_bwd", 3.5))}
    for name in ("triton", "flex"):
        if name in row:
            row[f"{name}_tflops"] = {m: fwd_flop * f / row[name][m] / 1e9
                                     for m, f in (("fwd", 1), ("bwd", 2.5), ("fwd_bwd", 3.5))}
    del q, k, v
    return row


def graphed(fn):
    """fn captured in a CUDA graph, as a generation loop would run it (launch overhead removed)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def wall_ms(fn, calls: int = 500) -> float:
    """Milliseconds per call of `calls` back-to-back calls: what a Python generation loop waits for, the
    larger of the call's host overhead and its GPU time (do_bench's event timing can hide the former)."""
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - t) / calls


def bench_decode(pat, cache_len, batch, heads, kv_heads, d, dtype, device) -> dict:
    """One new token per sequence against a cache_len KV cache: triton decode vs dense SDPA over the
    whole cache."""
    kc = torch.randn(batch, cache_len, kv_heads, d, device=device, dtype=dtype)
    vc = torch.randn_like(kc)
    q = torch.randn(batch, 1, heads, d, device=device, dtype=dtype)
    lengths = torch.full((batch,), cache_len, device=device, dtype=torch.int32)
    sparse = lambda: powerattn.decode_attention(q, kc, vc, pat, lengths, backend="triton")  # noqa: E731
    qt, kt, vt = q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2)
    dense = lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)  # noqa: E731
    how = "sdpa enable_gqa"
    try:
        dense()
    except (RuntimeError, TypeError):
        ke, ve = (t.repeat_interleave(heads // kv_heads, 1) for t in (kt, vt))
        dense = lambda: torch.nn.functional.scaled_dot_product_attention(qt, ke, ve)  # noqa: E731
        how = "sdpa, kv heads expanded"
    ref = powerattn.decode_attention(q, kc, vc, pat, lengths, backend="torch")
    err = ((sparse().float() - ref.float()).norm() / ref.float().norm()).item()
    row = {"cache_len": cache_len, "batch": batch, "dense_impl": how, "rel_err_vs_torch_backend": err}
    for mode, wrap in (("eager", lambda f: f), ("cuda_graph", graphed)):
        row[mode] = {"triton_ms": median_ms(wrap(sparse), False), "dense_ms": median_ms(wrap(dense), False)}
        row[mode]["speedup"] = row[mode]["dense_ms"] / row[mode]["triton_ms"]
    row["eager_loop"] = {"triton_ms": wall_ms(sparse), "dense_ms": wall_ms(dense)}
    row["eager_loop"]["speedup"] = row["eager_loop"]["dense_ms"] / row["eager_loop"]["triton_ms"]
    return row


def backward_breakdown(pat, s, heads, kv_heads, d, dtype) -> dict:
    """Milliseconds of each backward kernel (delta, dK/dV, dQ) with the tuned configs."""
    from powerattn.kernels.backward import launch_delta, launch_dkdv, launch_dq
    from powerattn.kernels.custom_ops import run_forward
    from powerattn.kernels.tables import device_tables, dkdv_schedule, heavy_first_schedule
    from powerattn.kernels.tuning import pick_config

    make = lambda h: torch.randn(1, s, h, d, device="cuda", dtype=dtype)  # noqa: E731
    q, k, v, do = make(heads), make(kv_heads), make(kv_heads), make(heads)
    scale = d**-0.5
    o, lse = run_forward(q, k, v, None, s, scale, pat)
    delta = launch_delta(o, do)
    times = {"delta": median_ms(lambda: launch_delta(o, do), False)}
    for kind, launch in (("dkdv", launch_dkdv), ("dq", launch_dq)):
        def run(c, kind=kind, launch=launch):
            t = device_tables(pat, s, c["BLOCK_M"], c["BLOCK_N"], q.device)
            extra = (dkdv_schedule(pat, s, c["BLOCK_M"], c["BLOCK_N"], q.device),) if kind == "dkdv" else ()
            return launch(q, k, v, do, lse, delta, t, *extra, None, *(() if kind == "dkdv" else (s,)), scale, c)
        cfg = pick_config(kind, q, k, pat, s, run)
        times[kind] = median_ms(lambda run=run, cfg=cfg: run(cfg), False)
        times[f"{kind}_config"] = cfg
    # dK/dV at other cuts of the heavy columns (heavy_first_schedule's factor; 1e9: nothing cut).
    cfg = times["dkdv_config"]
    tables = device_tables(pat, s, cfg["BLOCK_M"], cfg["BLOCK_N"], q.device)
    tiles = cfg["BLOCK_M"], cfg["BLOCK_N"]
    default = heavy_first_schedule(tables, *tiles)
    variants = {f"dkdv_cut_{f:g}": heavy_first_schedule(tables, *tiles, f) for f in (2.0, 8.0, 1e9)}
    variants["dkdv_heavy_first_uncut"] = uncut(default)
    for name, sched in variants.items():
        times[name] = median_ms(
            lambda sched=sched: launch_dkdv(q, k, v, do, lse, delta, tables, sched, None, scale, cfg), False)
    return times


def uncut(schedule):
    """The same schedule with each split column's pieces merged back into one program (still run first).

    A column of one piece is never summed from slots: its program writes dK/dV itself.
    """
    items, ptr = schedule.items.tolist(), schedule.split_ptr.tolist()
    merged = [(items[a][0], items[a][1], items[b - 1][2], 1) for a, b in zip(ptr[:-1], ptr[1:])]
    n = len(merged)
    as_int32 = lambda x: torch.tensor(x, dtype=torch.int32, device=schedule.items.device)  # noqa: E731
    return schedule._replace(items=as_int32(merged + items[schedule.n_pieces:]).reshape(-1, 4), n_pieces=n,
                             split_ptr=as_int32(list(range(n + 1))), piece_split=as_int32(list(range(n))),
                             need=as_int32([1] * n), bound_need=(2**62,) * n)


def compile_report() -> list[str]:
    """Registers, spills and shared memory of every kernel variant compiled in this process."""
    from powerattn.kernels.backward import dkdv_kernel, dq_kernel
    from powerattn.kernels.forward import fwd_kernel

    lines = []
    for name, fn in (("fwd", fwd_kernel), ("dkdv", dkdv_kernel), ("dq", dq_kernel)):
        for cache in getattr(fn, "device_caches", {}).values():
            for key, kern in cache[0].items():
                md = kern.metadata
                consts = {k: v for k, v in md.constants.items()} if hasattr(md, "constants") else {}
                lines.append(f"{name} warps={md.num_warps} stages={md.num_stages} regs={kern.n_regs} "
                             f"spills={kern.n_spills} smem={md.shared} {str(key)[-120:]} {consts}")
    return lines


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dims = sorted({r["head_dim"] for r in rows})
    fig, axes = plt.subplots(1, len(dims), figsize=(6 * len(dims), 4.2), dpi=150, squeeze=False)
    for ax, d in zip(axes[0], dims):
        sub = [r for r in rows if r["head_dim"] == d]
        xs = [r["seq_len"] for r in sub]
        for name, style in (("triton", "o-"), ("flex", "s--"), ("dense", "^:")):
            pts = [(x, r[name]["fwd_bwd"]) for x, r in zip(xs, sub) if name in r]
            if pts:
                ax.plot(*zip(*pts), style, label=f"{name} fwd+bwd")
        ax.set(xscale="log", yscale="log", xlabel="sequence length (tokens)", ylabel="ms (median)",
               title=f"power attention, head_dim {d}")
        ax.set_xticks(xs, [f"{x // 1024}K" for x in xs])
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def table(rows: list[dict], decode: list[dict]) -> str:
    lines = ["seq_len  d | triton fwd/bwd ms (TFLOP/s) | flex fwd/bwd ms | x flex fwd/bwd | dense f+b ms | x dense f+b"]
    for r in rows:
        t, tt = r["triton"], r["triton_tflops"]
        line = (f"{r['seq_len'] // 1024:>5}K {r['head_dim']:>3} | {t['fwd']:7.2f} / {t['bwd']:7.2f} "
                f"({tt['fwd']:4.0f} / {tt['bwd']:4.0f})")
        if "flex" in r:
            f = r["flex"]
            line += f" | {f['fwd']:6.2f} / {f['bwd']:6.2f} | {f['fwd'] / t['fwd']:4.2f} / {f['bwd'] / t['bwd']:4.2f}"
        if "dense" in r:
            line += f" | {r['dense']['fwd_bwd']:8.1f} | {r['dense']['fwd_bwd'] / t['fwd_bwd']:5.1f}"
        lines.append(line)
    for r in rows:
        if "breakdown" in r:
            b = r["breakdown"]
            lines.append(f"{r['seq_len'] // 1024:>5}K backward: " + ", ".join(
                f"{k} {v:.2f} ms" if isinstance(v, float) else f"{k} {v}" for k, v in b.items()))
    for dcd in decode:
        for mode in ("eager", "eager_loop", "cuda_graph"):
            m = dcd[mode]
            lines.append(f"decode 1 token x batch {dcd['batch']} vs {dcd['cache_len'] // 1024}K cache ({mode}): "
                         f"triton {1e3 * m['triton_ms']:.1f} us, dense {1e3 * m['dense_ms']:.1f} us: "
                         f"{m['speedup']:.1f}x")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-lens", type=int, nargs="*", default=[8192, 32768, 65536, 131072],
                   help="attention lengths (none: decode only)")
    p.add_argument("--head-dims", type=int, nargs="+", default=[128, 64])
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--pattern", default="power")
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    p.add_argument("--dense-max", type=int, default=131072, help="skip dense SDPA above this length")
    p.add_argument("--no-flex", action="store_true")
    p.add_argument("--decode-cache", type=int, nargs="*", default=[131072])
    p.add_argument("--decode-batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--out", default="bench/results")
    p.add_argument("--breakdown", action="store_true", help="also time each backward kernel")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run of the torch backend")
    args = p.parse_args(argv)
    device = "cpu" if args.smoke else "cuda"
    if args.smoke:
        args.seq_lens, args.head_dims, args.heads, args.kv_heads = [256, 512], [16], 4, 2
        args.block_size, args.decode_cache, args.no_flex = 64, [], True
    elif not torch.cuda.is_available():
        p.error("needs a CUDA GPU (use --smoke for the CPU check)")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    if args.smoke:
        dtype = torch.float32
    pat = powerattn.make_pattern(args.pattern, block_size=args.block_size)
    rows = []
    for d in args.head_dims:
        for s in args.seq_lens:
            rows.append(bench_length(pat, s, args.heads, args.kv_heads, d, dtype, device, args.smoke,
                                     args.dense_max, not args.no_flex))
            if args.breakdown and not args.smoke:
                rows[-1]["breakdown"] = backward_breakdown(pat, s, args.heads, args.kv_heads, d, dtype)
            print(json.dumps(rows[-1]), flush=True)
    decode = [bench_decode(pat, n, b, args.heads, args.kv_heads, args.head_dims[0], dtype, device)
              for n in args.decode_cache for b in args.decode_batch]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import triton

    meta = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "triton": triton.__version__, "pattern": pat.key, "dtype": str(dtype),
        "heads": args.heads, "kv_heads": args.kv_heads,
        "command": "python bench/kernels.py " + " ".join(argv or sys.argv[1:]),
    }
    (out / "kernels.json").write_text(json.dumps({"meta": meta, "rows": rows, "decode": decode}, indent=1))
    if rows:
        plot(rows, out / "kernels.png")
    print(json.dumps(meta))
    if args.breakdown:
        print("\n".join(compile_report()))
    print(table(rows, decode))


if __name__ == "__main__":
    main()
