"""LLaMA-family model (Llama-2/3, Mistral, Qwen2) with per-layer sparse attention and HF safetensors I/O."""

from powerattn.model.config import (
    CheckpointError,
    LlamaConfig,
    extend_context,
    load_config,
    resolve_attention_schedule,
)
from powerattn.model.context import AttentionContext, Documents, find_documents
from powerattn.model.flops import flops_per_token
from powerattn.model.hf_io import from_pretrained, save_pretrained
from powerattn.model.kv_cache import KVCache
from powerattn.model.llama import LlamaForCausalLM
from powerattn.model.loss import IGNORE_INDEX, TokenLoss, chunked_cross_entropy, next_token_targets

__all__ = [
    "IGNORE_INDEX",
    "AttentionContext",
    "CheckpointError",
    "Documents",
    "KVCache",
    "LlamaConfig",
    "LlamaForCausalLM",
    "TokenLoss",
    "chunked_cross_entropy",
    "extend_context",
    "find_documents",
    "flops_per_token",
    "from_pretrained",
    "load_config",
    "next_token_targets",
    "resolve_attention_schedule",
    "save_pretrained",
]
