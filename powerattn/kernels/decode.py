"""Decode / chunked prefill: queries at the end of a KV cache, split-K over the key blocks they read.

Each query token reads the key blocks of its pattern row (a few dozen at 128K, not the whole
cache). One program takes one query position, one KV head (all query heads of its GQA group as
the rows of the tile) and one slice of that row's key sub-tiles, and writes its partial softmax.
The last of a row's slices to finish (an atomic counter per query and KV head) merges the partials
by their log-sum-exp and writes the output: one launch per call, where a separate merge kernel made
two (at batch 1 a decode step is mostly launch overhead: docs/kernels.md).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from powerattn.kernels.common import INTERPRETER_TILE, LOG2_E, MIN_DOT, interpreting
from powerattn.kernels.tables import device_tables, table_length
from powerattn.patterns import Pattern

DECODE_TILE = 64  # key rows per step of the decode loop (a pattern block is several of them)
MAX_SPLITS = 128  # slices of one row at most
WAVES = 1  # programs per SM the split count aims for (1 beat 2 and 4: docs/kernels.md step 10)
INTERPRETER_SMS = 4  # stands in for the SM count, so the interpreter exercises several splits


@triton.jit
def _decode_kernel(
    Q, KC, VC, O, OP, LP, Cnt, seqlens, kv_ptr, kv_idx, n_chunk, n_kv_heads, max_len, n_splits, qk_scale,
    GROUP: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    PATTERN_BLOCK: tl.constexpr, SPLIT: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # Contiguous q / out [b, chunk, heads, d] and caches [b, max_len, kv_heads, d]: the strides follow from
    # the shapes (each argument costs host time at every launch; a decode step is mostly that).
    stride_qh = HEAD_DIM
    stride_qc = n_kv_heads * GROUP * HEAD_DIM
    stride_qb = n_chunk * stride_qc
    stride_ks = n_kv_heads * HEAD_DIM
    stride_kb = max_len.to(tl.int64) * stride_ks
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
    q_row = batch * stride_qb + i * stride_qc  # of q and out
    q = tl.load(Q + q_row + heads[:, None] * stride_qh + offs_d[None, :], mask=h_ok[:, None], other=0.0)
    k_base = KC + batch * stride_kb + kv_head * HEAD_DIM
    v_base = VC + batch * stride_kb + kv_head * HEAD_DIM
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_DIM], dtype=tl.float32)
    offs_t = tl.arange(0, BLOCK_N)
    k_tile = offs_t[None, :] * stride_ks + offs_d[:, None]
    v_tile = offs_t[:, None] * stride_ks + offs_d[None, :]
    for item in range(first, last):
        key0 = tl.load(kv_idx + lo + item // subtiles) * PATTERN_BLOCK + (item % subtiles) * BLOCK_N
        ok = key0 + offs_t <= pos  # pos < length, so this also keeps reads inside the valid cache
        k = tl.load(k_base + key0.to(tl.int64) * stride_ks + k_tile, mask=ok[None, :], other=0.0)
        v = tl.load(v_base + key0.to(tl.int64) * stride_ks + v_tile, mask=ok[:, None], other=0.0)
        qk = tl.where(ok[None, :], tl.dot(q, k) * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    if not SPLIT:
        out = acc / l_safe[:, None]
        o_ptrs = O + q_row + heads[:, None] * stride_qh + offs_d[None, :]
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=h_ok[:, None])
    else:
        # Partials: [batch * chunk, heads, splits, (dim)], normalised acc with its base-2 LSE.
        row = (pid_q.to(tl.int64) * n_kv_heads * GROUP + heads) * n_splits + split
        tl.store(OP + row[:, None] * HEAD_DIM + offs_d[None, :], acc / l_safe[:, None], mask=h_ok[:, None])
        tl.store(LP + row, tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(l_safe)), mask=h_ok)
        # The barrier and acq_rel: every thread's partials are visible before this slice's count, and the
        # last slice (reading through L2, .cg) sees all of them.
        tl.debug_barrier()
        counter = Cnt + pid_q.to(tl.int64) * n_kv_heads + kv_head
        if tl.atomic_add(counter, 1, sem="acq_rel") == n_splits - 1:
            # One head at a time, all of its slices in one load each (a loop over slices would serialise
            # n_splits round trips to L2: it made the step 9 us slower on an H200, docs/kernels.md step 9).
            offs_s = tl.arange(0, BLOCK_S)
            s_ok = offs_s < n_splits
            for g in tl.static_range(GROUP):
                first_row = (pid_q.to(tl.int64) * n_kv_heads + kv_head) * GROUP * n_splits + g * n_splits
                lse = tl.load(LP + first_row + offs_s, mask=s_ok, other=float("-inf"), cache_modifier=".cg")
                m = tl.max(lse, 0)
                w = tl.where(s_ok, tl.math.exp2(lse - tl.where(m == float("-inf"), 0.0, m)), 0.0)
                parts = tl.load(OP + (first_row + offs_s)[:, None] * HEAD_DIM + offs_d[None, :], mask=s_ok[:, None],
                                other=0.0, cache_modifier=".cg")
                w_sum = tl.sum(w, 0)
                out = tl.sum(parts * w[:, None], 0) / tl.where(w_sum == 0.0, 1.0, w_sum)
                tl.store(O + q_row + (kv_head * GROUP + g) * stride_qh + offs_d, out.to(O.dtype.element_ty))
            tl.atomic_xchg(counter, 0)  # ready for the next call (and for every replay of a CUDA graph)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


class _Plan(NamedTuple):
    grid: tuple[int, int, int]
    splits: int
    kv_ptr: torch.Tensor
    kv_idx: torch.Tensor
    constants: dict
    compiled: dict  # (q, k and v cache dtypes) -> the kernel Triton compiled for this shape (see _launch)


@functools.lru_cache(maxsize=256)
def _plan(pattern: Pattern, b: int, c: int, h: int, hkv: int, d: int, max_len: int, device: torch.device) -> _Plan:
    """Everything about a call that its shapes fix, worked out once per shape (a decode step repeats it)."""
    bs = pattern.block_size
    tables = device_tables(pattern, max_len, bs, bs, device)
    block_n = min(INTERPRETER_TILE if interpreting() else DECODE_TILE, bs & -bs)
    ptr = pattern.tables(table_length(max_len, bs)).kv_ptr
    items = int((ptr[1:] - ptr[:-1]).max()) * (bs // block_n)
    sms = INTERPRETER_SMS if interpreting() else _sm_count(device.index or 0)
    splits = max(1, min(items, triton.cdiv(WAVES * sms, b * c * hkv), MAX_SPLITS))
    constants = dict(GROUP=h // hkv, BLOCK_H=max(MIN_DOT, triton.next_power_of_2(h // hkv)), HEAD_DIM=d,
                     BLOCK_N=block_n, PATTERN_BLOCK=bs, SPLIT=splits > 1, BLOCK_S=triton.next_power_of_2(splits))
    return _Plan((b * c, hkv, splits), splits, tables.kv_ptr, tables.kv_idx, constants, {})


_WORKSPACES: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _workspace(device: torch.device, rows: int, d: int, n_counters: int):
    """(partial outputs [rows, d], partial LSEs [rows], zeroed counters [n_counters]) for one call.

    Kept per device, stream and size: calls on one stream run in order, so they can share it, and the
    counters are back at zero when a call ends (its last slices reset them). Reusing it saves the
    allocations a decode step would otherwise pay on every call; a split workspace is small (rows =
    query heads x splits, about 2 x SMs x the GQA group at most).
    """
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream, rows, d, n_counters)
    if key not in _WORKSPACES:
        parts = torch.empty(rows * (d + 1), device=device, dtype=torch.float32)
        _WORKSPACES[key] = (parts[: rows * d].view(rows, d), parts[rows * d:],
                            torch.zeros(n_counters, device=device, dtype=torch.int32))
    return _WORKSPACES[key]


def launch_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pattern: Pattern,
                  cache_seqlens: torch.Tensor, scale: float) -> torch.Tensor:
    """out [b, c, h, d] for queries at cache_seqlens - c + j (see powerattn.decode_attention); q and the
    caches contiguous."""
    b, c, h, d = q.shape
    hkv, max_len = k_cache.shape[2], k_cache.shape[1]
    plan = _plan(pattern, b, c, h, hkv, d, max_len, q.device)
    # One slice per row (long chunks fill the GPU without splitting) writes the output directly.
    o_part, l_part, counters = (_workspace(q.device, b * c * h * plan.splits, d, b * c * hkv) if plan.splits > 1
                                else (q, q, q))
    out = torch.empty_like(q)
    _launch(plan, q, k_cache, v_cache, out, o_part, l_part, counters, cache_seqlens, plan.kv_ptr, plan.kv_idx,
            c, hkv, max_len, plan.splits, scale * LOG2_E)
    return out


def _launch(plan: _Plan, *args) -> None:
    """_decode_kernel[plan.grid](*args, **plan.constants), at a fraction of the host time after the first call.

    Triton's launcher binds and specialises every argument in Python before each launch: most of a
    batch-1 decode step on a slow host (docs/kernels.md step 10). Within one plan every specialised
    value is fixed (the integers and dtypes by the plan's key and the dtypes below, the workspace
    by its cache) except the caller's tensors' 16-byte alignment, checked here; so after the first
    launch the compiled kernel is called directly, with the same arguments and hooks Triton's own
    path passes to it.
    """
    q, k_cache, v_cache, _, _, _, _, cache_seqlens = args[:8]  # out and the workspace: aligned by allocation
    key = (q.dtype, k_cache.dtype, v_cache.dtype)
    compiled = plan.compiled.get(key)
    aligned = not any(t.data_ptr() % 16 for t in (q, k_cache, v_cache, cache_seqlens))
    if compiled is None or not aligned:
        compiled = _decode_kernel[plan.grid](*args, **plan.constants)
        if aligned and not interpreting() and all(hasattr(compiled, a) for a in ("run", "function", "packed_metadata")):
            plan.compiled[key] = compiled
        return
    args = (*args, *plan.constants.values())
    stream = triton.runtime.driver.active.get_current_stream(q.device.index)
    hooks = triton.knobs.runtime
    compiled.run(*plan.grid, stream, compiled.function, compiled.packed_metadata,
                 compiled.launch_metadata(plan.grid, stream, *args), hooks.launch_enter_hook, hooks.launch_exit_hook,
                 *args)
