"""Triton kernels for block-sparse attention (GPU; CPU through TRITON_INTERPRET=1 for tests)."""

from __future__ import annotations

import torch

from powerattn.patterns import Pattern


def triton_supports(q: torch.Tensor, pattern: Pattern) -> bool:
    """Whether the Triton backend handles these inputs (the dispatcher falls back to flex if not)."""
    return False


def triton_attention(*args, **kwargs):
    raise NotImplementedError("the Triton backend is not built yet")
