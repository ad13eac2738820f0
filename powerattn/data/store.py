"""On-disk tokenised corpus ("token store").

A store is a folder: `tokens.bin` (all documents' ids back to back, uint16 or uint32),
`doc_offsets.npy` (int64 [num_docs + 1]; document i is tokens[off[i]:off[i+1]]) and `meta.json`.
It is built in a temporary sibling folder and renamed into place with meta.json already inside,
so a folder under the final name is always complete: an interrupted build is never mistaken for
a cache hit. Tokenisation caches and `python -m powerattn.data.prepare` outputs share this format.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from powerattn.atomic import atomic_write_json, make_tempdir

FORMAT_VERSION = 1
META = "meta.json"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32)


class TokenStore:
    """Read-only view of a complete store; tokens are memory-mapped, so ranks share the page cache."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        meta_file = self.path / META
        if not meta_file.is_file():
            raise FileNotFoundError(f"token store {str(self.path)!r} is missing or incomplete (no {META})")
        self.meta: dict = json.loads(meta_file.read_text())
        if self.meta.get("format") != FORMAT_VERSION:
            raise ValueError(f"token store {self.path}: format {self.meta.get('format')} != {FORMAT_VERSION}")
        self.doc_offsets: np.ndarray = np.load(self.path / "doc_offsets.npy")
        self.tokens: np.ndarray = np.memmap(
            self.path / "tokens.bin", dtype=np.dtype(self.meta["dtype"]), mode="r", shape=(self.num_tokens,)
        )

    @staticmethod
    def is_complete(path: str | os.PathLike) -> bool:
        return (Path(path) / META).is_file()

    @property
    def name(self) -> str:
        return self.meta.get("name", self.path.name)

    @property
    def num_docs(self) -> int:
        return len(self.doc_offsets) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.doc_offsets[-1])

    @property
    def doc_lengths(self) -> np.ndarray:
        return np.diff(self.doc_offsets)

    def doc(self, i: int) -> np.ndarray:
        return self.tokens[self.doc_offsets[i] : self.doc_offsets[i + 1]]

    def __repr__(self) -> str:
        return f"TokenStore({str(self.path)!r}, docs={self.num_docs}, tokens={self.num_tokens})"


class StoreWriter:
    """Builds a store in a temporary folder; `commit()` publishes it atomically, leaving the store open."""

    def __init__(self, path: str | os.PathLike, vocab_size: int, meta: dict):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = make_tempdir(self.path.parent, self.path.name)
        self.dtype = token_dtype(vocab_size)
        self.meta = {**meta, "format": FORMAT_VERSION, "dtype": self.dtype.name, "vocab_size": vocab_size}
        self._tokens = open(self.tmp / "tokens.bin", "wb")  # noqa: SIM115 - closed in commit/abort
        self._lengths: list[np.ndarray] = []

    def add(self, values: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents given as their concatenated ids and their lengths."""
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != len(values):
            raise ValueError(f"StoreWriter.add: lengths sum {int(lengths.sum())} != {len(values)} values")
        self._tokens.write(np.asarray(values).astype(self.dtype, copy=False).tobytes())
        self._lengths.append(lengths)

    def add_docs(self, docs: list[list[int]]) -> None:
        if docs:
            self.add(np.concatenate([np.asarray(d, dtype=np.int64) for d in docs]), [len(d) for d in docs])

    def commit(self) -> TokenStore:
        self._tokens.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int64)
        if len(lengths) == 0:
            self.abort()
            where = f"data source {self.meta.get('name')!r} ({self.meta.get('source', self.path)})"
            raise ValueError(f"{where}: the dataset is empty (no documents)")
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        np.save(self.tmp / "doc_offsets.npy", offsets)
        self.meta.update(num_docs=len(lengths), num_tokens=int(offsets[-1]))
        atomic_write_json(self.tmp / META, self.meta)
        try:
            os.rename(self.tmp, self.path)
        except OSError:
            # Another process published the same store first: both are complete and identical.
            if not TokenStore.is_complete(self.path):
                raise
            shutil.rmtree(self.tmp, ignore_errors=True)
        return TokenStore(self.path)

    def abort(self) -> None:
        if not self._tokens.closed:
            self._tokens.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def write_store(path: str | os.PathLike, docs: list, vocab_size: int, meta: dict | None = None) -> TokenStore:
    """Publish a store holding `docs` (lists or arrays of ids): small in-memory corpora, tests."""
    with StoreWriter(path, vocab_size, {"name": Path(path).name, **(meta or {})}) as w:
        w.add_docs([list(map(int, d)) for d in docs])
        return w.commit()
