"""Triton kernels for block-sparse attention, wrapped as torch custom ops with autograd.

GPU in production; on CPU the same kernels run under TRITON_INTERPRET=1 for the tests. Index
tables are built once per (pattern, length bucket, tiles, device) and cached, so the hot path
does no host synchronisation (pass max_seqlen with cu_seqlens to avoid the one sync varlen needs).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from powerattn.kernels.tuning import pick_config
from powerattn.patterns import BlockTables, Pattern, pattern_from_key

_DEVICE_TABLES: dict[tuple, BlockTables] = {}


def interpreting() -> bool:
    """True when Triton runs its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_supports(q: Tensor, pattern: Pattern) -> bool:
    """Whether the Triton backend handles these inputs (the dispatcher falls back to flex if not)."""
    d = q.shape[-1]
    dtypes = (torch.float16, torch.bfloat16) if q.is_cuda else (torch.float16, torch.float32)
    return (
        (q.is_cuda or interpreting())
        and q.dtype in dtypes
        and d in (16, 32, 64, 128, 256)
        and pattern.block_size % 16 == 0
    )


def _check_supported(q: Tensor, pattern: Pattern) -> None:
    if not triton_supports(q, pattern):
        raise ValueError(
            "triton backend needs CUDA (or TRITON_INTERPRET=1 on CPU), fp16/bf16 inputs (fp32 only in the "
            f"interpreter), head_dim a power of 2 in [16, 256] and block_size % 16 == 0; got device "
            f"{q.device}, dtype {q.dtype}, head_dim {q.shape[-1]}, block_size {pattern.block_size}"
        )


def _table_length(n: int, block_size: int) -> int:
    """Round lengths up to a power of two of blocks: rows do not depend on length, so one table serves many."""
    blocks = -(-n // block_size)
    return block_size * (1 << max(0, blocks - 1).bit_length())


def device_tables(pattern: Pattern, max_seqlen: int, tile_m: int, tile_n: int, device: torch.device) -> BlockTables:
    """The pattern's tables for any length <= max_seqlen, resident on `device` (cached)."""
    n = _table_length(max_seqlen, pattern.block_size)
    key = (pattern, n, tile_m, tile_n, str(device))
    if key not in _DEVICE_TABLES:
        _DEVICE_TABLES[key] = pattern.tables(n, tile_m, tile_n).to(device)
    return _DEVICE_TABLES[key]


_SCHEDULES: dict[tuple, object] = {}


def dkdv_schedule(pattern: Pattern, max_seqlen: int, tile_m: int, tile_n: int, device):
    """Cached work items of the dK/dV kernel (see backward.heavy_first_schedule)."""
    from powerattn.kernels.backward import heavy_first_schedule

    key = (pattern, _table_length(max_seqlen, pattern.block_size), tile_m, tile_n, str(device))
    if key not in _SCHEDULES:
        tables = device_tables(pattern, max_seqlen, tile_m, tile_n, device)
        _SCHEDULES[key] = heavy_first_schedule(tables, tile_m, tile_n)
    return _SCHEDULES[key]


def _contiguous(t: Tensor) -> Tensor:
    # Tensor descriptors view [b, s, h, d] as [b * s, h * d].
    return t if t.is_contiguous() else t.contiguous()


def _forward(q, k, v, cu_seqlens, max_seqlen, scale, pattern, cfg=None):
    from powerattn.kernels.forward import launch_forward

    def run(c):
        tables = device_tables(pattern, max_seqlen, c["BLOCK_M"], c["BLOCK_N"], q.device)
        return launch_forward(q, k, v, tables, cu_seqlens, max_seqlen, scale, c)

    cfg = cfg or pick_config("fwd", q, k, pattern, max_seqlen, run)
    return run(cfg)


def _backward(do, q, k, v, o, lse, cu_seqlens, max_seqlen, scale, pattern):
    from powerattn.kernels.backward import launch_delta, launch_dkdv, launch_dq

    delta = launch_delta(o, do)

    def run_dkdv(c):
        tables = device_tables(pattern, max_seqlen, c["BLOCK_M"], c["BLOCK_N"], q.device)
        schedule = dkdv_schedule(pattern, max_seqlen, c["BLOCK_M"], c["BLOCK_N"], q.device)
        return launch_dkdv(q, k, v, do, lse, delta, tables, schedule, cu_seqlens, scale, c)

    def run_dq(c):
        tables = device_tables(pattern, max_seqlen, c["BLOCK_M"], c["BLOCK_N"], q.device)
        return launch_dq(q, k, v, do, lse, delta, tables, cu_seqlens, max_seqlen, scale, c)

    dk, dv = run_dkdv(pick_config("dkdv", q, k, pattern, max_seqlen, run_dkdv))
    dq = run_dq(pick_config("dq", q, k, pattern, max_seqlen, run_dq))
    return dq, dk, dv


@torch.library.custom_op("powerattn::sparse_attn_fwd", mutates_args=())
def sparse_attn_fwd(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor | None, max_seqlen: int, scale: float, pattern_key: str
) -> tuple[Tensor, Tensor]:
    """Forward kernel as a custom op: (out [b, s, h, d], base-2 LSE [b, h, s])."""
    return _forward(q, k, v, cu_seqlens, max_seqlen, scale, pattern_from_key(pattern_key))


@sparse_attn_fwd.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, scale, pattern_key):
    b, s, h, _ = q.shape
    return torch.empty_like(q), q.new_empty((b, h, s), dtype=torch.float32)


