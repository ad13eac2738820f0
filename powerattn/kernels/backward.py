"""Backward block-sparse attention: delta = rowsum(dO * O), then dK/dV and dQ kernels.

dK/dV: one program owns one key tile of one KV head and walks the transposed table (the query
tiles that read it) for every query head of its GQA group, so the group's reduction happens in
registers: no atomics, no float32 copy of K/V per head. dQ: one program owns one query tile and
walks the forward table. Both recompute P from the saved base-2 log-sum-exp; deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from powerattn.kernels.forward import query_tile_program, rows_descriptor, sequence_bounds
from powerattn.patterns import BlockTables


@triton.jit
def _delta_kernel(O, DO, DELTA, n_rows, n_heads, stride_ob, stride_os, stride_oh, stride_db, stride_ds,
                  stride_dh, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
    pid_bh = tl.program_id(1)
    batch, head = (pid_bh // n_heads).to(tl.int64), pid_bh % n_heads
    offs = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    ok = offs < n_rows
    o = tl.load(O + batch * stride_ob + head * stride_oh + offs[:, None] * stride_os + offs_d[None, :],
                mask=ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + batch * stride_db + head * stride_dh + offs[:, None] * stride_ds + offs_d[None, :],
                 mask=ok[:, None], other=0.0).to(tl.float32)
    tl.store(DELTA + pid_bh.to(tl.int64) * n_rows + offs, tl.sum(o * do, 1), mask=ok)


@triton.jit
def _valid_count(idx_ptr, lo, hi, limit, CHUNK: tl.constexpr):
    """How many of the ascending entries idx[lo:hi] are < limit (tables may cover a longer length)."""
    n = lo * 0
    for c in range(lo, hi, CHUNK):
        offs = c + tl.arange(0, CHUNK)
        vals = tl.load(idx_ptr + offs, mask=offs < hi, other=limit)
        n += tl.sum((vals < limit).to(tl.int32), 0)
    return n


@triton.jit
def _dkdv_step(dk, dv, k, v, q_desc, do_desc, lse_base, delta_base, row0, col, first, offs_n, seqlen, qk_scale,
               BLOCK_M: tl.constexpr, MASKED: tl.constexpr):
    offs_m = first + tl.arange(0, BLOCK_M)
    row_ok = offs_m < seqlen
    # Rows past the sequence end arrive as zeros or as the next document's rows; lse = +inf there
    # makes their P (and so dS) exactly zero.
    q = q_desc.load([row0 + first, col])  # [BLOCK_M, HEAD_DIM]
    do = do_desc.load([row0 + first, col])
    lse = tl.load(lse_base + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
    p_t = tl.math.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse[None, :])  # [BLOCK_N, BLOCK_M]
    if MASKED:
        p_t = tl.where(offs_n[:, None] <= offs_m[None, :], p_t, 0.0)
    dv += tl.dot(p_t.to(do.dtype), do)
    dp_t = tl.dot(v, tl.trans(do))
    ds_t = p_t * (dp_t - delta[None, :])
    dk += tl.dot(ds_t.to(q.dtype), q)
    return dk, dv


@triton.jit
def _dkdv_kernel(
    q_desc, K, V, do_desc, LSE, DELTA, DK, DV, q_ptr, q_idx, q_full, order, cu_seqlens,
    seq_len, n_kv_heads, n_seq, n_tiles, n_heavy, qk_scale, sm_scale,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dkb, stride_dks, stride_dkh,
    stride_dvb, stride_dvs, stride_dvh,
    stride_lb, stride_lh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    VARLEN: tl.constexpr,
):
    # Schedule: the few key tiles read by far more query tiles than the rest (the sink block) go
    # first, for every (sequence, KV head), so no long program starts late and runs alone at the
    # end; then the others, neighbouring key tiles of one head together so their query tiles are
    # shared in L2.
    pid = tl.program_id(0)
    n_streams = n_seq * n_kv_heads
    if pid < n_heavy * n_streams:
        rank = pid // n_streams
        pid_bh = pid % n_streams
    else:
        rest = pid - n_heavy * n_streams
        rank = n_heavy + rest % (n_tiles - n_heavy)
        pid_bh = rest // (n_tiles - n_heavy)
    pid_n = tl.load(order + rank)
    kv_head = pid_bh % n_kv_heads
    batch, row0, start, seqlen = sequence_bounds(cu_seqlens, pid_bh // n_kv_heads, seq_len, VARLEN)
    if pid_n * BLOCK_N >= seqlen:
        return
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = offs_n < seqlen
    k = tl.load(K + batch * stride_kb + kv_head * stride_kh + (start + offs_n)[:, None] * stride_ks + offs_d[None, :],
                mask=col_ok[:, None], other=0.0)
    v = tl.load(V + batch * stride_vb + kv_head * stride_vh + (start + offs_n)[:, None] * stride_vs + offs_d[None, :],
                mask=col_ok[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)

    n_q_tiles = tl.cdiv(seqlen, BLOCK_M)
    lo = tl.load(q_ptr + pid_n)
    mid = lo + tl.load(q_full + pid_n)
    hi = tl.load(q_ptr + pid_n + 1)
    mid_valid = lo + _valid_count(q_idx, lo, mid, n_q_tiles, 64)
    hi_valid = mid + _valid_count(q_idx, mid, hi, n_q_tiles, 64)
    for g in range(GROUP):
        head = kv_head * GROUP + g
        lse_base = LSE + batch * stride_lb + head * stride_lh + start
        delta_base = DELTA + (batch * n_kv_heads * GROUP + head) * seq_len + start
        for j in range(lo, mid_valid):
            dk, dv = _dkdv_step(dk, dv, k, v, q_desc, do_desc, lse_base, delta_base, row0, head * HEAD_DIM,
                                tl.load(q_idx + j) * BLOCK_M, offs_n, seqlen, qk_scale, BLOCK_M, False)
        for j in range(mid, hi_valid):
            dk, dv = _dkdv_step(dk, dv, k, v, q_desc, do_desc, lse_base, delta_base, row0, head * HEAD_DIM,
                                tl.load(q_idx + j) * BLOCK_M, offs_n, seqlen, qk_scale, BLOCK_M, True)

    dk_ptrs = DK + batch * stride_dkb + kv_head * stride_dkh + (start + offs_n)[:, None] * stride_dks + offs_d[None, :]
    dv_ptrs = DV + batch * stride_dvb + kv_head * stride_dvh + (start + offs_n)[:, None] * stride_dvs + offs_d[None, :]
    tl.store(dk_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def _dq_step(dq, q, do, lse, delta, k_desc, v_desc, row0, col, first, offs_m, seqlen, qk_scale,
             BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    k = k_desc.load([row0 + first, col])  # [BLOCK_N, HEAD_DIM]
    v = v_desc.load([row0 + first, col])
    p = tl.math.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None])
    if MASKED:
        offs_n = first + tl.arange(0, BLOCK_N)
        p = tl.where((offs_n[None, :] <= offs_m[:, None]) & (offs_n < seqlen)[None, :], p, 0.0)
    dp = tl.dot(do, tl.trans(v))
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(k.dtype), k)
    return dq


@triton.jit
def _dq_kernel(
    Q, k_desc, v_desc, DO, LSE, DELTA, DQ, kv_ptr, kv_idx, kv_full, cu_seqlens,
    seq_len, n_heads, qk_scale, sm_scale,
    stride_qb, stride_qs, stride_qh,
    stride_dob, stride_dos, stride_doh,
    stride_dqb, stride_dqs, stride_dqh,
    stride_lb, stride_lh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    VARLEN: tl.constexpr,
):
    pid_m, pid_bh, head = query_tile_program(n_heads, GROUP)  # the forward's program order
    batch, row0, start, seqlen = sequence_bounds(cu_seqlens, pid_bh // (n_heads // GROUP), seq_len, VARLEN)
    if pid_m * BLOCK_M >= seqlen:
        return
    col = (head // GROUP) * HEAD_DIM
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seqlen
    rows = (start + offs_m)[:, None]
    q = tl.load(Q + batch * stride_qb + head * stride_qh + rows * stride_qs + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + batch * stride_dob + head * stride_doh + rows * stride_dos + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0)
    lse = tl.load(LSE + batch * stride_lb + head * stride_lh + start + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + (batch * n_heads + head) * seq_len + start + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    lo = tl.load(kv_ptr + pid_m)
    mid = lo + tl.load(kv_full + pid_m)
    hi = tl.load(kv_ptr + pid_m + 1)
    for j in range(lo, mid):
        dq = _dq_step(dq, q, do, lse, delta, k_desc, v_desc, row0, col, tl.load(kv_idx + j) * BLOCK_N, offs_m,
                      seqlen, qk_scale, BLOCK_N, False)
    for j in range(mid, hi):
        dq = _dq_step(dq, q, do, lse, delta, k_desc, v_desc, row0, col, tl.load(kv_idx + j) * BLOCK_N, offs_m,
                      seqlen, qk_scale, BLOCK_N, True)
    dq_ptrs = DQ + batch * stride_dqb + head * stride_dqh + rows * stride_dqs + offs_d[None, :]
    tl.store(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])


def launch_delta(o: torch.Tensor, do: torch.Tensor) -> torch.Tensor:
    """delta [b, h, s] = rowsum(dO * O) in float32."""
    b, s, h, d = o.shape
    delta = torch.empty((b, h, s), device=o.device, dtype=torch.float32)
    block = 64
    _delta_kernel[(triton.cdiv(s, block), b * h)](
        o, do, delta, s, h, o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1), do.stride(2),
        HEAD_DIM=d, BLOCK=block,
    )
    return delta


def launch_dkdv(q, k, v, do, lse, delta, tables: BlockTables, schedule: tuple[torch.Tensor, int], cu_seqlens,
                max_seqlen: int, scale: float, cfg: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """dK, dV [b, s, kv_heads, d] from the transposed table at (BLOCK_M, BLOCK_N) tiles.

    `schedule` = (key-tile order, number of heavy tiles at its front), from `heavy_first_order`.
    """
    b, s, h, d = q.shape
    hkv = k.shape[2]
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    n_seq = b if cu_seqlens is None else cu_seqlens.numel() - 1
    order, n_heavy = schedule
    _dkdv_kernel[(order.numel() * n_seq * hkv,)](
        rows_descriptor(q, cfg["BLOCK_M"]), k, v, rows_descriptor(do, cfg["BLOCK_M"]), lse, delta, dk, dv,
        tables.q_ptr, tables.q_idx, tables.q_full, order, cu_seqlens,
        s, hkv, n_seq, order.numel(), n_heavy, scale * 1.4426950408889634, scale,
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2),
        dv.stride(0), dv.stride(1), dv.stride(2),
        lse.stride(0), lse.stride(1),
        GROUP=h // hkv, HEAD_DIM=d, VARLEN=cu_seqlens is not None, **cfg,
    )
    return dk, dv


def heavy_first_order(tables: BlockTables, factor: int = 4) -> tuple[torch.Tensor, int]:
    """Key tiles whose column is over `factor` x the mean length first (longest first), then the rest in order."""
    lens = (tables.q_ptr[1:] - tables.q_ptr[:-1]).cpu().long()
    heavy = torch.nonzero(lens > factor * lens.float().mean(), as_tuple=True)[0]
    heavy = heavy[torch.argsort(lens[heavy], descending=True, stable=True)]
    light = torch.nonzero(lens <= factor * lens.float().mean(), as_tuple=True)[0]
    order = torch.cat([heavy, light]).int().to(tables.q_ptr.device)
    return order, int(heavy.numel())


def launch_dq(q, k, v, do, lse, delta, tables: BlockTables, cu_seqlens, max_seqlen: int, scale: float,
              cfg: dict) -> torch.Tensor:
    """dQ [b, s, h, d] from the forward table at (BLOCK_M, BLOCK_N) tiles."""
    b, s, h, d = q.shape
    dq = torch.empty_like(q)
    n_seq = b if cu_seqlens is None else cu_seqlens.numel() - 1
    group = h // k.shape[2]
    grid = (triton.cdiv(max_seqlen, cfg["BLOCK_M"]) * group, n_seq * k.shape[2])
    _dq_kernel[grid](
        q, rows_descriptor(k, cfg["BLOCK_N"]), rows_descriptor(v, cfg["BLOCK_N"]), do, lse, delta, dq,
        tables.kv_ptr, tables.kv_idx, tables.kv_full, cu_seqlens,
        s, h, scale * 1.4426950408889634, scale,
        q.stride(0), q.stride(1), q.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        lse.stride(0), lse.stride(1),
        GROUP=h // k.shape[2], HEAD_DIM=d, VARLEN=cu_seqlens is not None, **cfg,
    )
    return dq
