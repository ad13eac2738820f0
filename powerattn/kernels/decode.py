"""Decode / chunked prefill: queries at the end of a KV cache, split-K over the key blocks they read.

Each query token reads the key blocks of its pattern row (a few dozen at 128K, not the whole
cache). One program takes one query position, one KV head (all query heads of its GQA group as
the rows of the tile) and one slice of that row's key sub-tiles; a second kernel merges the
slices' partial softmaxes by their log-sum-exp.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from powerattn.kernels.common import INTERPRETER_TILE, LOG2_E, MIN_DOT, interpreting
from powerattn.kernels.tables import device_tables, table_length
from powerattn.patterns import Pattern

DECODE_TILE = 64  # key rows per step of the decode loop (a pattern block is several of them)
MAX_SPLITS = 128  # slices of one row at most: the combine kernel reads all of them at once
WAVES = 2  # programs per SM the split count aims for
INTERPRETER_SMS = 4  # stands in for the SM count, so the interpreter exercises several splits


@triton.jit
def _decode_kernel(
    Q, KC, VC, OP, LP, seqlens, kv_ptr, kv_idx,
    n_chunk, n_kv_heads, n_splits, qk_scale,
    stride_qb, stride_qc, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    GROUP: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    PATTERN_BLOCK: tl.constexpr,
):
    pid_q = tl.program_id(0)  # batch * n_chunk + query index in the chunk
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    batch, i = (pid_q // n_chunk).to(tl.int64), pid_q % n_chunk
    length = tl.load(seqlens + batch)
    pos = length - n_chunk + i
    qb = pos // PATTERN_BLOCK
    lo = tl.load(kv_ptr + qb)
    subtiles: tl.constexpr = PATTERN_BLOCK // BLOCK_N
    n_items = (tl.load(kv_ptr + qb + 1) - lo) * subtiles
    per = tl.cdiv(n_items, n_splits)
    first = split * per
    last = tl.minimum(first + per, n_items)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HEAD_DIM)
    h_ok = offs_h < GROUP
    heads = kv_head * GROUP + offs_h
    q = tl.load(Q + batch * stride_qb + i * stride_qc + heads[:, None] * stride_qh + offs_d[None, :],
                mask=h_ok[:, None], other=0.0)
    k_base = KC + batch * stride_kb + kv_head * stride_kh
    v_base = VC + batch * stride_vb + kv_head * stride_vh
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_DIM], dtype=tl.float32)
    offs_t = tl.arange(0, BLOCK_N)
    k_tile = offs_t[None, :] * stride_ks + offs_d[:, None]
    v_tile = offs_t[:, None] * stride_vs + offs_d[None, :]
    for item in range(first, last):
        key0 = tl.load(kv_idx + lo + item // subtiles) * PATTERN_BLOCK + (item % subtiles) * BLOCK_N
        ok = key0 + offs_t <= pos  # pos < length, so this also keeps reads inside the valid cache
        k = tl.load(k_base + key0.to(tl.int64) * stride_ks + k_tile, mask=ok[None, :], other=0.0)
        v = tl.load(v_base + key0.to(tl.int64) * stride_vs + v_tile, mask=ok[:, None], other=0.0)
        qk = tl.where(ok[None, :], tl.dot(q, k) * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    # Partials: [batch * chunk, heads, splits, (dim)], un-normalised acc with its base-2 LSE.
    row = (pid_q.to(tl.int64) * n_kv_heads * GROUP + heads) * n_splits + split
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    tl.store(OP + row[:, None] * HEAD_DIM + offs_d[None, :], acc / l_safe[:, None], mask=h_ok[:, None])
    tl.store(LP + row, tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(l_safe)), mask=h_ok)


@triton.jit
def _combine_kernel(OP, LP, O, n_splits, stride_ob, stride_oc, stride_oh, n_chunk, n_heads,
                    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # (batch * chunk) * heads + head
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    ok = offs_s < n_splits
    lse = tl.load(LP + pid * n_splits + offs_s, mask=ok, other=float("-inf"))
    m = tl.max(lse, 0)
    w = tl.where(ok, tl.math.exp2(lse - m), 0.0)
    parts = tl.load(OP + (pid * n_splits + offs_s)[:, None] * HEAD_DIM + offs_d[None, :], mask=ok[:, None], other=0.0)
    out = tl.sum(parts * w[:, None], 0) / tl.sum(w, 0)
    bc, head = pid // n_heads, pid % n_heads
    batch, i = bc // n_chunk, bc % n_chunk
    tl.store(O + batch * stride_ob + i * stride_oc + head * stride_oh + offs_d, out.to(O.dtype.element_ty))


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.lru_cache(maxsize=64)
def _max_row_blocks(pattern: Pattern, table_len: int) -> int:
    ptr = pattern.tables(table_len).kv_ptr
    return int((ptr[1:] - ptr[:-1]).max())


def launch_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pattern: Pattern,
                  cache_seqlens: torch.Tensor, scale: float) -> torch.Tensor:
    """out [b, c, h, d] for queries at cache_seqlens - c + j (see powerattn.decode_attention)."""
    b, c, h, d = q.shape
    hkv = k_cache.shape[2]
    group = h // hkv
    bs = pattern.block_size
    max_len = k_cache.shape[1]
    tables = device_tables(pattern, max_len, bs, bs, q.device)
    block_n = min(INTERPRETER_TILE if interpreting() else DECODE_TILE, bs & -bs)
    items = _max_row_blocks(pattern, table_length(max_len, bs)) * (bs // block_n)
    sms = INTERPRETER_SMS if interpreting() else _sm_count(q.device.index or 0)
    splits = max(1, min(items, triton.cdiv(WAVES * sms, b * c * hkv), MAX_SPLITS))
    o_part = torch.empty((b * c * h * splits, d), device=q.device, dtype=torch.float32)
    l_part = torch.empty((b * c * h * splits,), device=q.device, dtype=torch.float32)
    _decode_kernel[(b * c, hkv, splits)](
        q, k_cache, v_cache, o_part, l_part, cache_seqlens, tables.kv_ptr, tables.kv_idx,
        c, hkv, splits, scale * LOG2_E,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        GROUP=group, BLOCK_H=max(MIN_DOT, triton.next_power_of_2(group)), HEAD_DIM=d, BLOCK_N=block_n,
        PATTERN_BLOCK=bs,
    )
    out = torch.empty_like(q)
    _combine_kernel[(b * c * h,)](
        o_part, l_part, out, splits, out.stride(0), out.stride(1), out.stride(2), c, h,
        HEAD_DIM=d, BLOCK_S=triton.next_power_of_2(splits),
    )
    return out
