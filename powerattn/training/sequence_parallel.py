"""DeepSpeed-Ulysses sequence parallelism for LlamaForCausalLM, as a wrapper of the attention core.

Each rank of a sequence-parallel group holds a contiguous 1/sp slice of every row (`shard` in
training/batch.py). `UlyssesCore` replaces each layer's attention core: DeepSpeed's `DistributedAttention`
all-to-alls q, k, v from [b, s/sp, heads, d] to [b, s, heads/sp, d], `sparse_attention` runs on full
sequences (document boundaries from the global cu_seqlens) for a subset of heads, and the output is
all-to-alled back. The model's own forward runs unchanged: projections, MLP, norms and the loss stay
local to the slice.

Loss: each rank returns the summed token loss of its slice; the trainer divides by the step's
target count, so the per-rank losses add up to the sequence's loss and the gradients DeepSpeed
sums over the group (it averages only over data-parallel replicas) equal the unsharded ones.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch.distributed as torch_dist
from torch import Tensor

from powerattn.model import LlamaForCausalLM
from powerattn.ops import sparse_attention


def _full_rows(q: Tensor, k: Tensor, v: Tensor, pattern, cu_seqlens: Tensor, max_seqlen: int | None,
               backend: str) -> Tensor:
    """sparse_attention over full rows [b, s, h_local, d]; cu_seqlens cover the b rows flattened."""
    b, s = q.shape[:2]
    flat = [t.reshape(1, b * s, *t.shape[2:]) for t in (q, k, v)]
    y = sparse_attention(*flat, pattern, cu_seqlens, backend=backend, max_seqlen=max_seqlen)
    return y.reshape(b, s, *y.shape[2:])


class UlyssesCore:
    """An attention core (sparse_attention's call shape) running inside DistributedAttention over `group`.

    A plain object, not a module: the model's module tree and state dict stay as they are.
    """

    def __init__(self, group):
        from deepspeed.sequence.layer import DistributedAttention

        self.attention = DistributedAttention(_full_rows, group, scatter_idx=2, gather_idx=1)

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, pattern, cu_seqlens: Tensor | None, *, backend: str,
                 max_seqlen: int | None) -> Tensor:
        # batch_dim_idx=0: [b, s, h, d] layout; scatter heads (2), gather the sequence (1). Keywords reach
        # the core unchanged in every DeepSpeed version (positional extras shifted when rotary_pos_emb came).
        return self.attention(q, k, v, 0, pattern=pattern, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                              backend=backend)


def check_heads(num_heads: int, num_kv_heads: int, sp_size: int) -> None:
    """Ulysses splits heads evenly: both head counts must be multiples of the group size."""
    if num_heads % sp_size or num_kv_heads % sp_size:
        raise ValueError(
            f"parallel.sequence_parallel_size={sp_size} must divide the attention heads ({num_heads}) and "
            f"key/value heads ({num_kv_heads}) of the model"
        )


def enable_ulysses(model: LlamaForCausalLM, group) -> None:
    """Route every layer's attention core through DistributedAttention over `group`."""
    check_heads(model.config.num_attention_heads, model.config.num_key_value_heads,
                torch_dist.get_world_size(group))
    core = UlyssesCore(group)
    for layer in model.model.layers:
        layer.self_attn.core = core


@contextlib.contextmanager
def ulysses_disabled(model: LlamaForCausalLM) -> Iterator[None]:
    """Plain attention inside the block (each rank then runs whole sequences, e.g. for evaluation)."""
    cores = [layer.self_attn.core for layer in model.model.layers]
    for layer in model.model.layers:
        layer.self_attn.core = sparse_attention
    try:
        yield
    finally:
        for layer, core in zip(model.model.layers, cores):
            layer.self_attn.core = core
