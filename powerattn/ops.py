"""`sparse_attention`: input checks and dispatch to the Triton, FlexAttention or portable backend, and
dense causal attention (the `full` pattern) through SDPA."""

from __future__ import annotations

import functools
import inspect
import math

import torch
from torch import Tensor

from powerattn.choices import BACKENDS
from powerattn.patterns import Pattern
from powerattn.reference import block_gather_attention, decode_reference, document_positions, padded_rows


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, pattern: Pattern, cu_seqlens: Tensor | None) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"sparse_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"sparse_attention: {name} must be [batch, seqlen, heads, head_dim], got shape {tuple(t.shape)}"
            )
    if not isinstance(pattern, Pattern):
        raise TypeError(f"sparse_attention: pattern must be a powerattn Pattern, got {type(pattern).__name__}")
    if k.shape != v.shape:
        raise ValueError(f"sparse_attention: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    (b, s, h, d), (bk, sk, hk, dk) = q.shape, k.shape
    if (b, s, d) != (bk, sk, dk):
        raise ValueError(
            f"sparse_attention: q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch, seqlen and head_dim"
        )
    if hk == 0 or h % hk:
        raise ValueError(f"sparse_attention: q heads ({h}) must be a multiple of k/v heads ({hk}) for GQA")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"sparse_attention: dtypes differ: q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if not q.is_floating_point():
        raise ValueError(f"sparse_attention: q, k, v must be floating point, got {q.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"sparse_attention: devices differ: q {q.device}, k {k.device}, v {v.device}")
    if s == 0:
        raise ValueError("sparse_attention: seqlen must be > 0")
    if cu_seqlens is None:
        return
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype != torch.int32 or cu_seqlens.numel() < 2:
        raise ValueError(
            "sparse_attention: cu_seqlens must be a 1-D int32 tensor [num_docs + 1], got "
            f"{cu_seqlens.dtype} of shape {tuple(cu_seqlens.shape)}"
        )
    if b != 1:
        raise ValueError(f"sparse_attention: cu_seqlens needs batch == 1 (packed documents), got batch {b}")
    if cu_seqlens.device.type == "cpu":  # values are checked only where that costs no device sync
        cu = cu_seqlens.tolist()
        if cu[0] != 0 or cu[-1] != s or any(x > y for x, y in zip(cu[:-1], cu[1:])):
            raise ValueError(
                f"sparse_attention: cu_seqlens must ascend from 0 to seqlen={s}, got {cu[:4]}...{cu[-2:]}"
            )


def sparse_attention(
    q: Tensor, k: Tensor, v: Tensor, pattern: Pattern, cu_seqlens: Tensor | None = None,
    scale: float | None = None, backend: str = "auto", max_seqlen: int | None = None,
) -> Tensor:
    """Block-sparse causal attention of q [b, s, h, d] over k, v [b, s, kv_heads, d] under `pattern`.

    cu_seqlens (int32 [num_docs + 1], batch 1) restarts the pattern at each document; max_seqlen,
    the longest document, spares the Triton backend a device sync when given. backend "sdpa" runs
    only the `full` pattern; "auto" picks it for `full` on CUDA when there are no packed documents.
    """
    _check_inputs(q, k, v, pattern, cu_seqlens)
    backend, scale = _resolve("sparse_attention", backend, scale, q, pattern, sdpa_ok=cu_seqlens is None)
    if backend == "sdpa":
        return dense_attention(q, k, v, cu_seqlens, scale)
    if backend == "triton":
        from powerattn.kernels import triton_attention  # not at the top: the kernels import triton, CPU runs need not

        return triton_attention(q, k, v, pattern, cu_seqlens, scale, max_seqlen)
    if backend == "flex":
        return flex_sparse_attention(q, k, v, pattern, cu_seqlens, scale)
    if cu_seqlens is not None and cu_seqlens.device.type != "cpu":
        cu_seqlens = cu_seqlens.cpu()
    return block_gather_attention(q, k, v, pattern, cu_seqlens, scale)


def decode_attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, pattern: Pattern, cache_seqlens: Tensor,
    scale: float | None = None, backend: str = "auto",
) -> Tensor:
    """Queries q [b, c, h, d] at positions cache_seqlens - c .. cache_seqlens - 1 against a KV cache.

    k_cache, v_cache [b, max_len, kv_heads, d] are valid up to cache_seqlens (int32 [b], the chunk's
    own keys included); each query reads exactly the key blocks its row of the pattern names.
    """
    if q.dim() != 4 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"decode_attention: want q [b, c, h, d] and k_cache == v_cache shape [b, len, kv_heads, d]; got "
            f"q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}"
        )
    if q.shape[0] != k_cache.shape[0] or q.shape[3] != k_cache.shape[3] or q.shape[2] % k_cache.shape[2]:
        raise ValueError(
            f"decode_attention: q {tuple(q.shape)} does not match k_cache {tuple(k_cache.shape)} "
            "(batch, head_dim, heads % kv_heads)"
        )
    if cache_seqlens.shape != (q.shape[0],):
        raise ValueError(
            f"decode_attention: cache_seqlens must have shape ({q.shape[0]},), got {tuple(cache_seqlens.shape)}"
        )
    # Dense layers decode with the kernels that know the cache's lengths, whatever ran their prefill.
    backend, scale = _resolve("decode_attention", "auto" if backend == "sdpa" else backend, scale, q, pattern)
    if backend == "triton":
        from powerattn.kernels import triton_decode

        return triton_decode(q, k_cache, v_cache, pattern, cache_seqlens, scale)
    return decode_reference(q, k_cache, v_cache, pattern, cache_seqlens, scale)


