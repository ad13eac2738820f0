"""LLaMA-family decoder (Llama-2/3, Mistral, Qwen2) whose attention is one call to `sparse_attention`.

Parameter names match transformers' LlamaForCausalLM / Qwen2ForCausalLM, so state dicts interchange.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.graph import save_on_cpu
from torch.utils.checkpoint import checkpoint

from powerattn.model.config import LlamaConfig, extend_context, resolve_attention_schedule
from powerattn.model.flops import flops_per_token
from powerattn.model.kv_cache import KVCache
from powerattn.model.loss import chunked_cross_entropy, next_token_targets
from powerattn.model.rope import RotaryEmbedding, apply_rope
from powerattn.model.zero3 import gathered, is_zero3, rank
from powerattn.ops import BACKENDS, decode_attention, sparse_attention
from powerattn.patterns import Pattern, make_pattern
from powerattn.reference import document_positions


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


@dataclass
class Batch:
    """What every layer needs besides the hidden states, prepared once per forward."""

    cos: Tensor  # float32 [b or 1, s, head_dim // 2]
    sin: Tensor
    cu_seqlens: Tensor | None = None  # int32 on the input's device
    cu_list: list[int] | None = None  # the same on the host, when known without a sync
    max_seqlen: int | None = None
    kv_cache: KVCache | None = None
    cache_seqlens: Tensor | None = None  # int32 [b]: cache lengths after this step (decoding only)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        h = config.hidden_size
        self.q_proj = nn.Linear(h, self.n_head * self.head_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, h, bias=config.o_bias)
        self.pattern: Pattern = make_pattern("full")  # set by LlamaForCausalLM.configure_attention
        self.backend = "auto"

    def qkv(self, x: Tensor, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        """Projected q, k, v [b, s, heads, d], RoPE applied to q and k."""
        b, s, _ = x.shape
        q = apply_rope(self.q_proj(x).view(b, s, self.n_head, self.head_dim), batch.cos, batch.sin)
        k = apply_rope(self.k_proj(x).view(b, s, self.n_kv, self.head_dim), batch.cos, batch.sin)
        return q, k, self.v_proj(x).view(b, s, self.n_kv, self.head_dim)

    def forward(self, x: Tensor, batch: Batch) -> Tensor:
        b, s, _ = x.shape
        q, k, v = self.qkv(x, batch)
        cache = batch.kv_cache
        if cache is not None and batch.cache_seqlens is not None:
            # Decoding: new queries read the cache, each only the key blocks its pattern row names.
            kc, vc = cache.write(self.layer_idx, k, v)
            y = decode_attention(q, kc, vc, self.pattern, batch.cache_seqlens, backend=self.backend)
        else:
            if cache is not None:  # prefill: attend within the prompt, keep its keys for decoding
                cache.write(self.layer_idx, k, v, batch.cu_list)
            y = sparse_attention(q, k, v, self.pattern, batch.cu_seqlens, backend=self.backend,
                                 max_seqlen=batch.max_seqlen)
        return self.o_proj(y.reshape(b, s, -1))


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)
        self.tile = config.tiled_mlp  # tokens per tile; 0: all at once

    def forward(self, x: Tensor) -> Tensor:
        if not self.tile or x.shape[:-1].numel() <= self.tile:
            return self.mlp(x)
        # Tiles of `tile` tokens, each its own checkpoint when training: forward keeps only the tile inputs and
        # backward recomputes one tile at a time, so [tokens, intermediate] activations never exist whole.
        run = (lambda t: checkpoint(self.mlp, t, use_reentrant=False)) if torch.is_grad_enabled() else self.mlp
        tiles = x.reshape(-1, x.shape[-1]).split(self.tile)
        return torch.cat([run(t) for t in tiles]).view(*x.shape[:-1], -1)

    def mlp(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: Tensor, batch: Batch) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), batch)
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
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config)

    def forward(self, input_ids: Tensor, position_ids: Tensor | None = None, cu_seqlens: Tensor | None = None,
                max_seqlen: int | None = None, kv_cache: KVCache | None = None) -> Tensor:
        batch, new_tokens = self._prepare(input_ids, position_ids, cu_seqlens, max_seqlen, kv_cache)
        h = self.run_layers(self.embed_tokens(input_ids), batch)
        if kv_cache is not None:
            kv_cache.advance(new_tokens)
        return h

    def run_layers(self, h: Tensor, batch: Batch) -> Tensor:
        """Decoder layers (those the config names activation-checkpointed, when training), then the norm.

        A checkpointed layer keeps only its input for backward; with offload_activations that input waits
        in CPU memory (pinned, copied back when backward reaches the layer), the recomputation stays on the GPU.
        """
        recompute = self.config.checkpointed_layers() if self.training and torch.is_grad_enabled() else ()
        for i, layer in enumerate(self.layers):
            if i not in recompute:
                h = layer(h, batch)
                continue
            with save_on_cpu(pin_memory=h.is_cuda) if self.config.offload_activations else nullcontext():
                h = checkpoint(layer, h, batch, use_reentrant=False)
        return self.norm(h)

    def _prepare(self, input_ids, position_ids, cu_seqlens, max_seqlen, kv_cache) -> tuple[Batch, list[int]]:
        """Resolve documents, positions and cache state into a Batch; also the tokens each cache row gains."""
        b, s = input_ids.shape
        device = input_ids.device
        if position_ids is not None and kv_cache is not None:
            raise ValueError("position_ids come from the KV cache when decoding; do not pass them")
        docs = _documents(b, s, device, position_ids, cu_seqlens, max_seqlen)
        position_ids, cu_seqlens, cu_list, max_seqlen, max_position = docs
        rope_len = max_position  # the length dynamic NTK scales for
        cache_seqlens, new_tokens = None, []
        if kv_cache is not None:
            if cu_seqlens is not None:  # ragged prompts packed into one row, one cache row per document
                if cu_list is None or not kv_cache.empty or len(cu_list) - 1 != len(kv_cache.lengths):
                    raise ValueError("packed prefill needs cu_seqlens on the CPU and an empty KV cache "
                                     "with one row per document")
                new_tokens = [y - x for x, y in zip(cu_list, cu_list[1:])]
            else:
                if b != len(kv_cache.lengths):
                    raise ValueError(f"input batch {b} does not match KV cache batch {len(kv_cache.lengths)}")
                position_ids = kv_cache.positions(s, device)
                new_tokens = [s] * b
                if not kv_cache.empty:
                    cache_seqlens = kv_cache.seqlens_after(s, device)
            kv_cache.check_room(new_tokens)
            # The whole generation shares one dynamic-NTK base, so cached keys stay consistent.
            max_position = rope_len = kv_cache.max_len
        cos, sin = self.rotary(position_ids, s, device, max_position, seq_len=rope_len)
        return Batch(cos, sin, cu_seqlens, cu_list, max_seqlen, kv_cache, cache_seqlens), new_tokens


def _documents(b: int, s: int, device: torch.device, position_ids: Tensor | None, cu_seqlens: Tensor | None,
               max_seqlen: int | None):
    """Documents and positions: (position_ids, cu_seqlens, cu_list, max_seqlen, max_position).

    cu_seqlens (batch 1) gives documents and, by default, positions restarting in each. Without it,
    position_ids that restart (do not continue by +1) mark documents: that costs one host sync.
    max_position bounds the position ids (exclusive); cu_list is cu_seqlens on the host when known.
    """
    cu_list = None
    if cu_seqlens is not None:
        if b != 1:
            raise ValueError(f"cu_seqlens marks packed documents and needs batch 1, got batch {b}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.is_floating_point():
            raise ValueError(f"cu_seqlens must be an integer tensor [num_docs + 1], got "
                             f"{cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
        if cu_seqlens.device.type == "cpu":
            cu_list = cu_seqlens.tolist()
            if cu_list[0] != 0 or cu_list[-1] != s or any(x > y for x, y in zip(cu_list, cu_list[1:])):
                raise ValueError(f"cu_seqlens must ascend from 0 to seqlen={s}, got {cu_list}")
            max_seqlen = max_seqlen or max(y - x for x, y in zip(cu_list, cu_list[1:]))
        cu_seqlens = cu_seqlens.to(device=device, dtype=torch.int32, non_blocking=True)
        if position_ids is None:
            positions = document_positions(cu_seqlens, s)[1][None]
            return positions, cu_seqlens, cu_list, max_seqlen, max_seqlen or s
    elif position_ids is not None:
        position_ids = position_ids.to(device).expand(b, s)
        restart = position_ids[:, 1:] != position_ids[:, :-1] + 1
        if bool(restart.any()):
            if b != 1:
                raise ValueError("position_ids restart inside a row (packed documents): use batch 1")
            cu_list = [0, *(torch.nonzero(restart[0]).flatten() + 1).tolist(), s]
            cu_seqlens = torch.tensor(cu_list, dtype=torch.int32, device=device)
            max_seqlen = max(y - x for x, y in zip(cu_list, cu_list[1:]))
    if position_ids is None:
        return None, None, None, max_seqlen, s
    return position_ids, cu_seqlens, cu_list, max_seqlen, int(position_ids.max()) + 1


class LMHead(nn.Module):
    """lm_head: logits, or the chunked next-token loss inside one call (ZeRO-3 gathers the weight once)."""

    def __init__(self, hidden_size: int, vocab_size: int, tied: nn.Parameter | None = None):
        super().__init__()
        self.weight = tied if tied is not None else nn.Parameter(torch.empty(vocab_size, hidden_size))

    def forward(self, hidden: Tensor, targets: Tensor | None = None, chunk_size: int = 2048) -> Tensor:
        if targets is None:
            return F.linear(hidden, self.weight)
        return chunked_cross_entropy(hidden, self.weight, targets, chunk_size)


class LlamaForCausalLM(nn.Module):
    """Decoder + lm_head with per-layer attention patterns, chunked loss, KV-cache generation, HF I/O."""

    def __init__(self, config: LlamaConfig, pattern: Pattern | None = None,
                 attention_schedule: str | list[int] | None = None, backend: str = "auto",
                 init_weights: bool = True):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        tied = self.model.embed_tokens.weight if config.tie_word_embeddings else None
        self.lm_head = LMHead(config.hidden_size, config.vocab_size, tied)
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
        if input_ids.dim() != 2 or input_ids.is_floating_point():
            raise ValueError(f"input_ids must be integer [batch, seqlen], got {input_ids.dtype} "
                             f"{tuple(input_ids.shape)}")
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(f"labels {tuple(labels.shape)} must have the shape of input_ids "
                             f"{tuple(input_ids.shape)}")
        hidden = self.model(input_ids, position_ids, cu_seqlens, max_seqlen, kv_cache)
        if labels is None:
            return self.lm_head(hidden)
        targets = next_token_targets(labels, cu_seqlens, position_ids)
        return self.lm_head(hidden, targets, self.config.loss_chunk_size)

    @torch.no_grad()
    def generate(self, input_ids: Tensor | list[Tensor], max_new_tokens: int,
                 eos_token_id: int | list[int] | None = None) -> Tensor | list[Tensor]:
        """Greedy decoding with a KV cache; every new token reads only its pattern row's key blocks.

        input_ids: [b, s] prompts of one length -> [b, s + max_new_tokens]; or a list of 1-D prompts
        of any lengths -> a list of 1-D (prompt + new tokens). With eos_token_id a row stops at EOS
        (a tensor result is padded with it) and decoding ends once every row has stopped. Under
        ZeRO-3 every rank must run the same number of steps: leave eos_token_id None there.
        Dynamic-NTK RoPE uses one base for the whole call, that of prompt + max_new_tokens.
        """
        ragged = isinstance(input_ids, (list, tuple))
        prompts = [p.reshape(-1) for p in input_ids] if ragged else None
        if not ragged and (input_ids.dim() != 2 or input_ids.shape[1] == 0):
            raise ValueError(f"generate: input_ids must be [batch, seqlen >= 1]: {tuple(input_ids.shape)}")
        lengths = [len(p) for p in prompts] if ragged else [input_ids.shape[1]] * input_ids.shape[0]
        if not lengths or min(lengths) == 0:
            raise ValueError("generate: every prompt needs at least one token")
        if max_new_tokens < 1:
            return input_ids
        cache = KVCache(self.config.num_hidden_layers, len(lengths), max(lengths) + max_new_tokens)
        if ragged:
            cu = [0]
            for n in lengths:
                cu.append(cu[-1] + n)
            hidden = self.model(torch.cat(prompts)[None], cu_seqlens=torch.tensor(cu, dtype=torch.int32),
                                kv_cache=cache)
            last = hidden[0, torch.tensor(cu[1:], device=hidden.device) - 1]
        else:
            last = self.model(input_ids, kv_cache=cache)[:, -1]
        eos = None if eos_token_id is None else torch.tensor(eos_token_id, device=last.device).reshape(-1)
        finished = torch.zeros(len(lengths), dtype=torch.bool, device=last.device)
        out = []
        for step in range(max_new_tokens):
            token = self.lm_head(last).float().argmax(-1)
            if eos is not None:
                token = torch.where(finished, eos[0], token)
                finished |= torch.isin(token, eos)
            out.append(token)
            if step == max_new_tokens - 1 or (eos is not None and bool(finished.all())):
                break
            last = self.model(token[:, None], kv_cache=cache)[:, -1]
        new = torch.stack(out, dim=1)
        if eos is not None and len(out) < max_new_tokens:
            new = F.pad(new, (0, max_new_tokens - len(out)), value=int(eos[0]))
        if not ragged:
            return torch.cat([input_ids, new.to(input_ids.dtype)], dim=1)
        results = []
        for p, row in zip(prompts, new):
            if eos is not None and bool(torch.isin(row, eos).any()):
                row = row[: int(torch.isin(row, eos).nonzero()[0]) + 1]
            results.append(torch.cat([p, row.to(p.dtype)]))
        return results

    def flops_per_token(self, seq_len: int, training: bool = True) -> float:
        """FLOPs per token at seq_len with this model's per-layer patterns (see flops.flops_per_token)."""
        return flops_per_token(self.config, seq_len, self.layer_patterns, training)

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

        save_pretrained(self, out_dir, max_shard_size=max_shard_size, tokenizer_dir=tokenizer_dir,
                        dtype=dtype)

    @torch.no_grad()
    def init_weights(self) -> None:
        """HF's LLaMA init: normal(0, initializer_range) matrices, zero biases, unit norms (ZeRO-3 aware)."""
        std = self.config.initializer_range
        for module in self.modules():
            params = list(module.parameters(recurse=False))
            if not params or (isinstance(module, LMHead) and self.config.tie_word_embeddings):
                continue
            with gathered(params, modifier_rank=0):
                if any(is_zero3(p) for p in params) and rank() != 0:
                    continue
                if isinstance(module, (nn.Linear, nn.Embedding, LMHead)):
                    module.weight.normal_(0.0, std)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    module.bias.zero_()
                if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                    module.weight[module.padding_idx].zero_()
                if isinstance(module, RMSNorm):
                    module.weight.fill_(1.0)
