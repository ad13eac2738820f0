"""A loader batch as one rank's model input: `MicroBatch`, typed, whatever the process layout.

Targets are made once, on the host, from the whole rows (`next_token_targets`), then the rows are either
flattened into one packed row (no sequence parallelism) or sliced: each rank of a Ulysses group takes a
contiguous 1/sp of every row, its targets already shifted, so no rank needs its neighbour's first label.
cu_seqlens stay global (the attention core sees full rows) and on the host too, so neither the model nor
the backends need a device sync to read them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from powerattn.model.context import Documents
from powerattn.targets import count_targets, next_token_targets


@dataclass
class MicroBatch:
    """This rank's tokens of one micro-batch, with their next-token targets and document layout."""

    input_ids: Tensor     # [1, B*S] (rows flattened), or [B, S/sp] (this rank's slice of every row)
    targets: Tensor       # next-token targets of those tokens (IGNORE_INDEX where nothing is scored)
    documents: Documents  # positions of those tokens; boundaries and lengths of the full rows
    num_targets: int      # scored targets among this rank's tokens

    def to(self, device: torch.device) -> MicroBatch:
        docs = self.documents
        moved = replace(docs, position_ids=docs.position_ids.to(device, non_blocking=True),
                        cu_seqlens=docs.cu_seqlens.to(device=device, dtype=torch.int32, non_blocking=True))
        return MicroBatch(self.input_ids.to(device, non_blocking=True), self.targets.to(device, non_blocking=True),
                          moved, self.num_targets)


def make_microbatch(batch: dict, sp_rank: int = 0, sp_size: int = 1) -> MicroBatch:
    """A loader batch (powerattn/data/packing.py format) as the host-side input of sequence-parallel rank sp_rank."""
    b, s = batch["input_ids"].shape
    if sp_size < 1 or not 0 <= sp_rank < sp_size:
        raise ValueError(f"make_microbatch: bad sp_rank={sp_rank} / sp_size={sp_size}")
    if s % sp_size:
        raise ValueError(f"make_microbatch: seq_len {s} is not divisible by sp_size {sp_size}")
    cu = batch["cu_seqlens"]
    targets = next_token_targets(batch["labels"].reshape(1, -1), cu).view(b, s)
    ids, positions = batch["input_ids"], batch["position_ids"]
    if sp_size == 1:
        ids, targets, positions = ids.reshape(1, -1), targets.reshape(1, -1), positions.reshape(1, -1)
    else:
        lo, hi = sp_rank * (s // sp_size), (sp_rank + 1) * (s // sp_size)
        ids, targets, positions = ids[:, lo:hi], targets[:, lo:hi], positions[:, lo:hi]
    # max_position of the whole rows: every rank must build the same RoPE table (dynamic NTK included).
    docs = Documents(positions, cu, cu.tolist(), int(batch["max_seqlen"]), int(batch["position_ids"].max()) + 1)
    return MicroBatch(ids, targets, docs, count_targets(targets))
