"""DeepSpeed ZeRO-3 helpers: detect partitioned parameters, gather a few at a time, write a rank's slice.

DeepSpeed is imported only when a ZeRO-3 parameter is actually present.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn


def is_zero3(param: Tensor) -> bool:
    """True for a parameter partitioned by deepspeed.zero.Init."""
    return hasattr(param, "ds_id")


def full_shape(param: Tensor) -> torch.Size:
    """The parameter's logical shape (a ZeRO-3 parameter's own .shape is empty when partitioned)."""
    return param.ds_shape if is_zero3(param) else param.shape


def rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def _as_dict(ds_config: dict | str) -> dict:
    if isinstance(ds_config, str):
        import json

        with open(ds_config) as f:
            return json.load(f)
    return ds_config


def zero3_enabled(ds_config: dict | str | None) -> bool:
    """Whether a DeepSpeed config (dict or JSON path) asks for ZeRO stage 3."""
    if ds_config is None:
        return False
    return int((_as_dict(ds_config).get("zero_optimization") or {}).get("stage", 0)) == 3


def init_context(ds_config: dict | str, dtype: torch.dtype):
    """deepspeed.zero.Init creating parameters of `dtype`, partitioned as `ds_config` says."""
    import deepspeed

    cfg = _as_dict(ds_config)
    implied = torch.bfloat16 if (cfg.get("bf16") or {}).get("enabled") else (
        torch.float16 if (cfg.get("fp16") or {}).get("enabled") else torch.float32)
    # Pass dtype only when the config implies another one: deepspeed 0.19 ignores an explicit
    # dtype on accelerators without fp16 support (CPU) and picks bfloat16.
    return deepspeed.zero.Init(config_dict_or_path=ds_config, dtype=None if implied == dtype else dtype)


@contextlib.contextmanager
def gathered(params: Sequence[nn.Parameter], modifier_rank: int | None = None) -> Iterator[None]:
    """Full parameters inside the block (a no-op for ordinary ones); modifier_rank's edits are kept."""
    params = [p for p in params if is_zero3(p)]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
        yield


def local_range(param: nn.Parameter) -> tuple[int, int] | None:
    """(start, count) of the flattened elements this rank's partition holds, or None when the
    parameter must be written through a gather (offloaded to NVMe, or currently gathered).

    ZeRO-3 flattens a parameter, pads it to a multiple of the partition world size and gives rank r
    elements [r * n, (r + 1) * n); the padding is never read.
    """
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    part = param.ds_tensor
    if part.final_location is not None or param.ds_status != ZeroParamStatus.NOT_AVAILABLE:
        return None
    n = part.ds_numel
    start = n * param.ds_zero_partition_rank
    return start, max(0, min(n, param.ds_numel - start))


def write_partition(param: nn.Parameter, values: Tensor) -> None:
    """Fill this rank's partition with `values`: its local_range elements, no communication."""
    part = param.ds_tensor
    with torch.no_grad():
        part[:values.numel()].copy_(values.reshape(-1))
        part[values.numel():].zero_()


def write_gathered(param: nn.Parameter, full: Tensor) -> None:
    """Set a ZeRO-3 parameter from the full tensor through GatheredParameters (rank 0's copy wins)."""
    with gathered([param], modifier_rank=0), torch.no_grad():
        if rank() == 0:
            param.data.copy_(full.reshape(param.shape))


@contextlib.contextmanager
def edited_on_rank0(params: Sequence[nn.Parameter]) -> Iterator[bool]:
    """Full parameters inside the block; yields whether this rank should write them (rank 0's edits are
    kept under ZeRO-3, every rank writes ordinary parameters)."""
    with gathered(params, modifier_rank=0):
        yield not any(is_zero3(p) for p in params) or rank() == 0
