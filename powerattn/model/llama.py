"""LLaMA-family decoder (Llama-2/3, Mistral, Qwen2) whose attention is one call to an attention core
(`sparse_attention`; sequence parallelism wraps it, see training/sequence_parallel.py) and whose other
ops come eager or fused from fused.py. Parameter names match transformers' LlamaForCausalLM, so state
dicts interchange. Generation, documents and caches, HF I/O, FLOP counting and ZeRO-3 helpers live beside.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.graph import save_on_cpu
from torch.utils.checkpoint import checkpoint

from powerattn.model import fused
from powerattn.model.config import LlamaConfig, extend_context, resolve_attention_schedule
from powerattn.model.context import AttentionContext, Documents, attention_context, find_documents
from powerattn.model.kv_cache import KVCache
from powerattn.model.loss import TokenLoss
from powerattn.model.rope import RotaryEmbedding
from powerattn.model.zero3 import edited_on_rank0
from powerattn.ops import BACKENDS, decode_attention, sparse_attention
from powerattn.patterns import Pattern, make_pattern
from powerattn.targets import next_token_targets


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, fused_ops: str = "none"):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.fused_ops = eps, fused_ops

    def forward(self, x: Tensor) -> Tensor:
        return fused.rms_norm(x, self.weight, self.eps, self.fused_ops)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        h = config.hidden_size
        self.q_proj = nn.Linear(h, self.n_head * self.head_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, h, bias=config.o_bias)
        self.pattern: Pattern = make_pattern("full")  # set by LlamaForCausalLM.configure_attention
        self.backend, self.fused_ops = "auto", config.fused_ops
        self.core = sparse_attention  # (q, k, v, pattern, cu_seqlens, backend=, max_seqlen=) -> out

    def forward(self, x: Tensor, ctx: AttentionContext) -> Tensor:
        b, s, _ = x.shape
        q, k = fused.rope(self.q_proj(x).view(b, s, self.n_head, self.head_dim),
                          self.k_proj(x).view(b, s, self.n_kv, self.head_dim), ctx.cos, ctx.sin, self.fused_ops)
        v = self.v_proj(x).view(b, s, self.n_kv, self.head_dim)
        cache = ctx.kv_cache
        if cache is not None and self.core is not sparse_attention:
            raise RuntimeError("a KV cache needs the plain attention core (decode under ulysses_disabled())")
        if ctx.decoding:  # new queries read the cache, each only the key blocks its pattern row names
            kc, vc = cache.write(self.layer_idx, k, v)
            y = decode_attention(q, kc, vc, self.pattern, ctx.cache_seqlens, backend=self.backend)
        else:
            if cache is not None:  # prefill: attend within the prompt, keep its keys for decoding
                cache.write(self.layer_idx, k, v, ctx.cu_list)
            y = self.core(q, k, v, self.pattern, ctx.cu_seqlens, backend=self.backend, max_seqlen=ctx.max_seqlen)
        return self.o_proj(y.reshape(b, s, -1))


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)
        self.tile, self.fused_ops = config.tiled_mlp, config.fused_ops  # tile: tokens per tile (0: all at once)

    def forward(self, x: Tensor) -> Tensor:
        if not self.tile or x.shape[:-1].numel() <= self.tile:
            return self.mlp(x)
        # Tiles of `tile` tokens, each its own checkpoint when training: forward keeps only the tile inputs and
        # backward recomputes one tile at a time, so [tokens, intermediate] activations never exist whole.
        run = (lambda t: checkpoint(self.mlp, t, use_reentrant=False)) if torch.is_grad_enabled() else self.mlp
        tiles = x.reshape(-1, x.shape[-1]).split(self.tile)
        return torch.cat([run(t) for t in tiles]).view(*x.shape[:-1], -1)

    def mlp(self, x: Tensor) -> Tensor:
        return self.down_proj(fused.silu_mul(self.gate_proj(x), self.up_proj(x), self.fused_ops))


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.fused_ops)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.fused_ops)

    def forward(self, x: Tensor, ctx: AttentionContext) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """Embedding, decoder layers and final norm: input_ids -> normalised hidden states."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        pad = config.pad_token_id
        pad = pad if isinstance(pad, int) and 0 <= pad < config.vocab_size else None
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=pad)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.fused_ops)
        self.rotary = RotaryEmbedding(config)

    def forward(self, input_ids: Tensor, docs: Documents | None = None, kv_cache: KVCache | None = None) -> Tensor:
        """Hidden states [b, s, hidden] of input_ids laid out as `docs` says; a KV cache gains their keys.

        Layers the config names are activation-checkpointed when training; with offload_activations the
        input a checkpointed layer keeps waits in CPU memory (pinned, copied back when backward reaches it).
        """
        ctx = attention_context(self.rotary, input_ids, docs or Documents(), kv_cache)
        h = self.embed_tokens(input_ids)
        recompute = self.config.checkpointed_layers() if self.training and torch.is_grad_enabled() else ()
        for i, layer in enumerate(self.layers):
            if i not in recompute:
                h = layer(h, ctx)
                continue
            with save_on_cpu(pin_memory=h.is_cuda) if self.config.offload_activations else nullcontext():
                h = checkpoint(layer, h, ctx, use_reentrant=False)
        if kv_cache is not None:
            kv_cache.advance(ctx.new_tokens)
        return self.norm(h)


