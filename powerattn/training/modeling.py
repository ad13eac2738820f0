"""The model a run trains: an HF folder or a from-scratch architecture, with the run's pattern,
attention schedule, dtype and context; plus the RoPE / max-length switch at curriculum stages.

`check_model` reads only config.json, so a wrong path, a mismatched architecture, a tokenizer too
big for the embedding or heads that sequence parallelism cannot split fail before any weights load.
"""

from __future__ import annotations

import os

import torch

from powerattn.dtypes import DTYPES
from powerattn.model import LlamaConfig, LlamaForCausalLM, from_pretrained, load_config
from powerattn.model.zero3 import init_context, zero3_enabled
from powerattn.patterns import pattern_from_dict
from powerattn.training.config import (
    ConfigError,
    TrainConfig,
    arch_config,
    validate_pattern,
)
from powerattn.training.curriculum import Curriculum, Stage
from powerattn.training.sequence_parallel import check_heads

# What must agree between model.arch and the folder's config.json (context fields may differ).
ARCH_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings")


def resolve_precision(precision: str, device: torch.device) -> tuple[str, torch.dtype]:
    """("bf16" | "fp16" | "fp32", dtype); auto = bf16 on a GPU that has it, else fp32."""
    if precision == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        precision = "bf16" if cuda_bf16 else "fp32"
    return precision, DTYPES[precision]


def _overrides(cfg: TrainConfig) -> dict:
    return dict(activation_checkpointing=cfg.model.activation_checkpointing,
                loss_chunk_size=cfg.model.loss_chunk_size, tiled_mlp=cfg.model.tiled_mlp,
                offload_activations=cfg.model.offload_activations, fused_ops=cfg.model.fused_ops)


def check_model(cfg: TrainConfig, vocab_size: int | None, sp_size: int) -> LlamaConfig:
    """The architecture the run will build, checked against the tokenizer (None: not known yet) and
    the process layout."""
    m = cfg.model
    if m.path is not None:
        if not os.path.isfile(os.path.join(m.path, "config.json")):
            raise ConfigError(f"model.path: {m.path!r} is not an HF model folder (no config.json)")
        try:
            config = load_config(m.path, **_overrides(cfg))
        except (ValueError, TypeError) as e:  # config.json unreadable, or not a LLaMA-family model
            raise ConfigError(f"model.path: {m.path}/config.json: {e}") from None
        if m.arch is not None:
            wanted = arch_config(m.arch, vocab_size=m.arch.get("vocab_size") or config.vocab_size)
            diff = [f"{k}: config.json {getattr(config, k)!r} vs model.arch {getattr(wanted, k)!r}"
                    for k in ARCH_KEYS if getattr(config, k) != getattr(wanted, k)]
            if diff:
                raise ConfigError(f"model.path {m.path!r} does not hold the architecture of model.arch "
                                  f"({diff}); pick the matching model= group or set model.arch=null")
    else:
        # Before the tokenizer is known, a stand-in vocabulary: everything else is checked all the same.
        config = arch_config(m.arch, vocab_size=m.arch.get("vocab_size") or vocab_size or 32000, **_overrides(cfg))
    if vocab_size is not None and vocab_size > config.vocab_size:
        raise ConfigError(f"data.tokenizer has {vocab_size} tokens but the model's vocab_size is "
                          f"{config.vocab_size}: the tokenizer does not belong to this model")
    validate_pattern(cfg.pattern, config.num_hidden_layers)
    try:
        check_heads(config.num_attention_heads, config.num_key_value_heads, sp_size)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return config


def build_model(cfg: TrainConfig, config: LlamaConfig, bos_id: int | None, eos_id: int | None,
                ds_config: dict, dtype: torch.dtype, device: torch.device,
                weights: str | os.PathLike | None = None) -> LlamaForCausalLM:
    """Load model.path (or initialise `config` from scratch), partitioned when ds_config is ZeRO-3.

    weights: an HF folder to load instead (a checkpoint's model/, for a weights-only resume).
    """
    m = cfg.model
    pattern, schedule = pattern_from_dict(cfg.pattern), cfg.pattern.get("schedule")
    zero3 = zero3_enabled(ds_config)
    path = weights if weights is not None else m.path
    if path is not None:
        # A size check of a sealed folder here; resume checks a checkpoint's hashes once, over all ranks.
        model = from_pretrained(path, pattern=pattern, dtype=dtype, attention_schedule=schedule,
                                device=device, backend=m.attention_backend,
                                deepspeed_config=ds_config if zero3 else None, verify="size", **_overrides(cfg))
    else:
        if config.bos_token_id is None and config.eos_token_id is None:
            config.bos_token_id, config.eos_token_id = bos_id, eos_id
        torch.manual_seed(cfg.seed)  # the same initial weights for any process layout
        if zero3:
            with init_context(ds_config, dtype):
                model = LlamaForCausalLM(config, pattern, schedule, m.attention_backend)
        else:
            with torch.device(device):
                model = LlamaForCausalLM(config, pattern, schedule, m.attention_backend)
            model.to(dtype)
    if m.max_position_embeddings or m.rope_theta or m.rope_scaling is not None:
        model.extend_context(m.max_position_embeddings or model.config.max_position_embeddings,
                             rope_theta=m.rope_theta, rope_scaling=m.rope_scaling)
    return model


def apply_stage_context(model: LlamaForCausalLM, curriculum: Curriculum, stage: Stage) -> bool:
    """Grow max_position_embeddings to the longest sequence so far and set the stage's RoPE base.

    A pure function of the stage (not of what ran before), so a resumed run lands on the same
    RoPE as an uninterrupted one. Returns whether the config changed.
    """
    longest = max(s.seq_len for s in curriculum.stages[: stage.index + 1])
    length = max(model.config.max_position_embeddings, longest)
    theta = curriculum.rope_theta_at(stage)
    if length == model.config.max_position_embeddings and theta in (None, model.config.rope_theta):
        return False
    model.extend_context(length, rope_theta=theta)
    return True
