"""DeepSpeed-Ulysses sequence parallelism for LlamaForCausalLM.

Each rank of a sequence-parallel group holds a contiguous 1/sp slice of every row
(`data.shard_sequence_parallel`). Around the attention core, DeepSpeed's `DistributedAttention`
all-to-alls q, k, v from [b, s/sp, heads, d] to [b, s, heads/sp, d], so `sparse_attention` runs
on full sequences (document boundaries from the global cu_seqlens) for a subset of heads, and
all-to-alls the output back. Projections, MLP, norms and the loss stay local to the slice.

Loss: each rank returns the summed token loss of its slice; the trainer divides by the step's
target count, so the per-rank losses add up to the sequence's loss and the gradients DeepSpeed
sums over the group (it averages only over data-parallel replicas) equal the unsharded ones.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as torch_dist
from torch import Tensor

from powerattn.model import IGNORE_INDEX, LlamaForCausalLM
from powerattn.model.llama import Attention, Batch
from powerattn.ops import sparse_attention


def _attention_core(q: Tensor, k: Tensor, v: Tensor, pattern, cu_seqlens: Tensor, max_seqlen: int | None,
                    backend: str) -> Tensor:
    """sparse_attention over full rows [b, s, h_local, d]; cu_seqlens cover the b rows flattened."""
    b, s = q.shape[:2]
    flat = [t.reshape(1, b * s, *t.shape[2:]) for t in (q, k, v)]
    y = sparse_attention(*flat, pattern, cu_seqlens, backend=backend, max_seqlen=max_seqlen)
    return y.reshape(b, s, *y.shape[2:])


class UlyssesAttention(Attention):
    """Attention whose core runs inside DeepSpeed's DistributedAttention (see enable_ulysses).

    Training only (no KV cache); parameters and names are Attention's.
    """

    def forward(self, x: Tensor, batch: Batch) -> Tensor:
        if batch.kv_cache is not None:
            raise RuntimeError("sequence-parallel attention is for training; decode under ulysses_disabled()")
        b, s, _ = x.shape
        q, k, v = self.qkv(x, batch)
        # batch_dim_idx=0: [b, s, h, d] layout; scatter heads (2), gather the sequence (1). Keywords reach
        # the core unchanged in every DeepSpeed version (positional extras shifted when rotary_pos_emb came).
        y = self.ulysses(q, k, v, 0, pattern=self.pattern, cu_seqlens=batch.cu_seqlens,
                         max_seqlen=batch.max_seqlen, backend=self.backend)
        return self.o_proj(y.reshape(b, s, -1))


def check_heads(num_heads: int, num_kv_heads: int, sp_size: int) -> None:
    """Ulysses splits heads evenly: both head counts must be multiples of the group size."""
    if num_heads % sp_size or num_kv_heads % sp_size:
        raise ValueError(
            f"parallel.sequence_parallel_size={sp_size} must divide the attention heads ({num_heads}) and "
            f"key/value heads ({num_kv_heads}) of the model"
        )


def enable_ulysses(model: LlamaForCausalLM, group) -> None:
    """Route every layer's attention core through DistributedAttention over `group`."""
    from deepspeed.sequence.layer import DistributedAttention

    check_heads(model.config.num_attention_heads, model.config.num_key_value_heads,
                torch_dist.get_world_size(group))
    for layer in model.model.layers:
        attn = layer.self_attn
        attn.__class__ = UlyssesAttention
        attn.ulysses = DistributedAttention(_attention_core, group, scatter_idx=2, gather_idx=1)


@contextlib.contextmanager
def ulysses_disabled(model: LlamaForCausalLM) -> Iterator[None]:
    """Plain attention inside the block (each rank then runs whole sequences, e.g. for evaluation)."""
    swapped = [layer.self_attn for layer in model.model.layers
               if isinstance(layer.self_attn, UlyssesAttention)]
    for attn in swapped:
        attn.__class__ = Attention
    try:
        yield
    finally:
        for attn in swapped:
            attn.__class__ = UlyssesAttention


def sequence_parallel_loss(model: LlamaForCausalLM, shard: dict, max_position: int) -> Tensor:
    """Summed next-token loss of this rank's slice of the micro-batch.

    shard: `data.shard_sequence_parallel` output (input_ids, shift_labels, position_ids [b, s/sp] on the
    model's device; global cu_seqlens and max_seqlen). max_position: 1 + the largest position id of the
    unsharded micro-batch (every rank must build the same RoPE table, dynamic NTK included).
    LlamaModel.forward takes whole sequences (its document logic needs all of them); this builds the
    slice's Batch from the global documents and runs the same layers.
    """
    inner = model.model
    ids, targets = shard["input_ids"], shard["shift_labels"]
    b, s = ids.shape
    cu = shard["cu_seqlens"]
    cos, sin = inner.rotary(shard["position_ids"], s, ids.device, max_position, seq_len=max_position)
    batch = Batch(cos, sin, cu.to(device=ids.device, dtype=torch.int32), cu.tolist(), shard["max_seqlen"])
    h = inner.run_layers(inner.embed_tokens(ids), batch)
    mean = model.lm_head(h, targets, model.config.loss_chunk_size)
    return mean * (targets != IGNORE_INDEX).sum()
