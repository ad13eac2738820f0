"""Decode implementations side by side in one process: this tree's powerattn/kernels/decode.py against
older copies of it, so host noise (a lent machine's CPU varies from call to call) hits all alike.

    git show 5f12729:powerattn/kernels/decode.py > /tmp/decode_two_launch.py
    python bench/decode_versions.py --old two_launch=/tmp/decode_two_launch.py --out DIR

For each version and batch (1 and 8 sequences; a 131,072-token cache, 32 / 8 heads, head_dim 128, power
with 256-token blocks, bf16): the relative error against the torch reference, bitwise repeatability, one
eager call timed by CUDA events (bench/kernels.py's "eager": do_bench flushes L2 before each call, which
also lets the host run ahead, so this is close to GPU time), the GPU time of one call replayed in a CUDA
graph, and the wall time per call of back-to-back eager calls
(what a Python generation loop waits for), each twice; then each version's host time per call with its
`_decode_kernel` launch replaced by a no-op (its other launches, e.g. a separate merge kernel, still
run), and the host time of launching an empty Triton kernel with 3 and with 29 arguments. Writes
DIR/decode_versions.json and prints it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels import graphed, wall_ms  # noqa: E402

import powerattn  # noqa: E402
from powerattn.kernels import decode as current  # noqa: E402
from powerattn.reference import decode_reference  # noqa: E402


def load(name: str, path: str):
    spec = importlib.util.spec_from_file_location(f"decode_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@triton.jit
def _empty3(a0, a1, a2):
    pass


@triton.jit
def _empty29(a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15, a16, a17, a18, a19, a20, a21,
             a22, a23, a24, a25, a26, a27, a28):
    pass


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def time_batch(versions: dict, b: int, cache: int, pat, res: dict) -> None:
    kc = torch.randn(b, cache, 8, 128, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    q = torch.randn(b, 1, 32, 128, device="cuda", dtype=torch.bfloat16)
    lens = torch.randint(cache * 3 // 4, cache + 1, (b,), device="cuda", dtype=torch.int32)
    lens[0] = cache
    ref = decode_reference(q.float(), kc.float(), vc.float(), pat, lens)
    for rep in range(2):
        for name, mod in versions.items():
            fn = lambda mod=mod: mod.launch_decode(q, kc, vc, pat, lens, 128**-0.5)  # noqa: E731
            outs = [fn() for _ in range(10)]
            res[f"{name}_b{b}_rep{rep}"] = {
                "rel_err": max(((o.float() - ref).norm() / ref.norm()).item() for o in outs),
                "deterministic": all(torch.equal(outs[0], o) for o in outs),
                "eager_us": 1e3 * triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"),
                "graph_us": 1e3 * triton.testing.do_bench(graphed(fn), warmup=25, rep=100, return_mode="median"),
                "loop_us": 1e3 * wall_ms(fn, 2000)}
            print(name, b, rep, json.dumps(res[f"{name}_b{b}_rep{rep}"]), flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old", action="append", default=[], metavar="NAME=PATH", help="an older decode.py")
    p.add_argument("--cache", type=int, default=131072)
    p.add_argument("--out", default="bench/results")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    versions = {}
    for spec in args.old:
        name, _, path = spec.partition("=")
        if not path or not Path(path).is_file():
            p.error(f"--old {spec!r}: want NAME=PATH to a decode.py")
        versions[name] = load(name, path)
    versions["current"] = current

    pat = powerattn.make_pattern("power", block_size=256)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "command": "python bench/decode_versions.py " + " ".join(argv or sys.argv[1:])}
    for b in (1, 8):
        time_batch(versions, b, args.cache, pat, res)
    q = torch.randn(1, 1, 32, 128, device="cuda", dtype=torch.bfloat16)
    kc = torch.randn(1, args.cache, 8, 128, device="cuda", dtype=torch.bfloat16)
    lens = torch.tensor([args.cache], device="cuda", dtype=torch.int32)
    for name, mod in versions.items():
        real, mod._decode_kernel = mod._decode_kernel, _NoLaunch()
        if hasattr(mod, "_plan"):  # plans may hold a compiled kernel that launches without _decode_kernel
            mod._plan.cache_clear()
        try:
            res[f"host_{name}_launch_decode_minus_kernel_us"] = 1e3 * wall_ms(
                lambda mod=mod: mod.launch_decode(q, kc, kc, pat, lens, 0.088), 3000)
        finally:
            mod._decode_kernel = real
            if hasattr(mod, "_plan"):
                mod._plan.cache_clear()
    res["host_current_launch_decode_us"] = 1e3 * wall_ms(
        lambda: current.launch_decode(q, kc, kc, pat, lens, 0.088), 3000)
    res["host_current_decode_attention_us"] = 1e3 * wall_ms(
        lambda: powerattn.decode_attention(q, kc, kc, pat, lens, backend="triton"), 3000)
    # The floor under any Triton launch from Python: an empty kernel, with few and with as many arguments as
    # the two-launch decode kernel had (10 tensors, the rest integers > 1 so none is specialised away).
    args29 = [q] * 10 + [3] * 19
    res["host_empty_kernel_29_args_us"] = 1e3 * wall_ms(lambda: _empty29[(1, 8, 33)](*args29), 3000)
    res["host_empty_kernel_3_args_us"] = 1e3 * wall_ms(lambda: _empty3[(1, 8, 33)](q, q, 7), 3000)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode_versions.json").write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k.startswith("host")}))


if __name__ == "__main__":
    main()
