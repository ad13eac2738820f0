"""Run powerattn checkpoints in transformers with their own sparsity pattern.

`import powerattn.hf` registers attn_implementation="powerattn" with transformers' AttentionInterface
(and its mask step with AttentionMaskInterface); `AutoModelForCausalLM.from_pretrained(ckpt,
attn_implementation="powerattn")` then runs each layer with the pattern, or full attention, recorded
under config.json's "powerattn" key. Prefill goes through `sparse_attention`; decoding with
transformers' DynamicCache goes through `decode_attention` (each new token reads its pattern row).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor

from powerattn.model.config import resolve_attention_schedule
from powerattn.ops import decode_attention, sparse_attention
from powerattn.patterns import Pattern, make_pattern, pattern_from_dict

NAME = "powerattn"


class PowerAttnError(ValueError):
    """Inputs the "powerattn" attention cannot run as the pattern says (it never falls back to dense)."""


# ---- the pattern of each layer, from config.json ----------------------------------------------------


def pattern_entry(pattern: Pattern, full_attention_layers=()) -> dict:
    """The config.json "powerattn" entry for `pattern` (what powerattn's save_pretrained writes)."""
    return {"pattern": {"name": pattern.name, **dataclasses.asdict(pattern)},
            "full_attention_layers": list(full_attention_layers)}


def configure(model, pattern: Pattern, attention_schedule: str | list[int] | None = None) -> None:
    """Record `pattern` (+ full-attention layers) on an HF model or config, e.g. to run a base model sparse.

    attention_schedule as in powerattn.model.resolve_attention_schedule ("hybrid:2/7", a list, None).
    The entry is saved with the model's config.json, so a later from_pretrained runs the same pattern.
    """
    if not isinstance(pattern, Pattern):
        raise TypeError(f"configure: pattern must be a powerattn Pattern, got {type(pattern).__name__}")
    config = getattr(model, "config", model)
    full = resolve_attention_schedule(attention_schedule, config.num_hidden_layers)
    config.powerattn = pattern_entry(pattern, full)


@functools.lru_cache(maxsize=16)
def _layer_patterns(entry_json: str, num_layers: int) -> tuple[Pattern, ...]:
    entry = json.loads(entry_json)
    if "name" not in (entry.get("pattern") or {}):
        raise PowerAttnError(f"config.json 'powerattn' entry names no pattern: {entry_json}")
    pattern = pattern_from_dict(entry["pattern"])
    full = set(resolve_attention_schedule(entry.get("full_attention_layers") or None, num_layers))
    dense = make_pattern("full", block_size=pattern.block_size)
    return tuple(dense if i in full else pattern for i in range(num_layers))


def layer_patterns(config) -> tuple[Pattern, ...]:
    """Per-layer patterns of an HF config carrying a "powerattn" entry (full-attention layers included)."""
    entry = getattr(config, NAME, None)
    if not entry:
        raise PowerAttnError(
            "attn_implementation='powerattn' needs the 'powerattn' entry a powerattn checkpoint has in its "
            "config.json (pattern and full-attention layers); this config has none. Call "
            "powerattn.hf.configure(model, pattern) to run another model with a pattern, or use 'sdpa'"
        )
    return _layer_patterns(json.dumps(entry, sort_keys=True), config.num_hidden_layers)


def _refuse_sliding_window(window: int) -> None:
    raise PowerAttnError(
        f"the config asks for sliding-window attention (window {window}); the powerattn pattern replaces it: "
        "load with sliding_window=None, e.g. from_pretrained(ckpt, attn_implementation='powerattn', "
        "sliding_window=None)"
    )


# ---- the mask step: which keys of each row are real tokens ------------------------------------------


@dataclass(frozen=True)
class Padding:
    """Each row's real tokens are key positions [starts[i], ends[i]) of the cache (left/right padding)."""

    starts: tuple[int, ...]
    ends: tuple[int, ...]
    kv_length: int


def padding_mask(batch_size: int, attention_mask: Tensor | None = None, kv_length: int | None = None,
                 kv_offset: int = 0, q_length: int | None = None, q_offset=None, cache_position=None,
                 local_size: int | None = None, **kwargs) -> Padding | None:
    """transformers' mask hook for "powerattn": None (no padding) or the rows' real-token spans.

    The pattern itself needs no mask (it restarts at each row's first real token); padding inside a
    row, sliding-window layers and caches other than DynamicCache are refused with a PowerAttnError.
    """
    if local_size is not None:
        _refuse_sliding_window(local_size)
    if q_length is None:  # transformers 4.5x passes the query positions instead
        q_length, q_offset = len(cache_position), cache_position[0]
    if isinstance(q_offset, Tensor):
        q_offset = int(q_offset)
    if kv_offset != 0 or (q_offset or 0) + q_length != kv_length:
        raise PowerAttnError(
            f"powerattn decodes with transformers' DynamicCache only: queries at {q_offset}..{q_offset + q_length} "
            f"against {kv_length} keys (offset {kv_offset}) look like a static or sliding cache"
        )
    if attention_mask is None:
        return None
    mask = attention_mask.to(torch.bool)
    if mask.dim() != 2 or mask.shape != (batch_size, kv_length):
        raise PowerAttnError(f"powerattn: want a [batch, keys] = [{batch_size}, {kv_length}] padding mask, "
                             f"got shape {tuple(mask.shape)}")
    if bool(mask.all()):
        return None
    idx = torch.arange(kv_length, device=mask.device)
    count = mask.sum(-1)
    starts = torch.where(mask, idx, kv_length).amin(-1)
    ends = torch.where(mask, idx + 1, 0).amax(-1)
    holes = (count != ends - starts) & (count > 0)
    if bool(holes.any()):
        row = int(holes.nonzero()[0])
        raise PowerAttnError(
            f"powerattn: attention_mask row {row} has padding between real tokens "
            f"({mask[row].int().tolist()}); only left or right padding can run the pattern"
        )
    starts = torch.where(count > 0, starts, 0)
    return Padding(tuple(starts.tolist()), tuple(ends.tolist()), kv_length)


# ---- the attention function -------------------------------------------------------------------------

_packing: tuple[weakref.ref | None, Tensor | None] = (None, None)


def _documents(position_ids: Tensor | None, batch: int, length: int) -> Tensor | None:
    """cu_seqlens of packed documents when position_ids restart inside the row, else None (one sync a forward)."""
    global _packing
    if position_ids is None or length < 2:
        return None
    ref, cu = _packing
    if ref is not None and ref() is position_ids:  # same forward, later layer
        return cu
    pos = position_ids.expand(batch, length)
    restart = pos[:, 1:] != pos[:, :-1] + 1
    cu = None
    if bool(restart.any()):
        if batch != 1:
            raise PowerAttnError("powerattn: position_ids restart inside a row (packed documents); use batch 1")
        starts = (restart[0].nonzero().flatten() + 1).tolist()
        cu = torch.tensor([0, *starts, length], dtype=torch.int32, device=position_ids.device)
    _packing = (weakref.ref(position_ids), cu)
    return cu


def _attend(q: Tensor, k: Tensor, v: Tensor, pattern: Pattern, scale: float, cu: Tensor | None = None) -> Tensor:
    """q [b, c, h, d] are the last c positions of k, v [b, n, kv_heads, d] (pattern block 0 at key 0)."""
    if q.shape[1] == k.shape[1]:
        return sparse_attention(q, k, v, pattern, cu_seqlens=cu, scale=scale)
    lengths = torch.full((q.shape[0],), k.shape[1], dtype=torch.int32, device=q.device)
    return decode_attention(q, k, v, pattern, lengths, scale=scale)


def _attend_padded(q: Tensor, k: Tensor, v: Tensor, pattern: Pattern, scale: float, pad: Padding) -> Tensor:
    """Rows attend over their own real tokens only; queries at padding positions return zeros."""
    out = q.new_zeros(q.shape)
    first = k.shape[1] - q.shape[1]  # key position of query 0
    spans: dict[tuple[int, int], list[int]] = {}
    for row, span in enumerate(zip(pad.starts, pad.ends)):
        spans.setdefault(span, []).append(row)
    for (start, end), rows in spans.items():
        q_start = max(start, first)
        if q_start >= end:  # every query of these rows is padding
            continue
        idx = torch.tensor(rows, device=q.device)
        y = _attend(q[idx, q_start - first:end - first], k[idx, start:end], v[idx, start:end], pattern, scale)
        out[idx, q_start - first:end - first] = y
    return out


def attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                      attention_mask: Padding | None, scaling: float | None = None, dropout: float = 0.0,
                      **kwargs) -> tuple[Tensor, None]:
    """transformers attention function: q [b, h, c, d], k, v [b, kv_heads, n, d] -> ([b, c, h, d], None)."""
    if dropout:
        raise PowerAttnError(f"powerattn: attention dropout {dropout} is not supported (set attention_dropout=0)")
    if kwargs.get("sliding_window") is not None:
        _refuse_sliding_window(kwargs["sliding_window"])
    if attention_mask is not None and not isinstance(attention_mask, Padding):
        raise PowerAttnError(
            f"powerattn cannot honour a custom {type(attention_mask).__name__} attention mask of shape "
            f"{tuple(getattr(attention_mask, 'shape', ()))}: pass a 2-D padding mask (left or right padding)"
        )
    pattern = layer_patterns(module.config)[module.layer_idx]
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    if q.shape[1] > k.shape[1]:
        raise PowerAttnError(f"powerattn: {q.shape[1]} queries but only {k.shape[1]} keys")
    scale = module.head_dim ** -0.5 if scaling is None else scaling
    if attention_mask is None:
        cu = _documents(kwargs.get("position_ids"), q.shape[0], q.shape[1]) if q.shape[1] == k.shape[1] else None
        return _attend(q, k, v, pattern, scale, cu), None
    if attention_mask.kv_length != k.shape[1]:
        raise PowerAttnError(f"powerattn: padding mask covers {attention_mask.kv_length} keys, the cache holds "
                             f"{k.shape[1]}")
    return _attend_padded(q, k, v, pattern, scale, attention_mask), None


def register() -> None:
    """Register "powerattn" with transformers (done on import; calling again is harmless)."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as e:
        raise ImportError(
            "powerattn.hf needs transformers >= 4.53 (AttentionInterface and AttentionMaskInterface)"
        ) from e
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, padding_mask)


register()
