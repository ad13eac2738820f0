"""Next-token targets: the one place labels are shifted, documents cut and IGNORE_INDEX defined.

Labels are HF-style: aligned with input_ids (labels[t] is the token AT position t). Position t is
trained to predict labels[t + 1]; IGNORE_INDEX (-100) is skipped. No target crosses a document
boundary: the last token of each packed document has none.
"""

from __future__ import annotations

import torch
from torch import Tensor

IGNORE_INDEX = -100


def next_token_targets(
    labels: Tensor, cu_seqlens: Tensor | None = None, position_ids: Tensor | None = None
) -> Tensor:
    """targets[b, t] = labels[b, t + 1], IGNORE_INDEX at the end and where t + 1 starts a new document.

    Document starts come from cu_seqlens (batch 1) or, without it, from position_ids that do not
    continue by +1 (a restart at 0 for each packed document).
    """
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    if cu_seqlens is not None:
        starts = cu_seqlens[1:-1].to(device=labels.device, dtype=torch.long)
        targets[0, (starts - 1).clamp(min=0)] = IGNORE_INDEX  # empty documents give start 0: harmless
    elif position_ids is not None:
        targets[:, :-1] = targets[:, :-1].masked_fill(restarts(position_ids.to(labels.device).expand_as(labels)),
                                                      IGNORE_INDEX)
    return targets


def restarts(position_ids: Tensor) -> Tensor:
    """bool [b, s - 1]: True where position t + 1 does not continue position t by +1 (a document starts)."""
    return position_ids[:, 1:] != position_ids[:, :-1] + 1


def count_targets(targets: Tensor) -> int:
    """How many targets are scored (not IGNORE_INDEX); a host int (a sync when targets are on a GPU)."""
    return int((targets != IGNORE_INDEX).sum())
