# ruff: noqa  (a one-commit experiment script, removed in the next commit)
"""Experiment: atomic-dQ backward and warp-specialised forward vs the current kernels and Flex."""
import functools, importlib.util, json, os, sys, torch, triton
sys.path.insert(0, "bench")
from kernels import fwd_bwd_timers, median_ms
import powerattn
from powerattn.kernels import custom_ops, forward, tuning
from powerattn.kernels.tables import device_tables
from powerattn.ops import flex_sparse_attention

spec = importlib.util.spec_from_file_location("forward_ws", "bench/exp_atomic_dq_ws/forward_ws.py")
ws = importlib.util.module_from_spec(spec); spec.loader.exec_module(ws)
out = os.environ.get("OUT", "/tmp")
pat = powerattn.make_pattern("power", block_size=256)
rows = []
shapes = [(int(a), int(b)) for a, b in (x.split(":") for x in sys.argv[1:])]
for d, s in shapes:
    torch.manual_seed(0)
    make = lambda h: torch.randn(1, s, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    q, k, v = make(32), make(8), make(8)
    pairs = pat.attended_pairs(s); fl = 4 * pairs * d * 32
    row = {"d": d, "s": s}
    row["flex"] = fwd_bwd_timers(lambda a, b, c: flex_sparse_attention(a, b, c, pat, None, d**-0.5), q, k, v, False)
    tri = lambda a, b, c: powerattn.sparse_attention(a, b, c, pat, backend="triton")
    row["triton"] = fwd_bwd_timers(tri, q, k, v, False)
    g = torch.randn_like(q)
    ref = torch.autograd.grad(tri(q, k, v), (q, k, v), g)
    orig = custom_ops.run_backward
    custom_ops.run_backward = functools.partial(orig, atomic_dq=True)
    try:
        row["triton_atomic"] = fwd_bwd_timers(tri, q, k, v, False)
        at = torch.autograd.grad(tri(q, k, v), (q, k, v), g)
        row["atomic_rel_diff"] = [((a.float() - r.float()).norm() / r.float().norm()).item() for a, r in zip(at, ref)]
    except Exception as e:
        row["triton_atomic"] = repr(e)[:400]
    custom_ops.run_backward = orig
    fwd = {}
    for cfg in tuning.candidates("fwd", d, 256) + [dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2),
                                                    dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=4)]:
        tables = device_tables(pat, s, cfg["BLOCK_M"], cfg["BLOCK_N"], "cuda")
        for name, mod in (("base", forward), ("ws", ws)):
            key = f"{name} {cfg['BLOCK_M']}x{cfg['BLOCK_N']} w{cfg['num_warps']} s{cfg['num_stages']}"
            try:
                ms = median_ms(lambda: mod.launch_forward(q, k, v, tables, None, s, d**-0.5, cfg), False)
                fwd[key] = [ms, fl / ms / 1e9]
            except Exception as e:
                fwd[key] = repr(e)[:300]
    row["fwd_configs"] = fwd
    for name in ("flex", "triton", "triton_atomic"):
        if isinstance(row.get(name), dict):
            row[name + "_tflops"] = {m: fl * f / row[name][m] / 1e9 for m, f in (("fwd", 1), ("bwd", 2.5), ("fwd_bwd", 3.5))}
    if isinstance(row.get("triton_atomic"), dict):
        row["x_flex_bwd"] = {n: row["flex"]["bwd"] / row[n]["bwd"] for n in ("triton", "triton_atomic")}
    row["x_flex_fwd"] = row["flex"]["fwd"] / row["triton"]["fwd"]
    row["tuned"] = {k2: v2 for k2, v2 in tuning._memory.items()}
    rows.append(row)
    print(json.dumps(row), flush=True)
    json.dump(rows, open(f"{out}/exp_kernels_{sys.argv[1].replace(':', '_')}.json", "w"), indent=1)
    del q, k, v
    torch.cuda.empty_cache()