def _resolve(caller: str, backend: str, scale: float | None, q: Tensor, pattern: Pattern,
             sdpa_ok: bool = False) -> tuple[str, float]:
    """Validated backend and scale. "auto": on CUDA sdpa for `full` where sdpa_ok, else triton where
    supported, else flex; torch on CPU."""
    if backend not in BACKENDS:
        raise ValueError(f"{caller}: unknown backend {backend!r}; choose one of {BACKENDS}")
    if backend == "sdpa" and pattern.name != "full":
        raise ValueError(f"{caller}: backend 'sdpa' runs dense causal attention, not pattern {pattern.key}; "
                         "use it for the `full` pattern only")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if backend != "auto":
        return backend, scale
    if not q.is_cuda:
        return "torch", scale
    # cuDNN's dense causal attention beat our kernel on the full pattern (H100, 16K, head_dim 128:
    # 3.77 / 10.39 ms fwd / bwd against 4.50 / 14.47, docs/performance.md); bench/vs_hf.py times both.
    if sdpa_ok and pattern.name == "full":
        return "sdpa", scale
    from powerattn.kernels import triton_supports

    return ("triton" if triton_supports(q, pattern) else "flex"), scale


def dense_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor | None, scale: float) -> Tensor:
    """Causal attention of q [b, s, h, d] over every earlier key of k, v [b, s, kv_heads, d] through SDPA
    (cuDNN or flash on GPUs), one call per packed document (their bounds cost a device sync)."""
    if cu_seqlens is None:
        return _sdpa(q, k, v, scale)
    cu = cu_seqlens.tolist()
    return torch.cat([_sdpa(q[:, a:b], k[:, a:b], v[:, a:b], scale) for a, b in zip(cu, cu[1:]) if b > a], dim=1)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=scale,
        enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


# FlexAttention: the BlockMask comes from the pattern's own tables and its mask_mod from token_rule.


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex_fn(device: torch.device):
    from torch.nn.attention.flex_attention import flex_attention

    # Eager FlexAttention materialises scores; on CPU that is what runs (forward only in torch).
    return _compiled_flex() if device.type == "cuda" else flex_attention


FLEX_TILE = 128


@functools.lru_cache(maxsize=32)
def flex_block_mask(pattern: Pattern, seq_len: int, device: str):
    """FlexAttention BlockMask for one sequence, built from `pattern.tables` (no dense mask)."""
    from torch.nn.attention.flex_attention import BlockMask

    tile = math.gcd(FLEX_TILE, pattern.block_size)
    if tile % 16:
        raise ValueError(
            f"flex backend needs block_size divisible by 16, got block_size={pattern.block_size}"
        )
    t = pattern.tables(seq_len, tile, tile)
    n = t.kv_ptr.numel() - 1
    ptr, idx, full = t.kv_ptr.long(), t.kv_idx.long(), t.kv_full.long()
    lens = ptr[1:] - ptr[:-1]
    # FlexAttention wants one index slot per key tile, and the partial entries in a list of their own.
    full_idx, _ = padded_rows(idx, ptr[:-1], full, n)
    part_idx, _ = padded_rows(idx, ptr[:-1] + full, lens - full, n)

    def mask_mod(b, h, q_idx, kv_idx):
        return pattern.token_rule(q_idx, kv_idx)

    def batched(x: Tensor) -> Tensor:  # counts [1, 1, n], indices [1, 1, n, n]
        return x.view(1, 1, *x.shape).to(device=device, dtype=torch.int32).contiguous()

    kwargs = dict(
        kv_num_blocks=batched(lens - full), kv_indices=batched(part_idx),
        full_kv_num_blocks=batched(full), full_kv_indices=batched(full_idx),
        BLOCK_SIZE=(tile, tile), mask_mod=mask_mod,
    )
    if "seq_lengths" in inspect.signature(BlockMask.from_kv_blocks).parameters:
        kwargs["seq_lengths"] = (seq_len, seq_len)
    return BlockMask.from_kv_blocks(**kwargs)


def _varlen_block_mask(pattern: Pattern, cu_seqlens: Tensor, seq_len: int):
    from torch.nn.attention.flex_attention import create_block_mask

    doc, pos = document_positions(cu_seqlens, seq_len)

    def mask_mod(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & pattern.token_rule(pos[q_idx], pos[kv_idx])

    tile = math.gcd(FLEX_TILE, pattern.block_size)
    return create_block_mask(
        mask_mod, None, None, seq_len, seq_len, device=cu_seqlens.device, BLOCK_SIZE=tile,
        _compile=cu_seqlens.is_cuda,
    )


def flex_sparse_attention(
    q: Tensor, k: Tensor, v: Tensor, pattern: Pattern, cu_seqlens: Tensor | None, scale: float
) -> Tensor:
    """FlexAttention with the pattern's BlockMask (GQA through enable_gqa)."""
    s = q.shape[1]
    # Padded to whole tiles: padded keys come after every real query (the causal rule drops them),
    # padded queries are cut off below. FlexAttention's GPU backward mishandled a partial last tile
    # (zero dK/dV there, torch 2.11), so it never sees one.
    tile = math.gcd(FLEX_TILE, pattern.block_size)
    pad = -s % tile
    if pad:
        q, k, v = (torch.nn.functional.pad(t, (0, 0, 0, 0, 0, pad)) for t in (q, k, v))
    if cu_seqlens is None:
        block_mask = flex_block_mask(pattern, s + pad, str(q.device))
    else:
        block_mask = _varlen_block_mask(pattern, cu_seqlens.to(q.device), s + pad)
    out = _flex_fn(q.device)(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask, scale=scale,
        enable_gqa=q.shape[2] != k.shape[2],
    )
    return out.transpose(1, 2)[:, :s]
