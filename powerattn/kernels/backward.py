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

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from powerattn.kernels.forward import LOG2_E, query_tile_program, rows_descriptor, sequence_bounds
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
    # Schedule (see heavy_first_schedule): the pieces of heavy columns first, for every (sequence,
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
    full_hi = first + _valid_count(q_idx, first, last, n_q_tiles, 64)
    diag_lo = tl.load(q_ptr + pid_n) + tl.load(q_full + pid_n)
    diag_hi = diag_lo
    if with_diagonal:
        diag_hi += _valid_count(q_idx, diag_lo, tl.load(q_ptr + pid_n + 1), n_q_tiles, 64)
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


class DkdvSchedule(NamedTuple):
    """The dK/dV kernel's work items: pieces of heavy key columns first, then whole columns."""

    # int32 [n_items, 4]: (key tile, first, last, with_diagonal): the program walks the column's full
    # query tiles q_idx[first:last], and its diagonal ones too where with_diagonal is 1.
    items: torch.Tensor
    n_pieces: int  # the first n_pieces items are pieces of split columns
    split_tiles: torch.Tensor  # int32 [n_split]: the split key tiles
    split_ptr: torch.Tensor  # int32 [n_split + 1]: split tile i's pieces are items split_ptr[i]:split_ptr[i + 1]
    piece_split: torch.Tensor  # int32 [n_pieces]: which split tile each piece belongs to
    need: torch.Tensor  # int32 [n_pieces]: the shortest sequence in which a piece has work
    bound_need: tuple[int, ...]  # per piece: the shortest sequence in which it needs a workspace slot

    def slots(self, seqlens: torch.Tensor, total_tokens: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Workspace slots for sequences of lengths `seqlens` (device, int32), without a host sync.

        Returns (slots [n_pieces, n_seq]: a slot >= 0, -2 where the piece alone covers its column in
        that sequence and writes dK/dV directly, -1 where it has no work; cut [n_split, n_seq]: whether
        the reduce sums that column; capacity). A piece takes a slot only where its column has work in
        several pieces, so short packed documents cost no workspace; `capacity` bounds the slots for
        any lengths adding up to `total_tokens` (at most total // x sequences are >= x long).
        """
        has = seqlens[None, :] >= self.need[:, None]
        per_split = torch.zeros((self.split_tiles.numel(), seqlens.numel()), dtype=torch.int32, device=has.device)
        per_split.index_add_(0, self.piece_split, has.int())
        cut = per_split >= 2
        use = has & cut[self.piece_split]
        order = torch.cumsum(use.flatten().int(), 0).view_as(use) - 1
        slots = torch.where(use, order, torch.where(has, -2, -1)).int()
        capacity = sum(min(seqlens.numel(), total_tokens // n) for n in self.bound_need)
        return slots, cut.int(), capacity


def heavy_first_schedule(tables: BlockTables, tile_m: int, tile_n: int, factor: float = 4.0) -> DkdvSchedule:
    """Cut every key column longer than ceil(`factor` x the mean) into near-equal pieces no longer than that.

    The sink block's column holds every query tile: uncut, its program runs ~35x longer than an
    ordinary one at 128K and, with few KV heads to hide behind, ends the kernel alone. Pieces go
    first (longest column first), then whole columns in tile order. Pieces split the column's full
    tiles in query order, the first piece also taking the few diagonal ones (the nearest queries),
    so a document reaches a prefix of the pieces and one shorter than the first piece needs no cut.
    """
    if factor < 1:
        raise ValueError(f"heavy_first_schedule: factor must be >= 1 (some columns stay whole), got {factor}")
    q_ptr, q_idx, q_full = (t.cpu().long() for t in (tables.q_ptr, tables.q_idx, tables.q_full))
    lens = q_ptr[1:] - q_ptr[:-1]
    cap = max(1, math.ceil(factor * lens.float().mean().item()))
    n_cut = [min(-(-int(n) // cap), int(f)) for n, f in zip(lens, q_full)]  # pieces; full tiles to cut
    heavy = [t for t in torch.argsort(lens, descending=True, stable=True).tolist() if n_cut[t] >= 2]
    pieces, split_ptr, piece_split, need, bound_need = [], [0], [], [], []
    for i, t in enumerate(heavy):
        lo, n, f = int(q_ptr[t]), n_cut[t], int(q_full[t])
        cuts = [lo + f * j // n for j in range(n + 1)]
        pieces += [(t, a, b, int(j == 0)) for j, (a, b) in enumerate(zip(cuts, cuts[1:]))]
        # A piece has work in a sequence holding its nearest query tile (the first: the key tile's own).
        needs = [t * tile_n + 1] + [int(q_idx[a]) * tile_m + 1 for a in cuts[1:-1]]
        piece_split += [i] * n
        need += needs
        bound_need += [max(x, needs[1]) for x in needs]  # a slot only where >= 2 pieces have work
        split_ptr.append(len(pieces))
    cut = set(heavy)
    whole = [(t, int(q_ptr[t]), int(q_ptr[t] + q_full[t]), 1) for t in range(lens.numel()) if t not in cut]
    as_int32 = lambda x: torch.tensor(x, dtype=torch.int32, device=tables.q_ptr.device)
    return DkdvSchedule(as_int32(pieces + whole).reshape(-1, 4), len(pieces), as_int32(heavy), as_int32(split_ptr),
                        as_int32(piece_split), as_int32(need), tuple(bound_need))


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
    _dkdv_kernel[(n_items * n_seq * hkv,)](
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
        rows = min(block_n, 32)
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
    _dq_kernel[grid](
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
