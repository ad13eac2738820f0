"""Reference attention: the exact dense masked oracle, and the portable block-gather backend.

`dense_reference` materialises the [seq, seq] mask and is the test oracle. `block_gather_attention`
reads only the key blocks the pattern's index tables name (O(seq_len x attended keys) memory); it
is the CPU path of the tiny default run and is differentiable through plain autograd.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from powerattn.patterns import Pattern


def document_positions(cu_seqlens: Tensor, total: int) -> tuple[Tensor, Tensor]:
    """Per-token (document id, position inside its document) for packed sequences."""
    cu = cu_seqlens.to(torch.int64)
    tok = torch.arange(total, device=cu.device)
    doc = torch.searchsorted(cu[1:], tok, right=True)
    return doc, tok - cu[doc]


def dense_mask(pattern: Pattern, seq_len: int, cu_seqlens: Tensor | None = None) -> Tensor:
    """bool [seq_len, seq_len] token mask, restarted at every document when cu_seqlens is given."""
    if cu_seqlens is None:
        return pattern.token_mask(seq_len)
    doc, pos = document_positions(cu_seqlens.cpu(), seq_len)
    same_doc = doc[:, None] == doc[None, :]
    return same_doc & pattern.token_rule(pos[:, None], pos[None, :])


def dense_reference(
    q: Tensor, k: Tensor, v: Tensor, pattern: Pattern, cu_seqlens: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Exact masked softmax attention in q's dtype (upcast inputs to float64 for an oracle).

    q [batch, seq, heads, dim]; k, v [batch, seq, kv_heads, dim]; returns [batch, seq, heads, dim].
    """
    b, s, h, d = q.shape
    group = h // k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    k = k.repeat_interleave(group, dim=2)
    v = v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    mask = dense_mask(pattern, s, cu_seqlens).to(q.device)
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(scores, dim=-1), v)


def padded_rows(idx: Tensor, starts: Tensor, counts: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """CSR rows idx[starts[r]:starts[r] + counts[r]] as a dense [rows, width] index padded with 0 (+ validity)."""
    slot = torch.arange(width, device=idx.device)
    valid = slot[None, :] < counts[:, None]
    gather = (starts[:, None] + slot[None, :]).clamp(max=max(idx.numel() - 1, 0))
    return torch.where(valid, idx[gather], 0), valid


def _block_gather_one(q: Tensor, k: Tensor, v: Tensor, pattern: Pattern, scale: float) -> Tensor:
    b, s, h, d = q.shape
    hkv = k.shape[2]
    g = h // hkv
    bs = pattern.block_size
    nb = pattern.num_blocks(s)
    pad = nb * bs - s
    if pad:
        # Padded keys sit after every real query, so the causal mask removes them.
        q, k, v = (torch.nn.functional.pad(t, (0, 0, 0, 0, 0, pad)) for t in (q, k, v))
    t = pattern.tables(s)
    ptr = t.kv_ptr.long()
    lens = ptr[1:] - ptr[:-1]
    rows, valid = padded_rows(t.kv_idx.long(), ptr[:-1], lens, int(lens.max()))
    rows, valid = rows.to(q.device), valid.to(q.device)
    width = rows.shape[1]
    qb = q.view(b, nb, bs, hkv, g, d)
    kb = k.view(b, nb, bs, hkv, d)
    vb = v.view(b, nb, bs, hkv, d)
    offs = torch.arange(bs, device=q.device)
    # Bound the score buffer of one chunk of query blocks to ~64M elements.
    chunk = max(1, (1 << 26) // max(1, b * h * bs * width * bs))
    outs = []
    for a in range(0, nb, chunk):
        r, ok = rows[a:a + chunk], valid[a:a + chunk]
        n = r.shape[0]
        kg, vg = kb[:, r], vb[:, r]  # [b, n, width, bs, hkv, d]
        scores = torch.einsum("bnqhgd,bnwkhd->bnhgqwk", qb[:, a:a + n], kg) * scale
        q_pos = (torch.arange(a, a + n, device=q.device)[:, None] * bs + offs)[:, :, None, None]
        k_pos = (r[:, :, None] * bs + offs)[:, None, :, :]
        mask = (k_pos <= q_pos) & ok[:, None, :, None]  # [n, bs(q), width, bs(k)]
        scores = scores.masked_fill(~mask[None, :, None, None], float("-inf"))
        p = torch.softmax(scores.flatten(-2), dim=-1).view_as(scores)
        outs.append(torch.einsum("bnhgqwk,bnwkhd->bnqhgd", p, vg))
    out = torch.cat(outs, dim=1).reshape(b, nb * bs, h, d)
    return out[:, :s]


def block_gather_attention(
    q: Tensor, k: Tensor, v: Tensor, pattern: Pattern, cu_seqlens: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Portable block-sparse attention: per query block, gather its key blocks, masked softmax."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if cu_seqlens is None:
        return _block_gather_one(q, k, v, pattern, scale)
    bounds = cu_seqlens.tolist()
    outs = [
        _block_gather_one(q[:, s:e], k[:, s:e], v[:, s:e], pattern, scale)
        for s, e in zip(bounds[:-1], bounds[1:]) if e > s
    ]
    return torch.cat(outs, dim=1)


def decode_reference(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, pattern: Pattern, cache_seqlens: Tensor,
    scale: float | None = None,
) -> Tensor:
    """Attention of a query chunk against a KV cache, reading only the key blocks the pattern names.

    q [b, c, h, d] holds the queries at positions cache_seqlens[i] - c + j; k_cache, v_cache
    [b, max_len, kv_heads, d] hold valid keys/values up to cache_seqlens[i] (the chunk included).
    """
    b, c, h, d = q.shape
    group = h // k_cache.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    bs = pattern.block_size
    outs = []
    for i, length in enumerate(cache_seqlens.tolist()):
        q_pos = torch.arange(length - c, length)
        t = pattern.tables(length)
        ptr, idx = t.kv_ptr.long(), t.kv_idx.long()
        rows = []
        for qb in torch.unique(q_pos // bs).tolist():
            blocks = idx[ptr[qb]:ptr[qb + 1]]
            k_pos = (blocks[:, None] * bs + torch.arange(bs)).flatten()
            k_pos = k_pos[k_pos < length]
            sel = q_pos // bs == qb
            kk = k_cache[i, k_pos.to(q.device)].repeat_interleave(group, dim=1)
            vv = v_cache[i, k_pos.to(q.device)].repeat_interleave(group, dim=1)
            s = torch.einsum("qhd,khd->hqk", q[i, sel.to(q.device)], kk) * scale
            mask = pattern.token_rule(q_pos[sel][:, None], k_pos[None, :]).to(q.device)
            p = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1)
            rows.append(torch.einsum("hqk,khd->qhd", p, vv))
        outs.append(torch.cat(rows, dim=0))
    return torch.stack(outs)
