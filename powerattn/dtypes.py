"""The dtype names configs, CLIs and config.json files use, and the torch dtypes they mean."""

from __future__ import annotations

import torch

from powerattn.choices import DTYPE_NAMES

DTYPES = {name: getattr(torch, attr) for name, attr in DTYPE_NAMES.items()}


def to_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A torch dtype from itself or a name ("bf16", "bfloat16", "torch.bfloat16", ...); ValueError otherwise."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}")
    return DTYPES[name]
