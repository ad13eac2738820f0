"""FLOPs per token for MFU: dense matmuls plus attention over the pairs each layer's pattern attends."""

from __future__ import annotations

from collections.abc import Sequence

from powerattn.model.config import LlamaConfig
from powerattn.patterns import Pattern


def flops_per_token(
    config: LlamaConfig, seq_len: int, patterns: Pattern | Sequence[Pattern], training: bool = True
) -> float:
    """Model FLOPs per token at seq_len (one sequence or one packed document of that length).

    Matmuls count 2 FLOPs per multiply-add: projections, MLP and lm_head (embedding lookup is free).
    Attention counts QK^T and PV over `pattern.density(seq_len)` of the causal pairs, per layer.
    training=True: forward + backward = 3x forward; activation recomputation is not counted (MFU, not HFU).
    """
    layers = config.num_hidden_layers
    if isinstance(patterns, Pattern):
        patterns = [patterns] * layers
    if len(patterns) != layers:
        raise ValueError(f"flops_per_token: got {len(patterns)} patterns for {layers} layers")
    h, hd = config.hidden_size, config.head_dim
    nh, nkv = config.num_attention_heads, config.num_key_value_heads
    per_layer = h * nh * hd + 2 * h * nkv * hd + nh * hd * h + 3 * h * config.intermediate_size
    dense = 2 * (layers * per_layer + h * config.vocab_size)
    causal_pairs_per_token = (seq_len + 1) / 2
    attention = sum(4 * nh * hd * p.density(seq_len) * causal_pairs_per_token for p in patterns)
    return (dense + attention) * (3 if training else 1)