class LMHead(nn.Module):
    """lm_head: `logits(hidden)` [..., vocab], or `loss(hidden, targets)`: the summed loss over non-ignored,
    already shifted targets and their count, never holding all logits. Both enter through the module call
    (forward tells them apart by targets): ZeRO-3 gathers the weight in its hooks, which run only on calls."""

    def __init__(self, hidden_size: int, vocab_size: int, tied: nn.Parameter | None = None, fused_ops: str = "none"):
        super().__init__()
        self.weight = tied if tied is not None else nn.Parameter(torch.empty(vocab_size, hidden_size))
        self.fused_ops = fused_ops

    def logits(self, hidden: Tensor) -> Tensor:
        return self(hidden)

    def loss(self, hidden: Tensor, targets: Tensor, chunk_size: int) -> TokenLoss:
        return self(hidden, targets, chunk_size)

    def forward(self, hidden: Tensor, targets: Tensor | None = None, chunk_size: int = 2048) -> Tensor | TokenLoss:
        if targets is None:
            return F.linear(hidden, self.weight)
        return fused.linear_cross_entropy(hidden, self.weight, targets, chunk_size, self.fused_ops)


class LlamaForCausalLM(nn.Module):
    """Decoder + lm_head with per-layer attention patterns, chunked loss, KV-cache generation, HF I/O."""

    def __init__(self, config: LlamaConfig, pattern: Pattern | None = None,
                 attention_schedule: str | list[int] | None = None, backend: str = "auto",
                 init_weights: bool = True):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        tied = self.model.embed_tokens.weight if config.tie_word_embeddings else None
        self.lm_head = LMHead(config.hidden_size, config.vocab_size, tied, config.fused_ops)
        self.source_dir: str | None = None  # the HF folder loaded from (tokenizer files are copied from it)
        self.configure_attention(pattern, attention_schedule, backend)
        if init_weights and not self.lm_head.weight.is_meta:
            self.init_weights()

    def configure_attention(self, pattern: Pattern | None = None,
                            attention_schedule: str | list[int] | None = None, backend: str = "auto") -> None:
        """Give every layer `pattern` (None: full attention), except the schedule's full-attention layers."""
        pattern = make_pattern("full") if pattern is None else pattern
        if not isinstance(pattern, Pattern):
            raise TypeError(f"pattern must be a powerattn Pattern, got {type(pattern).__name__}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
        layers = self.config.num_hidden_layers
        self.full_attention_layers = resolve_attention_schedule(attention_schedule, layers)
        self.pattern, self.backend = pattern, backend
        full = make_pattern("full", block_size=pattern.block_size)
        for i, layer in enumerate(self.model.layers):
            layer.self_attn.pattern = full if i in self.full_attention_layers else pattern
            layer.self_attn.backend = backend

    @property
    def layer_patterns(self) -> list[Pattern]:
        return [layer.self_attn.pattern for layer in self.model.layers]

    def forward(self, input_ids: Tensor, labels: Tensor | None = None, position_ids: Tensor | None = None,
                cu_seqlens: Tensor | None = None, max_seqlen: int | None = None,
                kv_cache: KVCache | None = None) -> Tensor:
        """Logits [b, s, vocab] without labels; with labels the mean next-token loss (a scalar).

        labels [b, s] align with input_ids and are shifted inside (position t predicts labels[t+1]);
        -100 is ignored; no target crosses a document boundary given by cu_seqlens (int32
        [num_docs + 1], batch 1) or by position_ids restarting. position_ids default to 0..s-1,
        or to positions inside each document when cu_seqlens is given.
        """
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(f"labels {tuple(labels.shape)} must have the shape of input_ids {tuple(input_ids.shape)}")
        if position_ids is not None and kv_cache is not None:
            raise ValueError("position_ids come from the KV cache when decoding; do not pass them")
        docs = find_documents(input_ids, position_ids, cu_seqlens, max_seqlen)
        if labels is None:
            return self.lm_head.logits(self.model(input_ids, docs, kv_cache))
        return self.loss(input_ids, next_token_targets(labels, docs.cu_seqlens, docs.position_ids), docs).mean()

    def loss(self, input_ids: Tensor, targets: Tensor, docs: Documents) -> TokenLoss:
        """Summed loss of already-shifted targets [b, s] and their count (training: rows, or a Ulysses slice)."""
        return self.lm_head.loss(self.model(input_ids, docs), targets, self.config.loss_chunk_size)

    def generate(self, input_ids: Tensor | list[Tensor], max_new_tokens: int,
                 eos_token_id: int | list[int] | None = None) -> Tensor | list[Tensor]:
        """Greedy decoding with a KV cache, each new token reading only its pattern row (see generate.py)."""
        from powerattn.model.generate import generate

        return generate(self, input_ids, max_new_tokens, eos_token_id)

    def extend_context(self, max_position_embeddings: int, *, rope_theta: float | None = None,
                       rope_scaling: dict | str | None = None) -> None:
        """Update max_position_embeddings / RoPE (see config.extend_context); saved config.json follows."""
        self.config = extend_context(self.config, max_position_embeddings, rope_theta=rope_theta,
                                     rope_scaling=rope_scaling)
        self.model.config = self.config
        self.model.rotary.reset(self.config)

    def save_pretrained(self, out_dir: str, max_shard_size: int | str = "5GB",
                        tokenizer_dir: str | None = None, dtype: torch.dtype | None = None) -> None:
        """Write an HF folder atomically (see hf_io.save_pretrained); under ZeRO-3 every rank must call it."""
        from powerattn.model.hf_io import save_pretrained

        save_pretrained(self, out_dir, max_shard_size=max_shard_size, tokenizer_dir=tokenizer_dir, dtype=dtype)

    @torch.no_grad()
    def init_weights(self) -> None:
        """HF's LLaMA init: normal(0, initializer_range) matrices, zero biases, unit norms (ZeRO-3 aware)."""
        std = self.config.initializer_range
        for module in self.modules():
            params = list(module.parameters(recurse=False))
            if not params or (isinstance(module, LMHead) and self.config.tie_word_embeddings):
                continue
            with edited_on_rank0(params) as write:
                if not write:
                    continue
                if isinstance(module, (nn.Linear, nn.Embedding, LMHead)):
                    module.weight.normal_(0.0, std)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    module.bias.zero_()
                if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                    module.weight[module.padding_idx].zero_()
                if isinstance(module, RMSNorm):
                    module.weight.fill_(1.0)
