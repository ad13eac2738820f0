"""The sparse structure the kernels read, built on the host once and cached per device.

Index tables come from `Pattern.tables` (the pattern's own rule) at a length rounded up to a
power of two of blocks: rows do not depend on length, so one table serves every shorter batch.
The dK/dV kernel also reads a schedule of work items derived from the transposed table.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from powerattn.patterns import BlockTables, Pattern

# A key column longer than this many times the mean column is cut into pieces (heavy_first_schedule).
HEAVY_COLUMN_FACTOR = 4.0

_TABLES: dict[tuple, BlockTables] = {}


def table_length(n: int, block_size: int) -> int:
    """`n` rounded up to a power of two of blocks: the length whose tables serve every length <= n."""
    blocks = -(-n // block_size)
    return block_size * (1 << max(0, blocks - 1).bit_length())


def device_tables(pattern: Pattern, max_seqlen: int, tile_m: int, tile_n: int, device: torch.device) -> BlockTables:
    """The pattern's tables for any length <= max_seqlen, resident on `device` (cached)."""
    n = table_length(max_seqlen, pattern.block_size)
    key = (pattern, n, tile_m, tile_n, str(device))
    if key not in _TABLES:
        _TABLES[key] = pattern.tables(n, tile_m, tile_n).to(device)
    return _TABLES[key]


class DkdvSchedule(NamedTuple):
    """The dK/dV kernel's work items: pieces of heavy key columns first, then whole columns."""

    # int32 [n_items, 4]: (key tile, first, last, with_diagonal): the program walks the column's full
    # query tiles q_idx[first:last], and its diagonal ones too where with_diagonal is 1.
    items: torch.Tensor
    n_pieces: int  # the first n_pieces items are pieces of split columns
    split_tiles: torch.Tensor  # int32 [n_split]: the split key tiles
    split_ptr: torch.Tensor  # int32 [n_split + 1]: split tile i's pieces are items split_ptr[i]:split_ptr[i + 1]
    piece_split: torch.Tensor  # int32 [n_pieces]: which split tile each piece belongs to
    need: torch.Tensor  # int32 [n_pieces]: the shortest sequence in which a piece has work
    bound_need: tuple[int, ...]  # per piece: the shortest sequence in which it needs a workspace slot

    def slots(self, seqlens: torch.Tensor, total_tokens: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Workspace slots for sequences of lengths `seqlens` (device, int32), without a host sync.

        Returns (slots [n_pieces, n_seq]: a slot >= 0, -2 where the piece alone covers its column in
        that sequence and writes dK/dV directly, -1 where it has no work; cut [n_split, n_seq]: whether
        the reduce sums that column; capacity). A piece takes a slot only where its column has work in
        several pieces, so short packed documents cost no workspace; `capacity` bounds the slots for
        any lengths adding up to `total_tokens` (at most total // x sequences are >= x long).
        """
        has = seqlens[None, :] >= self.need[:, None]
        per_split = torch.zeros((self.split_tiles.numel(), seqlens.numel()), dtype=torch.int32, device=has.device)
        per_split.index_add_(0, self.piece_split, has.int())
        cut = per_split >= 2
        use = has & cut[self.piece_split]
        order = torch.cumsum(use.flatten().int(), 0).view_as(use) - 1
        slots = torch.where(use, order, torch.where(has, -2, -1)).int()
        capacity = sum(min(seqlens.numel(), total_tokens // n) for n in self.bound_need)
        return slots, cut.int(), capacity


def heavy_first_schedule(tables: BlockTables, tile_m: int, tile_n: int,
                         factor: float = HEAVY_COLUMN_FACTOR) -> DkdvSchedule:
    """Cut every key column longer than ceil(`factor` x the mean) into near-equal pieces no longer than that.

    The sink block's column holds every query tile: uncut, its program runs ~35x longer than an
    ordinary one at 128K and, with few KV heads to hide behind, ends the kernel alone. Pieces go
    first (longest column first), then whole columns in tile order. Pieces split the column's full
    tiles in query order, the first piece also taking the few diagonal ones (the nearest queries),
    so a document reaches a prefix of the pieces and one shorter than the first piece needs no cut.
    """
    if factor < 1:
        raise ValueError(f"heavy_first_schedule: factor must be >= 1 (some columns stay whole), got {factor}")
    q_ptr, q_idx, q_full = (t.cpu().long() for t in (tables.q_ptr, tables.q_idx, tables.q_full))
    lens = q_ptr[1:] - q_ptr[:-1]
    cap = max(1, math.ceil(factor * lens.float().mean().item()))
    n_cut = [min(-(-int(n) // cap), int(f)) for n, f in zip(lens, q_full)]  # pieces; full tiles to cut
    heavy = [t for t in torch.argsort(lens, descending=True, stable=True).tolist() if n_cut[t] >= 2]
    pieces, split_ptr, piece_split, need, bound_need = [], [0], [], [], []
    for i, t in enumerate(heavy):
        lo, n, f = int(q_ptr[t]), n_cut[t], int(q_full[t])
        cuts = [lo + f * j // n for j in range(n + 1)]
        pieces += [(t, a, b, int(j == 0)) for j, (a, b) in enumerate(zip(cuts, cuts[1:]))]
        # A piece has work in a sequence holding its nearest query tile (the first: the key tile's own).
        needs = [t * tile_n + 1] + [int(q_idx[a]) * tile_m + 1 for a in cuts[1:-1]]
        piece_split += [i] * n
        need += needs
        bound_need += [max(x, needs[1]) for x in needs]  # a slot only where >= 2 pieces have work
        split_ptr.append(len(pieces))
    cut = set(heavy)
    whole = [(t, int(q_ptr[t]), int(q_ptr[t] + q_full[t]), 1) for t in range(lens.numel()) if t not in cut]
    as_int32 = lambda x: torch.tensor(x, dtype=torch.int32, device=tables.q_ptr.device)
    return DkdvSchedule(as_int32(pieces + whole).reshape(-1, 4), len(pieces), as_int32(heavy), as_int32(split_ptr),
                        as_int32(piece_split), as_int32(need), tuple(bound_need))


_SCHEDULES: dict[tuple, DkdvSchedule] = {}


def dkdv_schedule(pattern: Pattern, max_seqlen: int, tile_m: int, tile_n: int, device: torch.device) -> DkdvSchedule:
    """The dK/dV kernel's work items for any length <= max_seqlen, on `device` (cached)."""
    factor = HEAVY_COLUMN_FACTOR
    key = (pattern, table_length(max_seqlen, pattern.block_size), tile_m, tile_n, str(device), factor)
    if key not in _SCHEDULES:
        tables = device_tables(pattern, max_seqlen, tile_m, tile_n, device)
        _SCHEDULES[key] = heavy_first_schedule(tables, tile_m, tile_n, factor)
    return _SCHEDULES[key]
