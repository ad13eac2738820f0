"""Packed batches: documents laid back to back in fixed-length rows, with document boundaries.

Batch format (what the loader yields; all tensors on CPU):
- `input_ids`    int64 [B, S]
- `labels`       int64 [B, S], aligned with input_ids (HF convention: the model shifts inside its
  loss, logits[t] is scored against labels[t + 1]). labels[t] = -100 where token t starts a
  segment (a document, or the continuation of a long document at a row's first position) and on
  padding: the only target that would cross a document boundary is "first token of document B
  given document A's last token", and that is exactly the target masked. Every document ends in
  EOS, which is learned.
- `position_ids` int64 [B, S]: restart at 0 at every segment when reset_position_ids, else arange(S).
- `cu_seqlens`   int32 [num_segments + 1]: segment boundaries over the B rows flattened into one
  sequence of B*S tokens; row edges are always boundaries. So `flatten_batch(batch)` ([1, B*S]) goes
  straight into `powerattn.sparse_attention` / `model(**batch)`, which take batch 1 when packed.
- `max_seqlen`   int: the longest segment (spares the Triton backend a device sync).
A document longer than what is left of a row continues, in order, at the start of the next row
drawn from the same source (possibly a later step or another rank); the continuation is a new
segment (positions restart; it cannot attend to the part in the earlier row).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from powerattn.data.store import TokenStore
from powerattn.targets import IGNORE_INDEX


def collate(
    rows: list[list[np.ndarray]], seq_len: int, pad_id: int, reset_position_ids: bool = True,
) -> dict:
    """Build a packed batch from rows given as lists of document pieces (short rows are padded)."""
    ids = np.full((len(rows), seq_len), pad_id, dtype=np.int64)
    labels = np.full((len(rows), seq_len), IGNORE_INDEX, dtype=np.int64)
    pos = np.zeros((len(rows), seq_len), dtype=np.int64)
    seg_lens: list[int] = []
    for b, pieces in enumerate(rows):
        t = 0
        for p in pieces:
            n = len(p)
            if n == 0:
                continue
            if t + n > seq_len:
                raise ValueError(f"collate: row {b} holds more than seq_len={seq_len} tokens")
            ids[b, t : t + n] = p
            labels[b, t + 1 : t + n] = ids[b, t + 1 : t + n]
            pos[b, t : t + n] = np.arange(n)
            seg_lens.append(n)
            t += n
        if t < seq_len:  # padding is one more segment: it attends only to itself
            pos[b, t:] = np.arange(seq_len - t)
            seg_lens.append(seq_len - t)
    if not reset_position_ids:
        pos[:] = np.arange(seq_len)
    cu = np.zeros(len(seg_lens) + 1, dtype=np.int32)
    np.cumsum(seg_lens, out=cu[1:])
    return {
        "input_ids": torch.from_numpy(ids),
        "labels": torch.from_numpy(labels),
        "position_ids": torch.from_numpy(pos),
        "cu_seqlens": torch.from_numpy(cu),
        "max_seqlen": int(max(seg_lens)),
    }


def flatten_batch(batch: dict) -> dict:
    """The batch as one packed row [1, B*S] (what sparse_attention and the model take with cu_seqlens)."""
    out = dict(batch)
    for key in ("input_ids", "labels", "position_ids"):
        out[key] = batch[key].reshape(1, -1)
    return out


class DocStream:
    """The documents of a store in a given order, concatenated, and addressable by token offset."""

    def __init__(self, tokens: np.ndarray, doc_offsets: np.ndarray, order: np.ndarray):
        self.tokens, self.starts, self.order = tokens, doc_offsets[:-1], order
        lengths = np.diff(doc_offsets)[order]
        self.ends = np.cumsum(lengths)
        self.total = int(self.ends[-1]) if len(order) else 0

    def pieces(self, start: int, n: int) -> list[np.ndarray]:
        """Document pieces covering stream tokens [start, min(start + n, total)), in order."""
        out: list[np.ndarray] = []
        stop = min(start + n, self.total)
        j = int(np.searchsorted(self.ends, start, side="right"))
        while start < stop:
            doc_end = int(self.ends[j])
            doc_begin = int(self.ends[j - 1]) if j else 0
            base = int(self.starts[self.order[j]])
            take_to = min(doc_end, stop)
            out.append(self.tokens[base + start - doc_begin : base + take_to - doc_begin])
            start = take_to
            j += 1
        return out


def iter_packed(
    store: TokenStore, seq_len: int, batch_size: int, pad_id: int, reset_position_ids: bool = True,
) -> Iterator[dict]:
    """One pass over a store in document order as packed batches (eval, perplexity).

    Every token appears exactly once; the last row is padded and the last batch may be smaller.
    """
    stream = DocStream(store.tokens, store.doc_offsets, np.arange(store.num_docs))
    for first in range(0, stream.total, seq_len * batch_size):
        last = min(first + seq_len * batch_size, stream.total)
        rows = [stream.pieces(s, seq_len) for s in range(first, last, seq_len)]
        yield collate(rows, seq_len, pad_id, reset_position_ids)
