"""Key/value cache for generation: per-layer buffers and per-row lengths (rows may differ)."""

from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    """k/v buffers [batch, max_len, kv_heads, head_dim] per layer; `lengths` tokens cached per row.

    A model forward writes every layer's new keys at each row's current length, then `advance`s.
    Keys are stored after RoPE, so decoding never re-rotates the cache.
    """

    def __init__(self, num_layers: int, batch: int, max_len: int):
        # Buffers are allocated at a layer's first write, with the dtype/device its keys come in.
        self.k: list[Tensor | None] = [None] * num_layers
        self.v: list[Tensor | None] = [None] * num_layers
        self.lengths = [0] * batch  # host copy: no device sync to know where to write
        self.max_len = max_len

    @property
    def empty(self) -> bool:
        return not any(self.lengths)

    def positions(self, new: int, device: torch.device | str) -> Tensor:
        """Position ids [batch, new] of `new` tokens appended to every row."""
        start = torch.tensor(self.lengths, device=device)
        return start[:, None] + torch.arange(new, device=device)[None, :]

    def seqlens_after(self, new: int, device: torch.device | str) -> Tensor:
        """int32 [batch]: each row's length once `new` tokens are appended (what decode_attention wants)."""
        return torch.tensor([n + new for n in self.lengths], dtype=torch.int32, device=device)

    def check_room(self, new: list[int]) -> None:
        over = [i for i, (n, m) in enumerate(zip(self.lengths, new)) if n + m > self.max_len]
        if over:
            raise ValueError(f"KVCache: rows {over} would exceed max_len={self.max_len}")

    def write(self, layer: int, k: Tensor, v: Tensor,
              cu_seqlens: list[int] | None = None) -> tuple[Tensor, Tensor]:
        """Store new keys/values of `layer`; returns the layer's full (k, v) buffers.

        k, v: [batch, new, kv_heads, head_dim] appended to every row, or with cu_seqlens (host list)
        [1, total, ...] packed documents, document i going to row i (a prefill of ragged prompts).
        """
        if self.k[layer] is None:
            shape = (len(self.lengths), self.max_len, *k.shape[2:])
            self.k[layer] = k.new_zeros(shape)
            self.v[layer] = v.new_zeros(shape)
        kc, vc = self.k[layer], self.v[layer]
        if cu_seqlens is not None:
            for i, (a, b) in enumerate(zip(cu_seqlens[:-1], cu_seqlens[1:])):
                n = self.lengths[i]
                kc[i, n:n + b - a] = k[0, a:b]
                vc[i, n:n + b - a] = v[0, a:b]
            return kc, vc
        if len(set(self.lengths)) == 1:  # common case: one slice for the whole batch
            n = self.lengths[0]
            kc[:, n:n + k.shape[1]] = k
            vc[:, n:n + k.shape[1]] = v
            return kc, vc
        rows = torch.arange(k.shape[0], device=k.device)[:, None]
        idx = self.positions(k.shape[1], k.device)
        kc[rows, idx] = k
        vc[rows, idx] = v
        return kc, vc

    def advance(self, new: list[int]) -> None:
        """Record that row i gained new[i] tokens (after all layers wrote them)."""
        self.lengths = [n + m for n, m in zip(self.lengths, new)]
