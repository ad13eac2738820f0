"""The dtype names configs, CLIs and config.json files use, and the torch dtypes they mean."""

from __future__ import annotations

import torch

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def to_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A torch dtype from itself or a name ("bf16", "bfloat16", "torch.bfloat16", ...); ValueError otherwise."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}")
    return DTYPES[name]
