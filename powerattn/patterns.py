"""Static block-sparse attention patterns, each defined once as a block-level rule.

Token masks, block layouts, kernel index tables, FlexAttention masks and the
receptive-field analysis are all derived from `Pattern.allowed`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, NamedTuple

if TYPE_CHECKING:
    import torch
    from torch import Tensor
# torch is imported where a mask or table is built: constructing and validating a pattern (a config
# check) needs no torch. The rules only combine the tensors they are given.

_REGISTRY: dict[str, type[Pattern]] = {}


def register(cls: type[Pattern]) -> type[Pattern]:
    """Class decorator: make a pattern available to `make_pattern` under `cls.name`."""
    if cls.name in _REGISTRY:
        raise ValueError(f"pattern name {cls.name!r} is already registered")
    _REGISTRY[cls.name] = cls
    return cls


def pattern_names() -> list[str]:
    """Names accepted by `make_pattern`."""
    return sorted(_REGISTRY)


def make_pattern(name: str, **params) -> Pattern:
    """Build a registered pattern by name, e.g. make_pattern("power", block_size=256, window=5, sink=1)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown pattern {name!r}; known patterns: {', '.join(pattern_names())}")
    cls = _REGISTRY[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - fields)
    if unknown:
        raise ValueError(
            f"pattern {name!r} got unknown parameter(s) {unknown}; it accepts {sorted(fields)}"
        )
    return cls(**params)


def pattern_from_dict(spec) -> Pattern:
    """The pattern a config mapping describes: {name, <parameters>} (a `schedule` key is not the pattern's)."""
    params = {k: v for k, v in dict(spec).items() if k not in ("name", "schedule")}
    if "name" not in spec:
        raise ValueError("missing 'name' (e.g. power, sliding_window, full)")
    return make_pattern(spec["name"], **params)


@functools.cache
def pattern_from_key(key: str) -> Pattern:
    """Inverse of `Pattern.key` (how custom ops, which take no Python objects, receive a pattern)."""
    name, _, rest = key.partition("(")
    params = dict(item.split("=", 1) for item in rest.rstrip(")").split(",") if item)
    return make_pattern(name, **{k: int(v) for k, v in params.items()})


class BlockTables(NamedTuple):
    """CSR index tables of a pattern at (tile_m x tile_n) granularity; all int32.

    Row r of the forward table lists the key tiles query tile r reads: `kv_idx[kv_ptr[r]:kv_ptr[r+1]]`,
    the first `kv_full[r]` of them entirely below the causal diagonal (no mask needed), the rest
    overlapping it (causal mask needed). The transposed table lists, for each key tile, the query
    tiles that read it, with the same full-first split. Indices ascend within each split.
    """

    kv_ptr: Tensor
    kv_idx: Tensor
    kv_full: Tensor
    q_ptr: Tensor
    q_idx: Tensor
    q_full: Tensor

    def to(self, device: torch.device | str) -> BlockTables:
        return BlockTables(*(t.to(device) for t in self))


