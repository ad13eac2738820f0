"""The model's tokenizer: sentencepiece `tokenizer.model` (Llama-2, Mistral) or HF `tokenizer.json`
(Llama-3, Qwen2), and a sentencepiece trainer for the tiny default.

Documents are encoded as [BOS] + text + [EOS]: BOS when the model's tokenizer adds one, EOS
always, so packed documents are separated the way the base model saw them. Flags and, for a
tokenizer.json, the BOS/EOS tokens come from `tokenizer_config.json` beside the tokenizer file.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm

from powerattn.atomic import atomic_write

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")  # looked for in this order in a model folder
CONFIG_FILE = "tokenizer_config.json"


class _SentencePiece:
    def __init__(self, path: str):
        self.sp = spm.SentencePieceProcessor(model_file=path)
        self.vocab_size, self.pad_id = self.sp.vocab_size(), self.sp.pad_id()

    def special_ids(self, config: dict) -> tuple[int, int]:
        return self.sp.bos_id(), self.sp.eos_id()  # defined inside the model file

    def encode(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)


class _HFTokenizer:
    """A `tokenizers` tokenizer.json; BOS/EOS are the tokens tokenizer_config.json names (none: -1)."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer as FastTokenizer

        self.tok = FastTokenizer.from_file(path)
        self.vocab_size, self.pad_id = self.tok.get_vocab_size(with_added_tokens=True), -1

    def special_ids(self, config: dict) -> tuple[int, int]:
        return self._id(config, "bos_token"), self._id(config, "eos_token")

    def _id(self, cfg: dict, key: str) -> int:
        token = cfg.get(key)
        token = token.get("content") if isinstance(token, dict) else token
        if token is None:
            return -1
        found = self.tok.token_to_id(token)
        if found is None:
            raise ValueError(f"tokenizer: {CONFIG_FILE} names {key} {token!r}, which tokenizer.json lacks")
        return found

    def encode(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)


@functools.lru_cache(maxsize=8)
def _backend(path: str) -> _SentencePiece | _HFTokenizer:
    # One per file and process: datasets.map workers load it once, not per batch.
    return _HFTokenizer(path) if path.endswith(".json") else _SentencePiece(path)


def _read_config(folder: Path) -> dict:
    f = folder / CONFIG_FILE
    return json.loads(f.read_text()) if f.is_file() else {}


def _resolve_file(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.is_dir():
        p = next((p / name for name in TOKENIZER_FILES if (p / name).is_file()), p / TOKENIZER_FILES[0])
    if not p.is_file():
        raise FileNotFoundError(
            f"tokenizer: nothing at {str(path)!r} (expected a sentencepiece tokenizer.model, an HF "
            "tokenizer.json, or a model folder holding one)"
        )
    return p.resolve()


class Tokenizer:
    """The model's tokenizer with the BOS/EOS conventions of the model it belongs to."""

    def __init__(self, path: str | os.PathLike, add_bos: bool | None = None, add_eos: bool = False):
        self.path = str(_resolve_file(path))
        self.backend = _backend(self.path)
        self.vocab_size: int = self.backend.vocab_size
        self.bos_id, self.eos_id = self.backend.special_ids(_read_config(Path(self.path).parent))
        if self.eos_id < 0:
            raise ValueError(f"tokenizer {self.path}: no EOS token (a tokenizer.json needs {CONFIG_FILE} beside it "
                             "naming eos_token); packing needs one")
        # No pad token in Llama tokenizers: padding reuses EOS; padded positions never get a label.
        self.pad_id: int = self.backend.pad_id if self.backend.pad_id >= 0 else self.eos_id
        self.add_bos: bool = self.bos_id >= 0 if add_bos is None else bool(add_bos and self.bos_id >= 0)
        self.add_eos: bool = add_eos
        with open(self.path, "rb") as f:
            self._hash = hashlib.sha256(f.read()).hexdigest()[:16]
        if isinstance(self.backend, _HFTokenizer):  # its BOS/EOS come from tokenizer_config.json
            self._hash += f"-{self.bos_id}.{self.eos_id}"

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> Tokenizer:
        """The tokenizer of a file or model folder, honouring its tokenizer_config.json flags."""
        cfg = _read_config(_resolve_file(path).parent)
        return cls(path, add_bos=cfg.get("add_bos_token"), add_eos=bool(cfg.get("add_eos_token", False)))

    @property
    def hash(self) -> str:
        """Content hash of the tokenizer plus the BOS convention: the tokenisation cache key."""
        return f"{self._hash}-b{int(self.add_bos)}"

    def save(self, folder: str | os.PathLike) -> None:
        """Copy the tokenizer file and the tokenizer_config.json beside it (if any) into `folder`."""
        src = Path(self.path)
        name = "tokenizer.json" if src.suffix == ".json" else "tokenizer.model"
        for f, dst in ((src, Path(folder) / name), (src.parent / CONFIG_FILE, Path(folder) / CONFIG_FILE)):
            if f.is_file() and not dst.exists():
                shutil.copyfile(f, dst)

    def encode(self, text: str, bos: bool | None = None, eos: bool | None = None) -> list[int]:
        """Token ids of `text`; bos/eos default to the model's add_bos/add_eos."""
        return self.encode_batch([text], bos, eos)[0]

    def encode_batch(
        self, texts: list[str], bos: bool | None = None, eos: bool | None = None
    ) -> list[list[int]]:
        """Batched `encode` (both backends run the batch in native code)."""
        bos = self.add_bos if bos is None else bos
        eos = self.add_eos if eos is None else eos
        return [self._wrap(ids, bos, eos) for ids in self.backend.encode(texts)]

    def encode_pieces(self, texts: list[str]) -> list[list[int]]:
        """Ids of each text as it reads after a space in running text, so that pieces concatenate into
        spaced text: sentencepiece marks that space itself (its dummy prefix), a byte-level BPE
        tokenizer.json needs it written."""
        if isinstance(self.backend, _HFTokenizer):
            texts = [" " + t for t in texts]
        return self.backend.encode(texts)

    def encode_document(self, text: str) -> list[int]:
        """A training document: [BOS] + text + [EOS]; EOS always, so packed documents stay separated."""
        return self.encode(text, eos=True)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; BOS/EOS/pad ids are dropped."""
        special = {self.bos_id, self.eos_id, self.pad_id}
        return self.backend.decode([int(i) for i in ids if int(i) not in special])

    def _wrap(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        if bos and self.bos_id >= 0:
            ids = [self.bos_id, *ids]
        if eos:
            ids = [*ids, self.eos_id]
        return ids

    def __repr__(self) -> str:
        return f"Tokenizer({self.path!r}, vocab_size={self.vocab_size}, add_bos={self.add_bos})"


def encode_documents(texts: list[str], path: str, bos_id: int, eos_id: int) -> list[list[int]]:
    """Picklable batch function for datasets.map workers: [BOS] + text + [EOS] per document (bos_id -1: none)."""
    bos = [bos_id] if bos_id >= 0 else []
    return [bos + ids + [eos_id] for ids in _backend(path).encode(texts)]


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
    atomic_write(Path(out_path), buf.data)
    return Tokenizer(out_path)


class _ModelBuffer:
    """File-like sink for SentencePieceTrainer's model_writer."""

    def __init__(self) -> None:
        self.data = b""

    def write(self, b: bytes) -> None:
        self.data += b
