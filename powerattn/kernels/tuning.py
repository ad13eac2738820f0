"""Launch configurations: candidates per kernel, timed once per device/shape bucket and cached on disk.

Tiles must divide the pattern block (so a tile pair is either wholly allowed or not), which is why
this is a small tuner of our own rather than `triton.autotune`: each candidate needs its own tables.
Set POWERATTN_AUTOTUNE=0 to take the first candidate without timing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
import triton

from powerattn.atomic import atomic_write
from powerattn.kernels.common import INTERPRETER_TILE, interpreting
from powerattn.patterns import Pattern

# (BLOCK_M, BLOCK_N, num_warps, num_stages). Ordered so the first fitting entry (the untuned default)
# is one that compiles without register spills for sm_90 (checked with ptxas -v on Triton's PTX);
# see docs/kernels.md.
CANDIDATES: dict[str, dict[int, list[tuple[int, int, int, int]]]] = {
    "fwd": {
        64: [(128, 128, 8, 3), (128, 64, 8, 4), (128, 64, 4, 3), (64, 64, 4, 4)],
        128: [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 8, 4), (64, 64, 4, 3)],
        256: [(64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 2)],
    },
    # dK/dV: BLOCK_M is the query tile walked, BLOCK_N the key tile owned.
    "dkdv": {
        64: [(64, 128, 8, 3), (64, 64, 4, 3), (128, 128, 8, 2), (32, 128, 8, 3)],
        128: [(64, 64, 8, 2), (32, 64, 8, 3), (64, 128, 8, 2), (32, 128, 8, 3), (64, 64, 8, 3)],
        256: [(32, 64, 8, 2), (32, 32, 4, 2), (64, 64, 8, 2)],
    },
    "dq": {
        64: [(128, 64, 8, 3), (64, 64, 4, 3), (128, 128, 8, 2), (128, 64, 8, 4)],
        128: [(128, 64, 8, 3), (64, 64, 4, 3), (128, 64, 8, 4), (128, 32, 4, 3)],
        256: [(64, 32, 4, 2), (64, 64, 8, 2), (32, 32, 4, 2)],
    },
}

_memory: dict[str, dict] = {}


def _cache_path() -> Path:
    root = os.environ.get("POWERATTN_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "powerattn"))
    return Path(root) / "autotune.json"


def _load_disk() -> dict:
    try:
        return json.loads(_cache_path().read_text())
    except (OSError, ValueError):
        return {}


def _save_disk(entries: dict) -> None:
    path = _cache_path()
    try:
        atomic_write(path, json.dumps(entries, indent=1, sort_keys=True))
    except OSError:
        pass  # a read-only home only costs a re-tune next process


def candidates(kind: str, head_dim: int, block_size: int) -> list[dict]:
    """Configs for this kernel whose tiles divide the pattern block."""
    table = CANDIDATES[kind]
    options = table[min(table, key=lambda d: (d < head_dim, abs(d - head_dim)))]
    cap = block_size & -block_size  # largest power of two dividing block_size
    fits = [c for c in options if cap % c[0] == 0 and cap % c[1] == 0]
    if not fits:
        t = min(cap, 64)
        fits = [(t, t, 4, 2)]
    return [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s) for m, n, w, s in fits]


def pick_config(kind: str, q: torch.Tensor, k: torch.Tensor, pattern: Pattern, max_seqlen: int,
                run: Callable[[dict], object]) -> dict:
    """The cached best config for this kernel and shape bucket, timing the candidates on first use."""
    if interpreting():
        t = min(INTERPRETER_TILE, pattern.block_size & -pattern.block_size)
        return dict(BLOCK_M=t, BLOCK_N=t)
    options = candidates(kind, q.shape[-1], pattern.block_size)
    if os.environ.get("POWERATTN_AUTOTUNE", "1") == "0" or len(options) == 1:
        return options[0]
    bucket = 1 << max(0, max_seqlen - 1).bit_length()
    key = "|".join(map(str, (
        kind, torch.cuda.get_device_name(q.device), q.dtype, q.shape[-1], q.shape[2] // k.shape[2],
        pattern.block_size, bucket,
    )))
    if key not in _memory:
        disk = _load_disk()
        if key not in disk:
            disk[key] = _time_candidates(options, run)
            _save_disk(disk)
        _memory[key] = disk[key]
    return dict(_memory[key])


def _time_candidates(options: list[dict], run: Callable[[dict], object]) -> dict:
    best, best_ms = options[0], float("inf")
    for cfg in options:
        try:
            ms = triton.testing.do_bench(lambda cfg=cfg: run(cfg), warmup=5, rep=20, return_mode="median")
        except Exception:  # a config that does not fit this GPU (shared memory, registers) is skipped
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    return best
