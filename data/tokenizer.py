"""Sentencepiece tokenizer wrapper (Llama-2 / Mistral `tokenizer.model`) and a trainer for the tiny default.

Documents are encoded as [BOS] + text + [EOS]: BOS when the model's tokenizer adds one (read from
`tokenizer_config.json` next to the model when present), EOS always, so packed documents are
separated the way the base model saw them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm

from data.store import atomic_write_bytes

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=8)
def _processor(path: str) -> spm.SentencePieceProcessor:
    # One processor per model file and process: datasets.map workers load it once, not per batch.
    return spm.SentencePieceProcessor(model_file=path)


def _resolve_model_file(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.model"
    if not p.is_file():
        raise FileNotFoundError(
            f"tokenizer: no sentencepiece model at {str(path)!r} (expected a tokenizer.model file "
            "or a model folder holding one)"
        )
    return p.resolve()


class Tokenizer:
    """A sentencepiece model with the BOS/EOS conventions of the model it belongs to."""

    def __init__(self, path: str | os.PathLike, add_bos: bool | None = None, add_eos: bool = False):
        self.path = str(_resolve_model_file(path))
        self.sp = _processor(self.path)
        self.vocab_size: int = self.sp.vocab_size()
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        if self.eos_id < 0:
            raise ValueError(f"tokenizer {self.path}: the model defines no EOS token; packing needs one")
        # No pad piece in Llama tokenizers: padding reuses EOS; padded positions never get a label.
        self.pad_id: int = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id
        self.add_bos: bool = self.bos_id >= 0 if add_bos is None else bool(add_bos and self.bos_id >= 0)
        self.add_eos: bool = add_eos
        with open(self.path, "rb") as f:
            self._hash = hashlib.sha256(f.read()).hexdigest()[:16]

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> Tokenizer:
        """Load `tokenizer.model` from a file or model folder, honouring its tokenizer_config.json flags."""
        p = Path(path)
        cfg_file = (p if p.is_dir() else p.parent) / "tokenizer_config.json"
        add_bos, add_eos = None, False
        if cfg_file.is_file():
            cfg = json.loads(cfg_file.read_text())
            add_bos = cfg.get("add_bos_token", None)
            add_eos = bool(cfg.get("add_eos_token", False))
        return cls(p, add_bos=add_bos, add_eos=add_eos)

    @property
    def hash(self) -> str:
        """Content hash of the model file plus the BOS/EOS convention: the tokenisation cache key."""
        return f"{self._hash}-b{int(self.add_bos)}"

    def encode(self, text: str, bos: bool | None = None, eos: bool | None = None) -> list[int]:
        """Token ids of `text`; bos/eos default to the model's add_bos/add_eos."""
        ids = self.sp.encode(text)
        return self._wrap(ids, self.add_bos if bos is None else bos, self.add_eos if eos is None else eos)

    def encode_batch(
        self, texts: list[str], bos: bool | None = None, eos: bool | None = None
    ) -> list[list[int]]:
        """Batched `encode` (sentencepiece runs the batch in C++)."""
        bos = self.add_bos if bos is None else bos
        eos = self.add_eos if eos is None else eos
        return [self._wrap(ids, bos, eos) for ids in self.sp.encode(texts)]

    def encode_document(self, text: str) -> list[int]:
        """A training document: [BOS] + text + [EOS]; EOS always, so packed documents stay separated."""
        return self.encode(text, eos=True)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; BOS/EOS/pad ids are dropped."""
        special = {self.bos_id, self.eos_id, self.pad_id}
        return self.sp.decode([int(i) for i in ids if int(i) not in special])

    def _wrap(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        if bos and self.bos_id >= 0:
            ids = [self.bos_id, *ids]
        if eos:
            ids = [*ids, self.eos_id]
        return ids

    def __repr__(self) -> str:
        return f"Tokenizer({self.path!r}, vocab_size={self.vocab_size}, add_bos={self.add_bos})"


def encode_documents(texts: list[str], model_path: str, add_bos: bool) -> list[list[int]]:
    """Picklable batch function for datasets.map workers: [BOS] + text + [EOS] per document."""
    sp = _processor(model_path)
    bos, eos = ([sp.bos_id()] if add_bos and sp.bos_id() >= 0 else []), [sp.eos_id()]
    return [bos + ids + eos for ids in sp.encode(texts)]


def _lines(texts: Iterable[str]) -> Iterator[str]:
    # sentencepiece trains on "sentences" of at most max_sentence_length bytes: feed lines, not documents.
    for text in texts:
        for line in text.split("\n"):
            if line.strip():
                yield line


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, out_path: str | os.PathLike, model_type: str = "bpe",
) -> Tokenizer:
    """Fit a Llama-style sentencepiece model (unk 0, bos 1, eos 2, byte fallback, split digits) to `texts`.

    Identity normalisation and kept whitespace make decode(encode(x)) == x for any text, which the
    synthetic tasks rely on. The file is written atomically. When the corpus is too small for
    `vocab_size`, the largest size sentencepiece accepts is used (with a warning).
    """
    lines = list(_lines(texts))
    if not lines:
        raise ValueError("train_tokenizer: no non-empty text to train on")
    kwargs = dict(
        model_type=model_type, byte_fallback=True, split_digits=True, character_coverage=1.0,
        normalization_rule_name="identity", remove_extra_whitespaces=False, max_sentence_length=16384,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2, num_threads=os.cpu_count() or 1,
    )
    for _ in range(2):
        buf = _ModelBuffer()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab_size, **kwargs
            )
            break
        except RuntimeError as e:
            small = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", str(e))
            if small:
                raise ValueError(
                    f"train_tokenizer: vocab_size={vocab_size} is too small; the 256 byte-fallback pieces, "
                    f"the corpus characters and the special pieces need at least {small.group(2)}"
                ) from None
            m = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", str(e))
            if not m:
                raise
            log.warning("train_tokenizer: vocab_size=%d too large; using %s", vocab_size, m.group(2))
            vocab_size = int(m.group(2))
    atomic_write_bytes(Path(out_path), buf.data)
    return Tokenizer(out_path)


class _ModelBuffer:
    """File-like sink for SentencePieceTrainer's model_writer."""

    def __init__(self) -> None:
        self.data = b""

    def write(self, b: bytes) -> None:
        self.data += b
