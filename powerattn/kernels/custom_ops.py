"""The kernels as torch custom ops with autograd, and the entry points `sparse_attention` dispatches to.

Registering them as custom ops keeps torch.compile from tracing into Triton (no graph breaks) and
lets autograd save only what the backward kernels need: the output and its base-2 log-sum-exp.
The hot path does no host synchronisation (pass max_seqlen with cu_seqlens to avoid the one sync
varlen needs): index tables and schedules come from the caches in `tables`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from powerattn.kernels.backward import launch_delta, launch_dkdv, launch_dq
from powerattn.kernels.common import HEAD_DIMS, MIN_DOT, contiguous, interpreting
from powerattn.kernels.decode import launch_decode
from powerattn.kernels.forward import launch_forward
from powerattn.kernels.tables import device_tables, dkdv_schedule
from powerattn.kernels.tuning import pick_config
from powerattn.patterns import Pattern, pattern_from_key


def triton_supports(q: Tensor, pattern: Pattern) -> bool:
    """Whether the Triton backend handles these inputs (the dispatcher falls back to flex if not)."""
    dtypes = (torch.float16, torch.bfloat16) if q.is_cuda else (torch.float16, torch.float32)
    return (
        (q.is_cuda or interpreting())
        and q.dtype in dtypes
        and q.shape[-1] in HEAD_DIMS
        and pattern.block_size % MIN_DOT == 0
    )


def _check_supported(q: Tensor, pattern: Pattern) -> None:
    if not triton_supports(q, pattern):
        raise ValueError(
            "triton backend needs CUDA (or TRITON_INTERPRET=1 on CPU), fp16/bf16 inputs (fp32 only in the "
            f"interpreter), head_dim a power of 2 in [16, 256] and block_size % 16 == 0; got device "
            f"{q.device}, dtype {q.dtype}, head_dim {q.shape[-1]}, block_size {pattern.block_size}"
        )


def run_forward(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor | None, max_seqlen: int, scale: float,
                pattern: Pattern, cfg: dict | None = None) -> tuple[Tensor, Tensor]:
    """The forward kernel at `cfg` (default: the tuned config): (out [b, s, h, d], base-2 LSE [b, h, s])."""
    def run(c):
        tables = device_tables(pattern, max_seqlen, c["BLOCK_M"], c["BLOCK_N"], q.device)
        return launch_forward(q, k, v, tables, cu_seqlens, max_seqlen, scale, c)

    return run(cfg or pick_config("fwd", q, k, pattern, max_seqlen, run))


def run_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, cu_seqlens: Tensor | None,
                 max_seqlen: int, scale: float, pattern: Pattern) -> tuple[Tensor, Tensor, Tensor]:
    """The backward kernels at their tuned configs: (dq, dk, dv)."""
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
    return run_forward(q, k, v, cu_seqlens, max_seqlen, scale, pattern_from_key(pattern_key))


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
    return run_backward(do, q, k, v, o, lse, cu_seqlens, max_seqlen, scale, pattern_from_key(pattern_key))


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
        contiguous(do), q, k, v, o, lse, cu_seqlens, ctx.max_seqlen, ctx.scale, ctx.pattern_key
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
    q, k, v = (contiguous(t) for t in (q, k, v))
    out, _ = sparse_attn_fwd(q, k, v, cu_seqlens, int(max_seqlen), float(scale), pattern.key)
    return out


def triton_decode(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, pattern: Pattern, cache_seqlens: Tensor, scale: float
) -> Tensor:
    """Split-K decode / chunked prefill against a KV cache (see kernels.decode)."""
    _check_supported(q, pattern)
    q, k_cache, v_cache = (contiguous(t) for t in (q, k_cache, v_cache))
    return launch_decode(q, k_cache, v_cache, pattern, cache_seqlens.to(q.device, torch.int32), scale)
