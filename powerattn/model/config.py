"""Model configuration: HF config.json <-> LlamaConfig, RoPE-scaling validation, context extension,
and the per-layer attention schedule (which layers keep full attention).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
FUSED_OPS = ("auto", "liger", "none")  # see powerattn/model/fused.py

# Per RoPE type: (required keys, optional keys); rope_theta lives in LlamaConfig.rope_theta.
ROPE_TYPES: dict[str, tuple[set[str], set[str]]] = {
    "linear": ({"factor"}, set()),
    "dynamic": ({"factor"}, set()),
    "yarn": (
        {"factor", "original_max_position_embeddings"},
        {"attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"},
    ),
    "llama3": ({"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}, set()),
}

# config.json keys that LlamaConfig owns; every other key is carried through untouched (hf_extra).
_OWNED = {
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps",
    "rope_theta", "rope_scaling", "rope_parameters", "tie_word_embeddings", "attention_bias", "mlp_bias",
    "hidden_act", "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id",
}


class CheckpointError(ValueError):
    """A checkpoint folder or config.json that this framework cannot load (message names the offenders)."""


@dataclass
class LlamaConfig:
    """Architecture of a LLaMA-family decoder (Llama-2/3, Mistral, Qwen2), named as in HF config.json.

    Framework-only fields (never written to config.json): activation_checkpointing (True: every
    layer, or a list of layer indices), loss_chunk_size (tokens per lm_head + cross-entropy chunk),
    tiled_mlp (tokens per MLP tile, each recomputed in backward, so [tokens, intermediate]
    activations never exist whole; 0: untiled), offload_activations (the checkpointed layers'
    inputs wait for backward in CPU memory) and fused_ops (RMSNorm, RoPE, SwiGLU and the loss as
    Liger-Kernel's fused kernels: auto (on CUDA when installed) | liger | none; see fused.py).
    """

    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: = num_attention_heads (no GQA)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": linear|dynamic|yarn|llama3, ...}; None: plain
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # llama: bias on q, k, v and o; qwen2 always has q, k, v bias (no o bias)
    mlp_bias: bool = False
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    activation_checkpointing: bool | list[int] = False
    loss_chunk_size: int = 2048
    tiled_mlp: int = 0
    offload_activations: bool = False
    fused_ops: str = "auto"
    hf_extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise CheckpointError(
                f"model_type {self.model_type!r} is not LLaMA-family; "
                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
                     "loss_chunk_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise CheckpointError(f"config: {name} must be a positive int, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise CheckpointError(
                f"config: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise CheckpointError(f"config: RoPE needs an even head_dim, got {self.head_dim}")
        if self.hidden_act != "silu":
            raise CheckpointError(f"config: hidden_act {self.hidden_act!r} is not supported (LLaMA: 'silu')")
        self.rope_theta = float(self.rope_theta)
        self.rope_scaling = normalize_rope_scaling(self.rope_scaling, self.max_position_embeddings)
        self.activation_checkpointing = _check_layer_list(
            "activation_checkpointing", self.activation_checkpointing, self.num_hidden_layers
        )
        if isinstance(self.tiled_mlp, bool) or not isinstance(self.tiled_mlp, int) or self.tiled_mlp < 0:
            raise CheckpointError(f"config: tiled_mlp must be a token count >= 0 (0: untiled), got {self.tiled_mlp!r}")
        if self.fused_ops not in FUSED_OPS:
            raise CheckpointError(f"config: fused_ops {self.fused_ops!r} is not one of {FUSED_OPS}")
        if self.offload_activations and not self.checkpointed_layers():
            raise CheckpointError("config: offload_activations moves the inputs of activation-checkpointed layers "
                                  "to CPU memory; it needs activation_checkpointing")

    @property
    def qkv_bias(self) -> bool:
        return self.model_type == "qwen2" or self.attention_bias

    @property
    def o_bias(self) -> bool:
        return self.model_type != "qwen2" and self.attention_bias

    def checkpointed_layers(self) -> set[int]:
        """Indices of the layers whose activations are recomputed in backward."""
        ac = self.activation_checkpointing
        if isinstance(ac, bool):
            return set(range(self.num_hidden_layers)) if ac else set()
        return set(ac)

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], **overrides) -> LlamaConfig:
        """Build from HF config.json contents (old rope_theta/rope_scaling or new rope_parameters)."""
        raw = copy.deepcopy(raw)
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            arch = raw.get("architectures")
            raise CheckpointError(
                f"config.json has model_type {model_type!r} (architectures {arch}); this framework loads "
                f"LLaMA-family models only: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        theta, scaling = _read_rope(raw)
        kwargs = {f.name: raw[f.name] for f in dataclasses.fields(cls) if f.name in raw and f.name in _OWNED}
        kwargs.update(rope_theta=theta, rope_scaling=scaling)
        if kwargs.get("head_dim") is None:
            kwargs.pop("head_dim", None)
        kwargs["hf_extra"] = {k: v for k, v in raw.items() if k not in _OWNED}
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise TypeError(f"unknown LlamaConfig field(s) {unknown}")
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_hf_dict(self) -> dict[str, Any]:
        """config.json contents, RoPE written in both the old (rope_theta/rope_scaling) and new
        (rope_parameters) forms so transformers 4.x, 5.x and vLLM all read the same values."""
        out = copy.deepcopy(self.hf_extra)
        for f in dataclasses.fields(self):
            if f.name in _OWNED and f.name not in ("rope_scaling",):
                out[f.name] = copy.deepcopy(getattr(self, f.name))
        if self.model_type != "llama":  # mistral/qwen2 configs have no attention/mlp bias switches
            out.pop("attention_bias", None)
            out.pop("mlp_bias", None)
        out["rope_scaling"] = copy.deepcopy(self.rope_scaling)
        scaling = self.rope_scaling or {}
        out["rope_parameters"] = {"rope_type": "default", **scaling, "rope_theta": self.rope_theta}
        return out


def _check_layer_list(name: str, value, num_layers: int):
    if isinstance(value, bool):
        return value
    if not _is_sequence(value) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise CheckpointError(f"config: {name} must be a bool or a list of layer indices, got {value!r}")
    bad = [i for i in value if not 0 <= i < num_layers]
    if bad:
        raise CheckpointError(f"config: {name} has layer indices {bad} outside [0, {num_layers})")
    return sorted(set(value))


def _is_sequence(value) -> bool:
    """A list-like of items (Hydra's ListConfig included), not a string."""
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes))


