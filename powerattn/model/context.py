"""What a decoder forward needs besides the tokens: where packed documents start and how positions run
(`Documents`), and, prepared from them once per forward, what every attention layer reads
(`AttentionContext`: RoPE tables, document boundaries, KV-cache state).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from powerattn.model.kv_cache import KVCache
from powerattn.model.rope import RotaryEmbedding
from powerattn.reference import document_positions
from powerattn.targets import restarts


@dataclass
class Documents:
    """Packed documents and positions of a forward's rows.

    cu_seqlens are the boundaries of the rows as the attention core sees them, flattened into one
    sequence (under Ulysses: the full rows, while this rank's position_ids cover only its slice).
    """

    position_ids: Tensor | None = None  # [b, s]; None: 0 .. s-1 in every row
    cu_seqlens: Tensor | None = None    # int32 [num_docs + 1] on the model's device; None: one document a row
    cu_list: list[int] | None = None    # the same on the host, when known without a sync
    max_seqlen: int | None = None       # the longest document
    max_position: int | None = None     # 1 + the largest position id (None: the row length)


def find_documents(input_ids: Tensor, position_ids: Tensor | None = None, cu_seqlens: Tensor | None = None,
                   max_seqlen: int | None = None) -> Documents:
    """Documents of whole rows from what a caller passed (see LlamaForCausalLM.forward).

    cu_seqlens (batch 1) gives documents and, by default, positions restarting in each. Without it,
    position_ids that restart (do not continue by +1) mark documents: that costs one host sync.
    """
    if input_ids.dim() != 2 or input_ids.is_floating_point():
        raise ValueError(f"input_ids must be integer [batch, seqlen], got {input_ids.dtype} {tuple(input_ids.shape)}")
    b, s = input_ids.shape
    device = input_ids.device
    if cu_seqlens is not None:
        if b != 1:
            raise ValueError(f"cu_seqlens marks packed documents and needs batch 1, got batch {b}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.is_floating_point():
            raise ValueError(f"cu_seqlens must be an integer tensor [num_docs + 1], got "
                             f"{cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
        cu_list = None
        if cu_seqlens.device.type == "cpu":
            cu_list = cu_seqlens.tolist()
            if cu_list[0] != 0 or cu_list[-1] != s or any(x > y for x, y in zip(cu_list, cu_list[1:])):
                raise ValueError(f"cu_seqlens must ascend from 0 to seqlen={s}, got {cu_list}")
            max_seqlen = max_seqlen or max(y - x for x, y in zip(cu_list, cu_list[1:]))
        cu_seqlens = cu_seqlens.to(device=device, dtype=torch.int32, non_blocking=True)
        if position_ids is None:
            positions = document_positions(cu_seqlens, s)[1][None]
            return Documents(positions, cu_seqlens, cu_list, max_seqlen, max_seqlen or s)
        position_ids = position_ids.to(device).expand(b, s)
        return Documents(position_ids, cu_seqlens, cu_list, max_seqlen, int(position_ids.max()) + 1)
    if position_ids is None:
        return Documents(max_seqlen=max_seqlen)
    position_ids = position_ids.to(device).expand(b, s)
    docs = Documents(position_ids, max_seqlen=max_seqlen, max_position=int(position_ids.max()) + 1)
    restart = restarts(position_ids)
    if bool(restart.any()):
        if b != 1:
            raise ValueError("position_ids restart inside a row (packed documents): use batch 1")
        docs.cu_list = [0, *(torch.nonzero(restart[0]).flatten() + 1).tolist(), s]
        docs.cu_seqlens = torch.tensor(docs.cu_list, dtype=torch.int32, device=device)
        docs.max_seqlen = max(y - x for x, y in zip(docs.cu_list, docs.cu_list[1:]))
    return docs


@dataclass
class AttentionContext:
    """What every layer reads besides the hidden states, prepared once per forward."""

    cos: Tensor  # float32 [b or 1, s, head_dim // 2]
    sin: Tensor
    cu_seqlens: Tensor | None = None
    cu_list: list[int] | None = None
    max_seqlen: int | None = None
    kv_cache: KVCache | None = None
    cache_seqlens: Tensor | None = None  # int32 [b]: cache lengths after this step (decoding only)
    new_tokens: list[int] = field(default_factory=list)  # tokens each cache row gains in this forward

    @property
    def decoding(self) -> bool:
        """New tokens read a filled KV cache (rather than attending among themselves)."""
        return self.kv_cache is not None and self.cache_seqlens is not None


def attention_context(rotary: RotaryEmbedding, input_ids: Tensor, docs: Documents,
                      kv_cache: KVCache | None = None) -> AttentionContext:
    """RoPE tables at the documents' positions, and the KV cache's state when generating."""
    b, s = input_ids.shape
    device = input_ids.device
    positions, max_position = docs.position_ids, docs.max_position or s
    rope_len = max_position  # the length dynamic NTK scales for
    ctx = AttentionContext(None, None, docs.cu_seqlens, docs.cu_list, docs.max_seqlen, kv_cache)
    if kv_cache is not None:
        if docs.cu_seqlens is not None:  # ragged prompts packed into one row, one cache row per document
            if docs.cu_list is None or not kv_cache.empty or len(docs.cu_list) - 1 != len(kv_cache.lengths):
                raise ValueError("packed prefill needs cu_seqlens on the CPU and an empty KV cache "
                                 "with one row per document")
            ctx.new_tokens = [y - x for x, y in zip(docs.cu_list, docs.cu_list[1:])]
        else:
            if b != len(kv_cache.lengths):
                raise ValueError(f"input batch {b} does not match KV cache batch {len(kv_cache.lengths)}")
            positions = kv_cache.positions(s, device)
            ctx.new_tokens = [s] * b
            if not kv_cache.empty:
                ctx.cache_seqlens = kv_cache.seqlens_after(s, device)
        kv_cache.check_room(ctx.new_tokens)
        # The whole generation shares one dynamic-NTK base, so cached keys stay consistent.
        max_position = rope_len = kv_cache.max_len
    ctx.cos, ctx.sin = rotary(positions, s, device, max_position, seq_len=rope_len)
    return ctx