@torch.library.custom_op("powerattn::sparse_attn_bwd", mutates_args=())
def sparse_attn_bwd(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, cu_seqlens: Tensor | None,
    max_seqlen: int, scale: float, pattern_key: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Backward kernels as a custom op: (dq, dk, dv)."""
    return _backward(do, q, k, v, o, lse, cu_seqlens, max_seqlen, scale, pattern_from_key(pattern_key))


@sparse_attn_bwd.register_fake
def _(do, q, k, v, o, lse, cu_seqlens, max_seqlen, scale, pattern_key):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, scale, pattern_key = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, cu_seqlens)
    ctx.max_seqlen, ctx.scale, ctx.pattern_key = max_seqlen, scale, pattern_key


def _autograd_backward(ctx, do, dlse):
    q, k, v, o, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = sparse_attn_bwd(
        _contiguous(do), q, k, v, o, lse, cu_seqlens, ctx.max_seqlen, ctx.scale, ctx.pattern_key
    )
    return dq, dk, dv, None, None, None, None


sparse_attn_fwd.register_autograd(_autograd_backward, setup_context=_setup_context)


def triton_attention(
    q: Tensor, k: Tensor, v: Tensor, pattern: Pattern, cu_seqlens: Tensor | None, scale: float,
    max_seqlen: int | None = None,
) -> Tensor:
    """Block-sparse attention through the Triton kernels (differentiable, torch.compile friendly)."""
    _check_supported(q, pattern)
    if cu_seqlens is None:
        max_seqlen = q.shape[1]
    else:
        cu_seqlens = cu_seqlens.to(device=q.device, dtype=torch.int32)
        if max_seqlen is None:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())  # the one device sync of varlen
    q, k, v = (_contiguous(t) for t in (q, k, v))
    out, _ = sparse_attn_fwd(q, k, v, cu_seqlens, int(max_seqlen), float(scale), pattern.key)
    return out


def triton_decode(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, pattern: Pattern, cache_seqlens: Tensor, scale: float
) -> Tensor:
    """Split-K decode / chunked prefill against a KV cache (see kernels.decode)."""
    from powerattn.kernels.decode import launch_decode

    _check_supported(q, pattern)
    q, k_cache, v_cache = (_contiguous(t) for t in (q, k_cache, v_cache))
    return launch_decode(q, k_cache, v_cache, pattern, cache_seqlens.to(q.device, torch.int32), scale)