def _read_rope(raw: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) from either field style; rope_scaling wins over rope_parameters as in HF."""
    params = raw.get("rope_parameters") or {}
    if params and not any(k in params for k in ("rope_type", "type", "rope_theta")):
        raise CheckpointError(f"config.json: per-layer-type rope_parameters {sorted(params)} are unsupported")
    scaling = dict(raw.get("rope_scaling") or params)
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    scaling.pop("rope_theta", None)
    prf = scaling.pop("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))
    if prf not in (None, 1, 1.0):
        raise CheckpointError(f"config.json: partial_rotary_factor={prf} is unsupported (LLaMA rotates all)")
    return float(theta), (scaling or None)


def normalize_rope_scaling(
    scaling: dict[str, Any] | None, max_position_embeddings: int
) -> dict[str, Any] | None:
    """Validate a rope_scaling dict; returns {"rope_type": ..., params} or None for plain RoPE.

    yarn and llama3 record the pre-extension length as original_max_position_embeddings; when it
    is absent it defaults to max_position_embeddings (as transformers does), and is then kept fixed.
    """
    if scaling is None:
        return None
    if not isinstance(scaling, Mapping):
        raise CheckpointError(f"config: rope_scaling must be a dict or None, got {scaling!r}")
    scaling = dict(scaling)
    rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    scaling.pop("type", None)
    scaling.pop("rope_theta", None)
    if rope_type == "default":
        if scaling:
            raise CheckpointError(f"config: default RoPE takes no scaling parameters, got {sorted(scaling)}")
        return None
    if rope_type not in ROPE_TYPES:
        raise CheckpointError(
            f"config: rope_type {rope_type!r} is not supported; "
            f"choose one of default, {', '.join(ROPE_TYPES)}"
        )
    required, optional = ROPE_TYPES[rope_type]
    if rope_type in ("yarn", "llama3"):
        scaling.setdefault("original_max_position_embeddings", max_position_embeddings)
    missing = sorted(required - set(scaling))
    unknown = sorted(set(scaling) - required - optional)
    if missing or unknown:
        raise CheckpointError(
            f"config: rope_scaling of type {rope_type!r} is missing {missing} / has unknown keys {unknown}; "
            f"it takes {sorted(required)} and optionally {sorted(optional)}"
        )
    factor = scaling["factor"]
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor <= 0:
        raise CheckpointError(f"config: rope_scaling factor must be a positive number, got {factor!r}")
    return {"rope_type": rope_type, **scaling}


def load_config(path: str | os.PathLike, **overrides) -> LlamaConfig:
    """Read `path/config.json` (or a config.json path) into a LlamaConfig."""
    path = os.fspath(path)
    file = path if path.endswith(".json") else os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no config.json at {file!r}: not an HF model folder")
    with open(file) as f:
        raw = json.load(f)
    if raw.get("use_sliding_window") or (raw.get("model_type") == "mistral" and raw.get("sliding_window")):
        warnings.warn(
            f"{file}: sliding_window={raw.get('sliding_window')} is ignored; powerattn applies the chosen "
            "pattern instead (pattern 'sliding_window' for a windowed model)", stacklevel=2,
        )
    return LlamaConfig.from_hf_dict(raw, **overrides)


def extend_context(
    config: LlamaConfig, max_position_embeddings: int, *, rope_theta: float | None = None,
    rope_scaling: dict[str, Any] | str | None = None,
) -> LlamaConfig:
    """A copy of `config` extended to a new length, e.g. extend_context(cfg, 131072, rope_theta=5e6).

    rope_theta: new RoPE base (ABF). rope_scaling: None keeps the current scaling; "default" removes
    it; a type name ("linear", "dynamic", "yarn", "llama3") uses factor = new / old length; a dict
    is used as given. yarn/llama3 keep the current original_max_position_embeddings if there is one,
    else the old max_position_embeddings. Note dynamic NTK only rescales beyond max_position_embeddings.
    """
    old = config.max_position_embeddings
    if isinstance(max_position_embeddings, bool) or not isinstance(max_position_embeddings, int) \
            or max_position_embeddings < 1:
        raise ValueError(f"extend_context: max_position_embeddings must be a positive int, got "
                         f"{max_position_embeddings!r}")
    if rope_theta is not None and not rope_theta > 0:
        raise ValueError(f"extend_context: rope_theta must be > 0, got {rope_theta!r}")
    original = (config.rope_scaling or {}).get("original_max_position_embeddings", old)
    scaling = config.rope_scaling
    if isinstance(rope_scaling, str):
        if rope_scaling == "default":
            scaling = None
        else:
            scaling = {"rope_type": rope_scaling, "factor": max_position_embeddings / original}
            if rope_scaling == "llama3":  # Llama-3.1's published values
                scaling.update(low_freq_factor=1.0, high_freq_factor=4.0)
    elif rope_scaling is not None:
        scaling = dict(rope_scaling)
    if scaling is not None and scaling.get("rope_type", scaling.get("type")) in ("yarn", "llama3"):
        scaling.setdefault("original_max_position_embeddings", original)
    return dataclasses.replace(
        config, max_position_embeddings=max_position_embeddings,
        rope_theta=config.rope_theta if rope_theta is None else float(rope_theta),
        rope_scaling=normalize_rope_scaling(scaling, old),
        hf_extra=copy.deepcopy(config.hf_extra),
    )


def resolve_attention_schedule(
    spec: str | list[int] | tuple[int, ...] | None, num_layers: int
) -> tuple[int, ...]:
    """Indices of the layers that keep full attention; all other layers use the sparse pattern.

    spec: None or "sparse" (no full layers), "full" (every layer), "hybrid:F/P" (F full layers in
    every group of P consecutive layers, spread evenly and ending at the group's last layer, e.g.
    "hybrid:2/7" -> layers 2, 6, 9, 13, ...), or an explicit list of layer indices.
    """
    if spec is None or spec == "sparse":
        return ()
    if spec == "full":
        return tuple(range(num_layers))
    if isinstance(spec, str):
        kind, _, ratio = spec.partition(":")
        f, _, p = ratio.partition("/")
        if kind != "hybrid" or not (f.isdigit() and p.isdigit()) or not 0 < int(f) <= int(p):
            raise ValueError(
                f"attention_schedule {spec!r} not understood; use None, 'sparse', 'full', 'hybrid:F/P' "
                "with 0 < F <= P (e.g. 'hybrid:2/7'), or a list of full-attention layer indices"
            )
        f, p = int(f), int(p)
        offsets = [(j + 1) * p // f - 1 for j in range(f)]
        return tuple(g + o for g in range(0, num_layers, p) for o in offsets if g + o < num_layers)
    layers = list(spec) if _is_sequence(spec) else None
    if layers is None or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        raise ValueError(f"attention_schedule must be None, a string or a list of layer indices: {spec!r}")
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad or len(set(layers)) != len(layers):
        raise ValueError(
            f"attention_schedule {layers}: indices must be unique and in [0, {num_layers}); bad: {bad}"
        )
    return tuple(sorted(layers))


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like "5GB", "500MB", "2GiB" (KB/MB/GB decimal, KiB/MiB/GiB binary)."""
    if isinstance(size, int) and not isinstance(size, bool):
        if size < 1:
            raise ValueError(f"max_shard_size must be positive, got {size}")
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size {size!r} not understood; use bytes or e.g. '5GB', '500MB'")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return max(1, int(float(m.group(1)) * scale))
