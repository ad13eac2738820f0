"""`PackedLoader`: an endless, deterministic, resumable stream of packed batches over a source mixture.

How the stream is defined (independent of process layout, so it survives resumes and re-sharding):
- Global sequence i comes from source `choose(seed, i)`, drawn with the mixture weights; every
  row holds seq_len tokens, so weights are shares of tokens.
- Each source is an endless token stream: epoch e is its documents in a seeded permutation
  (documents >= upsample_min_tokens repeated upsample_factor times), concatenated; the next
  window of a source starts where its previous one ended (a per-source token cursor), so no token
  is skipped or repeated within an epoch, and changing seq_len (`set_seq_len`) loses nothing.
- Step k takes global sequences [k*G, (k+1)*G), G = dp_size * batch_size; data-parallel rank r gets
  rows [r*B, (r+1)*B) of them. Ranks of one sequence-parallel group (consecutive ranks:
  dp_rank = rank // sp_size) get the same batch; `shard_sequence_parallel` slices it.
Every rank advances all cursors, so `state_dict()` is the same on every rank and small (JSON-able);
a run resumed on another number of ranks continues the same global stream. A batch costs a few
milliseconds of numpy on the host (128K-token rows included), so no worker processes are needed.
Batches are dicts in the format documented in `powerattn.data.packing`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from powerattn.data.packing import DocStream, collate
from powerattn.data.store import TokenStore

STATE_VERSION = 1
_BLOCK = 4096  # source choices are drawn in blocks of sequence indices


@dataclass
class Source:
    """A tokenised corpus with its mixture weight and long-document upsampling."""

    name: str
    store: TokenStore
    weight: float = 1.0
    upsample_min_tokens: int | None = None
    upsample_factor: float = 1.0

    def __post_init__(self) -> None:
        if not self.weight > 0:
            raise ValueError(f"source {self.name!r}: weight must be > 0, got {self.weight}")
        if self.upsample_factor < 1.0:
            raise ValueError(
                f"source {self.name!r}: upsample_factor must be >= 1, got {self.upsample_factor}"
            )


class PackedLoader:
    """Yields packed batches (see powerattn.data.packing) for this rank, forever; resumable with state_dict()."""

    def __init__(
        self, sources: list[Source], seq_len: int, batch_size: int = 1, *, seed: int = 0,
        rank: int = 0, world_size: int = 1, sp_size: int = 1, pad_id: int = 0,
        reset_position_ids: bool = True, whole_documents: bool = False,
    ):
        if not sources:
            raise ValueError("PackedLoader: no sources")
        names = [s.name for s in sources]
        if len(set(names)) != len(names):
            raise ValueError(f"PackedLoader: source names must be unique, got {names}")
        if sp_size < 1 or world_size % sp_size:
            raise ValueError(f"PackedLoader: world_size {world_size} is not a multiple of sp_size {sp_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"PackedLoader: rank {rank} outside world_size {world_size}")
        self.sources = sources
        self.seed = seed
        self.dp_rank, self.dp_size = rank // sp_size, world_size // sp_size
        self.pad_id = pad_id
        self.reset_position_ids = reset_position_ids
        self.whole_documents = whole_documents
        w = np.array([s.weight for s in sources], dtype=np.float64)
        self.probs = w / w.sum()
        self.set_seq_len(seq_len, batch_size)
        self._next_index = 0                             # global sequences consumed
        self._cursors = [[0, 0] for _ in sources]        # per source: [epoch, token offset]
        self._streams: dict[tuple[int, int], DocStream] = {}
        self._choice_block: tuple[int, np.ndarray] = (-1, np.zeros(0, np.int64))

    def set_seq_len(self, seq_len: int, batch_size: int | None = None) -> None:
        """From the next batch: rows of seq_len tokens (curriculum stage), optionally a new batch size."""
        if seq_len < 1:
            raise ValueError(f"PackedLoader: seq_len must be >= 1, got {seq_len}")
        self.seq_len = int(seq_len)
        if batch_size is not None:
            if batch_size < 1:
                raise ValueError(f"PackedLoader: batch_size must be >= 1, got {batch_size}")
            self.batch_size = int(batch_size)

    # --- the stream definition -------------------------------------------------------------------

    def source_of(self, index: int) -> int:
        """Which source global sequence `index` is drawn from (a pure function of seed and index)."""
        block = index // _BLOCK
        if self._choice_block[0] != block:
            rng = np.random.default_rng([self.seed, 1, block])
            self._choice_block = (block, rng.choice(len(self.sources), size=_BLOCK, p=self.probs))
        return int(self._choice_block[1][index % _BLOCK])

    def epoch_order(self, src: int, epoch: int) -> np.ndarray:
        """Document order of source `src` in `epoch`, long documents repeated per the upsampling."""
        s = self.sources[src]
        rng = np.random.default_rng([self.seed, 2, src, epoch])
        docs = np.arange(s.store.num_docs)
        if s.upsample_min_tokens is not None and s.upsample_factor > 1.0:
            long = s.store.doc_lengths >= s.upsample_min_tokens
            whole, frac = divmod(s.upsample_factor, 1.0)
            reps = np.where(long, int(whole) + (rng.random(len(docs)) < frac), 1)
            docs = np.repeat(docs, reps)
        return rng.permutation(docs)

    def _stream(self, src: int, epoch: int) -> DocStream:
        key = (src, epoch)
        if key not in self._streams:
            # Only the epochs at or after a source's cursor are needed again.
            for k in [k for k in self._streams if k[0] == src and k[1] < self._cursors[src][0]]:
                del self._streams[k]
            st = self.sources[src].store
            self._streams[key] = DocStream(st.tokens, st.doc_offsets, self.epoch_order(src, epoch))
        return self._streams[key]

    def _take(self, src: int, n: int, materialise: bool) -> list[np.ndarray]:
        """Advance source `src` by up to n tokens (a row), returning the pieces when materialise.

        With whole_documents, a document that does not fit what is left of a non-empty row waits for
        the next row (the rest is padded); only a document longer than a whole row is split.
        """
        pieces: list[np.ndarray] = []
        cur = self._cursors[src]
        while n > 0:
            stream = self._stream(src, cur[0])
            got = min(n, stream.total - cur[1])
            if self.whole_documents:
                rest = int(stream.ends[np.searchsorted(stream.ends, cur[1], side="right")]) - cur[1]
                if rest > n and n < self.seq_len:
                    break
                got = min(n, rest)
            if materialise:
                pieces += stream.pieces(cur[1], got)
            cur[1] += got
            n -= got
            if cur[1] == stream.total:
                cur[0], cur[1] = cur[0] + 1, 0
        return pieces

    # --- iteration ---------------------------------------------------------------------------

    def __iter__(self) -> PackedLoader:
        return self

    def __next__(self) -> dict:
        b, first = self.batch_size, self._next_index
        mine = range(first + self.dp_rank * b, first + (self.dp_rank + 1) * b)
        rows = []
        for i in range(first, first + self.dp_size * b):
            pieces = self._take(self.source_of(i), self.seq_len, materialise=i in mine)
            if i in mine:
                rows.append(pieces)
        self._next_index = first + self.dp_size * b
        return collate(rows, self.seq_len, self.pad_id, self.reset_position_ids)

    # --- resume -------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """JSON-serialisable position in the stream (identical on every rank)."""
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "next_index": self._next_index,
            "cursors": [list(c) for c in self._cursors],
            "sources": [[s.name, s.store.num_tokens] for s in self.sources],
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where `state` was taken (seq_len and batch_size included)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"PackedLoader: state version {state.get('version')} != {STATE_VERSION}")
        mine = [[s.name, s.store.num_tokens] for s in self.sources]
        if [list(x) for x in state["sources"]] != mine:
            raise ValueError(
                f"PackedLoader: state was saved for sources {state['sources']}, this loader has {mine}"
            )
        if state["seed"] != self.seed:
            raise ValueError(f"PackedLoader: state seed {state['seed']} != loader seed {self.seed}")
        self.set_seq_len(state["seq_len"], state["batch_size"])
        self._next_index = int(state["next_index"])
        self._cursors = [[int(e), int(o)] for e, o in state["cursors"]]
        self._streams.clear()
