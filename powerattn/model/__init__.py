"""LLaMA-family model (Llama-2/3, Mistral, Qwen2) with per-layer sparse attention and HF safetensors I/O."""

from powerattn.lazy import lazy_exports

# Each name loads its submodule on first use: `powerattn.model.config` (configs, config.json) needs no torch.
EXPORTS = {
    "IGNORE_INDEX": "loss",
    "TokenLoss": "loss",
    "chunked_cross_entropy": "loss",
    "next_token_targets": "loss",
    "AttentionContext": "context",
    "Documents": "context",
    "find_documents": "context",
    "CheckpointError": "config",
    "LlamaConfig": "config",
    "extend_context": "config",
    "load_config": "config",
    "resolve_attention_schedule": "config",
    "KVCache": "kv_cache",
    "LlamaForCausalLM": "llama",
    "flops_per_token": "flops",
    "from_pretrained": "hf_io",
    "save_pretrained": "hf_io",
}
__all__ = sorted(EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, EXPORTS)