def _check_int(owner: str, name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner}: {name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{owner}: {name} must be >= {minimum}, got {value}")


@dataclass(frozen=True)
class Pattern:
    """A causal block-sparse pattern: query block qb may read key block kb iff allowed(qb, kb).

    Subclasses define `allowed` with elementwise tensor ops only (no data-dependent control flow),
    so the same definition runs on whole index grids, inside FlexAttention's vmap, and per row.
    """

    block_size: int = 256
    name: ClassVar[str] = ""
    key: ClassVar[str]  # stable id, e.g. "power(block_size=256,window=5,sink=1)"; set per instance

    def __post_init__(self) -> None:
        params = [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)]
        for field, value in params:
            _check_int(f"pattern {self.name!r}", field, value, self._minimum(field))
        # Precomputed so traced code (torch.compile) never has to build it.
        object.__setattr__(self, "key", f"{self.name}({','.join(f'{k}={v}' for k, v in params)})")

    def _minimum(self, field: str) -> int:
        return 0 if field == "sink" else 1

    def allowed(self, qb: Tensor, kb: Tensor) -> Tensor:
        """Block-level rule for kb <= qb (causality is applied by the caller)."""
        raise NotImplementedError

    # Everything below derives from `allowed`.

    def block_rule(self, qb: Tensor, kb: Tensor) -> Tensor:
        """Causal block-level rule: True where query block qb computes against key block kb."""
        return (kb <= qb) & self.allowed(qb, kb)

    def token_rule(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        """Token-level rule on (broadcastable) position tensors, causality included."""
        bs = self.block_size
        return (k_pos <= q_pos) & self.allowed(q_pos // bs, k_pos // bs)

    def token_mask(self, seq_len: int) -> Tensor:
        """torch.bool [seq_len, seq_len]; True = query row may attend key column (causal included)."""
        _check_int("token_mask", "seq_len", seq_len, 1)
        import torch

        pos = torch.arange(seq_len)
        return self.token_rule(pos[:, None], pos[None, :])

    def block_layout(self, num_blocks: int) -> Tensor:
        """torch.bool [num_blocks, num_blocks]; True = (q_block, kv_block) is computed."""
        _check_int("block_layout", "num_blocks", num_blocks, 1)
        import torch

        b = torch.arange(num_blocks)
        return self.block_rule(b[:, None], b[None, :])

    def num_blocks(self, seq_len: int) -> int:
        """Number of (possibly partial) pattern blocks covering seq_len tokens."""
        return math.ceil(seq_len / self.block_size)

    def density(self, seq_len: int) -> float:
        """Fraction of the causal (q, k) token pairs that the pattern attends."""
        _check_int("density", "seq_len", seq_len, 1)
        import torch

        nb = self.num_blocks(seq_len)
        sizes = torch.full((nb,), self.block_size, dtype=torch.float64)
        sizes[-1] = seq_len - (nb - 1) * self.block_size
        layout = self.block_layout(nb)
        below = torch.tril(layout, diagonal=-1).to(torch.float64)
        diagonal = layout.diagonal().to(torch.float64) * sizes * (sizes + 1) / 2
        pairs = sizes @ below @ sizes + diagonal.sum()
        return float(pairs / (seq_len * (seq_len + 1) / 2))

    def attended_pairs(self, seq_len: int) -> int:
        """Number of (q, k) token pairs the pattern attends at seq_len (for FLOP counts)."""
        return round(self.density(seq_len) * seq_len * (seq_len + 1) / 2)

    def tables(self, seq_len: int, tile_m: int | None = None, tile_n: int | None = None) -> BlockTables:
        """Kernel index tables for seq_len tokens at tile granularity (tiles must divide block_size).

        Cached per (pattern, seq_len, tiles). A row depends only on its own index, so tables built
        for a length L serve every shorter length too (callers mask tiles past their end).
        """
        tile_m = tile_m or self.block_size
        tile_n = tile_n or self.block_size
        for nm, t in (("tile_m", tile_m), ("tile_n", tile_n)):
            _check_int("tables", nm, t, 1)
            if self.block_size % t:
                raise ValueError(f"tables: {nm}={t} must divide block_size={self.block_size}")
        _check_int("tables", "seq_len", seq_len, 1)
        return _build_tables(self, seq_len, tile_m, tile_n)


def _csr(rows: Tensor, cols: Tensor, full: Tensor, n_rows: int) -> tuple[Tensor, Tensor, Tensor]:
    """Sort (row, col) pairs into CSR with each row's full entries first, ascending within each part."""
    import torch

    span = int(cols.max()) + 1 if cols.numel() else 1
    order = torch.argsort(rows.long() * (2 * span) + (~full).long() * span + cols.long())
    rows, cols, full = rows[order], cols[order], full[order]
    counts = torch.bincount(rows, minlength=n_rows)
    ptr = torch.zeros(n_rows + 1, dtype=torch.int64)
    ptr[1:] = torch.cumsum(counts, 0)
    n_full = torch.bincount(rows[full], minlength=n_rows)
    return ptr.int(), cols.int(), n_full.int()


@functools.lru_cache(maxsize=64)
def _build_tables(pattern: Pattern, seq_len: int, tile_m: int, tile_n: int) -> BlockTables:
    import torch

    bs = pattern.block_size
    nb = pattern.num_blocks(seq_len)
    # Block pairs row-chunk by row-chunk, so memory stays O(nb * chunk) at any length.
    qbs, kbs = [], []
    chunk = max(1, (1 << 22) // nb)
    kb_all = torch.arange(nb)
    for start in range(0, nb, chunk):
        qb = torch.arange(start, min(nb, start + chunk))
        q, k = torch.nonzero(pattern.block_rule(qb[:, None], kb_all[None, :]), as_tuple=True)
        qbs.append(q + start)
        kbs.append(k)
    qb, kb = torch.cat(qbs), torch.cat(kbs)
    # Expand every block pair into its (bs/tile_m) x (bs/tile_n) tile pairs.
    r, c = bs // tile_m, bs // tile_n
    qt = (qb[:, None, None] * r + torch.arange(r)[None, :, None]).expand(-1, r, c).reshape(-1)
    kt = (kb[:, None, None] * c + torch.arange(c)[None, None, :]).expand(-1, r, c).reshape(-1)
    n_qt, n_kt = math.ceil(seq_len / tile_m), math.ceil(seq_len / tile_n)
    q_first, q_last = qt * tile_m, qt * tile_m + tile_m - 1
    k_first, k_last = kt * tile_n, kt * tile_n + tile_n - 1
    keep = (qt < n_qt) & (kt < n_kt) & (k_first <= q_last)
    qt, kt, full = qt[keep], kt[keep], (k_last <= q_first)[keep]
    kv_ptr, kv_idx, kv_full = _csr(qt, kt, full, n_qt)
    q_ptr, q_idx, q_full = _csr(kt, qt, full, n_kt)
    return BlockTables(kv_ptr, kv_idx, kv_full, q_ptr, q_idx, q_full)


@register
@dataclass(frozen=True)
class Power(Pattern):
    """PowerAttention: local window, sink blocks, and every power-of-2 block distance."""

    window: int = 5
    sink: int = 1
    name: ClassVar[str] = "power"

    def allowed(self, qb: Tensor, kb: Tensor) -> Tensor:
        d = qb - kb
        return (d < self.window) | ((d & (d - 1)) == 0) | (kb < self.sink)


@register
@dataclass(frozen=True)
class SlidingWindow(Pattern):
    """Local window of `window` blocks plus `sink` leading blocks."""

    window: int = 9
    sink: int = 1
    name: ClassVar[str] = "sliding_window"

    def allowed(self, qb: Tensor, kb: Tensor) -> Tensor:
        return ((qb - kb) < self.window) | (kb < self.sink)


@register
@dataclass(frozen=True)
class StrideSlash(Pattern):
    """Local window, sink blocks, and every block distance that is a multiple of `stride`."""

    window: int = 6
    sink: int = 1
    stride: int = 32
    name: ClassVar[str] = "stride_slash"

    def allowed(self, qb: Tensor, kb: Tensor) -> Tensor:
        d = qb - kb
        return (d < self.window) | (d % self.stride == 0) | (kb < self.sink)


@register
@dataclass(frozen=True)
class Dilated(Pattern):
    """Dilated window: even block distances below `window` only."""

    window: int = 20
    name: ClassVar[str] = "dilated"

    def allowed(self, qb: Tensor, kb: Tensor) -> Tensor:
        d = qb - kb
        return (d % 2 == 0) & (d < self.window)


@register
@dataclass(frozen=True)
class LongNet(Pattern):
    """LongNet: at level i, aligned segments of segment*2^i blocks, dilated by 2^i."""

    segment: int = 8
    levels: int = 5
    name: ClassVar[str] = "longnet"

    def allowed(self, qb: Tensor, kb: Tensor) -> Tensor:
        levels = [(qb // (self.segment << i) == kb // (self.segment << i)) & (qb % (1 << i) == 0)
                  & (kb % (1 << i) == 0) for i in range(self.levels)]
        return functools.reduce(operator.or_, levels)


@register
@dataclass(frozen=True)
class Full(Pattern):
    """Dense causal attention."""

    name: ClassVar[str] = "full"

    def allowed(self, qb: Tensor, kb: Tensor) -> Tensor:
        d = qb - kb
        return d == d  # True in the broadcast shape (integer positions: no NaN)
