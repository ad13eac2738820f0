# ruff: noqa: E741  (a copy of powerattn/kernels/forward.py for one experiment, removed in the next commit)
"""Forward block-sparse attention: online softmax (exp2) over the key tiles a pattern's table names.

One program owns one query tile of one head. It walks its row of the forward table: first the
tiles wholly below the causal diagonal (no mask), then the few that overlap it. K and V tiles
arrive through tensor descriptors (TMA on Hopper): the address of a tile is two scalars, so no
[tile x head_dim] offset tensor lives in registers across the loop. Saves the base-2 log-sum-exp.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from powerattn.kernels.common import LOG2_E, query_tile_program, rows_descriptor, sequence_bounds
from powerattn.patterns import BlockTables


@triton.jit
def _tile_update(acc, m_i, l_i, q, k_desc, v_desc, row0, col, first, offs_m, seqlen, qk_scale,
                 BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    """Fold the key tile starting at `first` into the running (acc, max, sum) of the online softmax."""
    # Rows past the sequence end come back as zeros (or as the next document's rows in packed
    # input): masked tiles mask them below, full tiles never reach them.
    k = k_desc.load([row0 + first, col])
    v = v_desc.load([row0 + first, col])
    qk = tl.dot(q, tl.trans(k))
    if MASKED:
        offs_n = first + tl.arange(0, BLOCK_N)
        keep = (offs_n[None, :] <= offs_m[:, None]) & (offs_n < seqlen)[None, :]
        qk = tl.where(keep, qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # A row with no key yet keeps m = -inf; shift by 0 then so exp2 gives 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
    else:
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i


@triton.jit
def fwd_kernel(
    Q, k_desc, v_desc, O, LSE, kv_ptr, kv_idx, kv_full, cu_seqlens,
    seq_len, n_heads, qk_scale,
    stride_qb, stride_qs, stride_qh,
    stride_ob, stride_os, stride_oh,
    stride_lb, stride_lh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    VARLEN: tl.constexpr,
):
    pid_m, pid_bh, head = query_tile_program(n_heads, GROUP)
    batch, row0, start, seqlen = sequence_bounds(cu_seqlens, pid_bh // (n_heads // GROUP), seq_len, VARLEN)
    if pid_m * BLOCK_M >= seqlen:
        return
    col = (head // GROUP) * HEAD_DIM
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seqlen
    q_ptrs = Q + batch * stride_qb + head * stride_qh + (start + offs_m).to(tl.int64)[:, None] * stride_qs \
        + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    lo = tl.load(kv_ptr + pid_m)
    mid = lo + tl.load(kv_full + pid_m)
    hi = tl.load(kv_ptr + pid_m + 1)
    for j in tl.range(lo, mid, warp_specialize=True):
        first = tl.load(kv_idx + j) * BLOCK_N
        acc, m_i, l_i = _tile_update(acc, m_i, l_i, q, k_desc, v_desc, row0, col, first, offs_m, seqlen, qk_scale,
                                     BLOCK_N, False)
    for j in range(mid, hi):
        first = tl.load(kv_idx + j) * BLOCK_N
        acc, m_i, l_i = _tile_update(acc, m_i, l_i, q, k_desc, v_desc, row0, col, first, offs_m, seqlen, qk_scale,
                                     BLOCK_N, True)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(l_i == 0.0, float("inf"), m_i + tl.math.log2(l_safe))
    o_ptrs = O + batch * stride_ob + head * stride_oh + (start + offs_m).to(tl.int64)[:, None] * stride_os \
        + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + batch * stride_lb + head * stride_lh + start + offs_m, lse, mask=row_ok)


def launch_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tables: BlockTables, cu_seqlens: torch.Tensor | None,
    max_seqlen: int, scale: float, cfg: dict,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the forward kernel; returns out [b, s, h, d] and base-2 LSE [b, h, s] (float32)."""
    b, s, h, d = q.shape
    o = torch.empty_like(q)
    lse = torch.empty((b, h, s), device=q.device, dtype=torch.float32)
    n_seq = b if cu_seqlens is None else cu_seqlens.numel() - 1
    group = h // k.shape[2]
    grid = (triton.cdiv(max_seqlen, cfg["BLOCK_M"]) * group, n_seq * k.shape[2])
    fwd_kernel[grid](
        q, rows_descriptor(k, cfg["BLOCK_N"]), rows_descriptor(v, cfg["BLOCK_N"]), o, lse,
        tables.kv_ptr, tables.kv_idx, tables.kv_full, cu_seqlens,
        s, h, scale * LOG2_E,
        q.stride(0), q.stride(1), q.stride(2),
        o.stride(0), o.stride(1), o.stride(2),
        lse.stride(0), lse.stride(1),
        GROUP=group, HEAD_DIM=d, VARLEN=cu_seqlens is not None, **cfg,
    )
    return o, lse
