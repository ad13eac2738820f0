"""Backward block-sparse attention: delta = rowsum(dO * O), then dK/dV and dQ kernels.

dK/dV: one program owns one key tile of one KV head and walks the transposed table (the query
tiles that read it) for every query head of its GQA group, so the group's reduction happens in
registers: no atomics, no float32 copy of K/V per head. A few key tiles are read by far more
query tiles than the rest (the sink block: every query tile); their columns are cut into pieces,
one program each, whose float32 partial sums a small kernel adds in a fixed order. dQ: one
program owns one query tile and walks the forward table. Both recompute P from the saved base-2
log-sum-exp; everything is deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from powerattn.kernels.common import LOG2_E, query_tile_program, rows_descriptor, sequence_bounds
from powerattn.kernels.tables import DkdvSchedule
from powerattn.patterns import BlockTables

DELTA_ROWS = 64  # rows of one head per program of the delta kernel
REDUCE_ROWS = 32  # rows of one split key tile per program of the dK/dV reduce
COUNT_CHUNK = tl.constexpr(64)  # table entries _valid_count reads at once


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
def _valid_count(idx_ptr, lo, hi, limit):
    """How many of the ascending entries idx[lo:hi] are < limit (tables may cover a longer length)."""
    n = lo * 0
    for c in range(lo, hi, COUNT_CHUNK):
        offs = c + tl.arange(0, COUNT_CHUNK)
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
def dkdv_kernel(
    q_desc, K, V, do_desc, LSE, DELTA, DK, DV, WS_DK, WS_DV, slots, q_ptr, q_idx, q_full, items, cu_seqlens,
    seq_len, n_kv_heads, n_seq, n_items, n_pieces, qk_scale, sm_scale,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dkb, stride_dks, stride_dkh,
    stride_dvb, stride_dvs, stride_dvh,
    stride_lb, stride_lh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    VARLEN: tl.constexpr,
):
    # Schedule (see tables.heavy_first_schedule): the pieces of heavy columns first, for every (sequence,
    # KV head), so no long program starts late and runs alone at the end; then whole columns,
    # neighbouring key tiles of one head together so their query tiles are shared in L2.
    pid = tl.program_id(0)
    n_streams = n_seq * n_kv_heads
    if pid < n_pieces * n_streams:
        item = pid // n_streams
        pid_bh = pid % n_streams
    else:
        rest = pid - n_pieces * n_streams
        item = n_pieces + rest % (n_items - n_pieces)
        pid_bh = rest // (n_items - n_pieces)
    pid_n = tl.load(items + 4 * item)
    first = tl.load(items + 4 * item + 1)  # this program's slice [first, last) of the column's full tiles
    last = tl.load(items + 4 * item + 2)
    with_diagonal = tl.load(items + 4 * item + 3)  # and whether it also walks the diagonal tiles
    kv_head, seq = pid_bh % n_kv_heads, pid_bh // n_kv_heads
    # A piece's slot (see DkdvSchedule.slots): >= 0 its workspace slot, -2 it alone covers its column
    # in this sequence and writes dK/dV itself, -1 no work here. Whole columns: -2.
    slot = tl.full([], -2, tl.int32)
    if item < n_pieces:
        slot = tl.load(slots + item * n_seq + seq)
    batch, row0, start, seqlen = sequence_bounds(cu_seqlens, seq, seq_len, VARLEN)
    if pid_n * BLOCK_N >= seqlen or slot == -1:
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

    # A column lists its full query tiles, then its diagonal ones; each list ascends, so the tiles
    # inside this sequence (the table may cover a longer one) are a prefix of each.
    n_q_tiles = tl.cdiv(seqlen, BLOCK_M)
    full_hi = first + _valid_count(q_idx, first, last, n_q_tiles)
    diag_lo = tl.load(q_ptr + pid_n) + tl.load(q_full + pid_n)
    diag_hi = diag_lo
    if with_diagonal:
        diag_hi += _valid_count(q_idx, diag_lo, tl.load(q_ptr + pid_n + 1), n_q_tiles)
    for g in range(GROUP):
        head = kv_head * GROUP + g
        lse_base = LSE + batch * stride_lb + head * stride_lh + start
        delta_base = DELTA + (batch * n_kv_heads * GROUP + head) * seq_len + start
        for j in range(first, full_hi):
            dk, dv = _dkdv_step(dk, dv, k, v, q_desc, do_desc, lse_base, delta_base, row0, head * HEAD_DIM,
                                tl.load(q_idx + j) * BLOCK_M, offs_n, seqlen, qk_scale, BLOCK_M, False)
        for j in range(diag_lo, diag_hi):
            dk, dv = _dkdv_step(dk, dv, k, v, q_desc, do_desc, lse_base, delta_base, row0, head * HEAD_DIM,
                                tl.load(q_idx + j) * BLOCK_M, offs_n, seqlen, qk_scale, BLOCK_M, True)

    if slot >= 0:  # one of several pieces of its column: partial sums to its slot, unscaled
        offs_r = tl.arange(0, BLOCK_N)
        ws = ((slot * n_kv_heads + kv_head).to(tl.int64) * BLOCK_N + offs_r[:, None]) * HEAD_DIM + offs_d[None, :]
        tl.store(WS_DK + ws, dk)
        tl.store(WS_DV + ws, dv)
    else:
        dk_ptrs = DK + batch * stride_dkb + kv_head * stride_dkh + (start + offs_n)[:, None] * stride_dks
        dv_ptrs = DV + batch * stride_dvb + kv_head * stride_dvh + (start + offs_n)[:, None] * stride_dvs
        tl.store(dk_ptrs + offs_d[None, :], (dk * sm_scale).to(DK.dtype.element_ty), mask=col_ok[:, None])
        tl.store(dv_ptrs + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def _dkdv_reduce_kernel(
    WS_DK, WS_DV, DK, DV, slots, cut, split_tiles, split_ptr, cu_seqlens, seq_len, n_kv_heads, n_seq, sm_scale,
    stride_dkb, stride_dks, stride_dkh,
    stride_dvb, stride_dvs, stride_dvh,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr, VARLEN: tl.constexpr,
):
    # dK, dV of ROWS rows of one split key tile in one sequence: its pieces' partial sums, added in
    # piece order. Nothing to do where the column is absent or a single piece covered it (cut == 0).
    pid_bh = tl.program_id(1)
    kv_head, seq = pid_bh % n_kv_heads, pid_bh // n_kv_heads
    if tl.load(cut + tl.program_id(0) * n_seq + seq) == 0:
        return
    pid_n = tl.load(split_tiles + tl.program_id(0))
    batch, row0, start, seqlen = sequence_bounds(cu_seqlens, seq, seq_len, VARLEN)
    offs_r = tl.program_id(2) * ROWS + tl.arange(0, ROWS)
    offs_d = tl.arange(0, HEAD_DIM)
    dk = tl.zeros([ROWS, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([ROWS, HEAD_DIM], dtype=tl.float32)
    for piece in range(tl.load(split_ptr + tl.program_id(0)), tl.load(split_ptr + tl.program_id(0) + 1)):
        slot = tl.load(slots + piece * n_seq + seq)
        if slot >= 0:  # -1: this piece had no work in this sequence
            ws = ((slot * n_kv_heads + kv_head).to(tl.int64) * BLOCK_N + offs_r[:, None]) * HEAD_DIM + offs_d[None, :]
            dk += tl.load(WS_DK + ws)
            dv += tl.load(WS_DV + ws)
    offs_n = pid_n * BLOCK_N + offs_r
    col_ok = offs_n < seqlen
    dk_ptrs = DK + batch * stride_dkb + kv_head * stride_dkh + (start + offs_n)[:, None] * stride_dks
    dv_ptrs = DV + batch * stride_dvb + kv_head * stride_dvh + (start + offs_n)[:, None] * stride_dvs
    tl.store(dk_ptrs + offs_d[None, :], (dk * sm_scale).to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(dv_ptrs + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


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
def dq_kernel(
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
    _delta_kernel[(triton.cdiv(s, DELTA_ROWS), b * h)](
        o, do, delta, s, h, o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1), do.stride(2),
        HEAD_DIM=d, BLOCK=DELTA_ROWS,
    )
    return delta


def launch_dkdv(q, k, v, do, lse, delta, tables: BlockTables, schedule: DkdvSchedule, cu_seqlens,
                scale: float, cfg: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """dK, dV [b, s, kv_heads, d] from the transposed table at (BLOCK_M, BLOCK_N) tiles."""
    b, s, h, d = q.shape
    hkv = k.shape[2]
    block_n = cfg["BLOCK_N"]
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    n_seq = b if cu_seqlens is None else cu_seqlens.numel() - 1
    n_items = schedule.items.shape[0]
    if schedule.n_pieces:
        seqlens = (torch.full((b,), s, dtype=torch.int32, device=q.device) if cu_seqlens is None
                   else cu_seqlens[1:] - cu_seqlens[:-1])
        slots, cut, capacity = schedule.slots(seqlens, b * s)
    else:
        slots = cut = torch.empty(0, dtype=torch.int32, device=q.device)
        capacity = 0
    # One float32 [BLOCK_N, d] slot per (piece, sequence, KV head) where a column is really cut: 24 MB
    # for one 128K sequence with 8 KV heads, at most 80 MB for any packing of 128K tokens.
    ws_dk = torch.empty((capacity, hkv, block_n, d), device=q.device, dtype=torch.float32)
    ws_dv = torch.empty_like(ws_dk)
    dkdv_kernel[(n_items * n_seq * hkv,)](
        rows_descriptor(q, cfg["BLOCK_M"]), k, v, rows_descriptor(do, cfg["BLOCK_M"]), lse, delta, dk, dv,
        ws_dk, ws_dv, slots, tables.q_ptr, tables.q_idx, tables.q_full, schedule.items, cu_seqlens,
        s, hkv, n_seq, n_items, schedule.n_pieces, scale * LOG2_E, scale,
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2),
        dv.stride(0), dv.stride(1), dv.stride(2),
        lse.stride(0), lse.stride(1),
        GROUP=h // hkv, HEAD_DIM=d, VARLEN=cu_seqlens is not None, **cfg,
    )
    if schedule.n_pieces:
        rows = min(block_n, REDUCE_ROWS)
        _dkdv_reduce_kernel[(schedule.split_tiles.numel(), n_seq * hkv, block_n // rows)](
            ws_dk, ws_dv, dk, dv, slots, cut, schedule.split_tiles, schedule.split_ptr, cu_seqlens, s, hkv, n_seq,
            scale,
            dk.stride(0), dk.stride(1), dk.stride(2),
            dv.stride(0), dv.stride(1), dv.stride(2),
            HEAD_DIM=d, BLOCK_N=block_n, ROWS=rows, VARLEN=cu_seqlens is not None, num_warps=4,
        )
    return dk, dv


def launch_dq(q, k, v, do, lse, delta, tables: BlockTables, cu_seqlens, max_seqlen: int, scale: float,
              cfg: dict) -> torch.Tensor:
    """dQ [b, s, h, d] from the forward table at (BLOCK_M, BLOCK_N) tiles."""
    b, s, h, d = q.shape
    dq = torch.empty_like(q)
    n_seq = b if cu_seqlens is None else cu_seqlens.numel() - 1
    group = h // k.shape[2]
    grid = (triton.cdiv(max_seqlen, cfg["BLOCK_M"]) * group, n_seq * k.shape[2])
    dq_kernel[grid](
        q, rows_descriptor(k, cfg["BLOCK_N"]), rows_descriptor(v, cfg["BLOCK_N"]), do, lse, delta, dq,
        tables.kv_ptr, tables.kv_idx, tables.kv_full, cu_seqlens,
        s, h, scale * LOG2_E, scale,
        q.stride(0), q.stride(1), q.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        lse.stride(0), lse.stride(1),
        GROUP=group, HEAD_DIM=d, VARLEN=cu_seqlens is not None, **cfg,
    )
    return dq
