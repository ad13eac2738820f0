"""Rotary position embeddings with the context-extension variants: rope_theta (ABF), linear,
dynamic NTK, YaRN and Llama-3 scaling. Frequencies follow transformers' definitions exactly.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from powerattn.model.config import LlamaConfig


def rope_frequencies(config: LlamaConfig, seq_len: int | None = None) -> tuple[Tensor, float]:
    """(inv_freq float32 [head_dim // 2], attention scale applied to cos/sin) for `config`.

    seq_len only matters for dynamic NTK, which raises the base once seq_len > max_position_embeddings.
    """
    dim, base = config.head_dim, config.rope_theta
    scaling = config.rope_scaling or {"rope_type": "default"}
    kind = scaling["rope_type"]
    if kind == "dynamic" and seq_len is not None and seq_len > config.max_position_embeddings:
        factor = scaling["factor"]
        base = base * (factor * seq_len / config.max_position_embeddings - (factor - 1)) ** (dim / (dim - 2))
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    inv_freq = 1.0 / (base ** exponents)
    if kind == "linear":
        return inv_freq / scaling["factor"], 1.0
    if kind == "yarn":
        return _yarn(inv_freq, base, exponents, dim, scaling)
    if kind == "llama3":
        return _llama3(inv_freq, scaling), 1.0
    return inv_freq, 1.0


def _yarn(inv_freq: Tensor, base: float, exponents: Tensor, dim: int, s: dict) -> tuple[Tensor, float]:
    """YaRN (arXiv 2309.00071): interpolate low frequencies by `factor`, keep high ones, ramp between."""
    factor, original = s["factor"], s["original_max_position_embeddings"]

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        if s.get("mscale") and s.get("mscale_all_dim"):
            attention_factor = mscale(factor, s["mscale"]) / mscale(factor, s["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(s.get("beta_fast") or 32), correction_dim(s.get("beta_slow") or 1)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** exponents
    extrapolation = 1 - ramp  # 1: keep the original frequency, 0: interpolate
    inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv, float(attention_factor)


def _llama3(inv_freq: Tensor, s: dict) -> Tensor:
    """Llama-3.1: divide long wavelengths by `factor`, keep short ones, smooth in between."""
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """cos/sin tables (float32, [length, head_dim // 2]) cached per (device, length, dynamic length).

    Holds no parameters or buffers, so meta-device and ZeRO-3 construction need nothing special.
    """

    max_cached = 4

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self._tables: dict[tuple, tuple[Tensor, Tensor]] = {}

    def reset(self, config: LlamaConfig) -> None:
        """Switch to a new config (e.g. after context extension) and drop the cached tables."""
        self.config = config
        self._tables.clear()

    def table(self, length: int, device: torch.device, seq_len: int | None = None) -> tuple[Tensor, Tensor]:
        """cos, sin for positions 0 .. >= length - 1; seq_len picks the dynamic-NTK base."""
        cfg = self.config
        dynamic = (cfg.rope_scaling or {}).get("rope_type") == "dynamic"
        dyn_len = max(seq_len or 0, cfg.max_position_embeddings) if dynamic else 0
        size = 1 << max(length - 1, 1).bit_length()  # round up so growing lengths reuse a table
        for key, value in self._tables.items():
            if key[0] == str(device) and key[2] == dyn_len and key[1] >= length:
                return value
        inv_freq, scale = rope_frequencies(cfg, dyn_len or None)
        # Angles in float64: at 128K+ positions a float32 product is off by ~1e-2 rad.
        pos = torch.arange(size, dtype=torch.float64)
        angles = pos[:, None] * inv_freq.double()[None, :]
        cos = (angles.cos() * scale).float().to(device)
        sin = (angles.sin() * scale).float().to(device)
        if len(self._tables) >= self.max_cached:
            self._tables.pop(next(iter(self._tables)))
        self._tables[(str(device), size, dyn_len)] = (cos, sin)
        return cos, sin

    def forward(self, position_ids: Tensor | None, length: int, device: torch.device,
                max_position: int | None = None, seq_len: int | None = None) -> tuple[Tensor, Tensor]:
        """cos, sin float32 [batch or 1, length, head_dim // 2] at position_ids (default 0..length-1).

        max_position bounds position_ids (exclusive); without it position_ids.max() costs a sync.
        """
        if position_ids is None:
            cos, sin = self.table(length, device, seq_len)
            return cos[None, :length], sin[None, :length]
        if max_position is None:
            max_position = int(position_ids.max()) + 1 if position_ids.numel() else 1
        cos, sin = self.table(max_position, device, seq_len)
        return cos[position_ids], sin[position_ids]


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


class _Rope(torch.autograd.Function):
    """Rotation in float32 that saves only cos/sin: backward rotates the gradient by the opposite angle,
    so no float32 copy of q or k is kept for backward (that copy is 2x q's bf16 size per layer)."""

    @staticmethod
    def forward(ctx, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, grad: Tensor):
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, -sin), None, None


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [b, s, heads, head_dim] in float32 by cos/sin [b, s, head_dim // 2] (rotate-half layout)."""
    return _Rope.apply(x, cos, sin)
