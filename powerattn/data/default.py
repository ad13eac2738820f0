"""The embedded default data: a synthetic long-context corpus and a sentencepiece model fitted to it.

Both are produced by the project itself (no network, no copied text) and cached under
`<cache_dir>/synthetic/`, keyed by the SyntheticConfig: filler documents of log-uniform length
plus task documents (passkey / multi-key NIAH / variable tracking / recall / repeat), as jsonl with `text` and `task`.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import asdict
from pathlib import Path

from powerattn.atomic import atomic_write
from powerattn.data.config import DataConfig, SourceConfig, SyntheticConfig
from powerattn.data.filler import Filler
from powerattn.data.synthetic import training_document
from powerattn.data.tokenizer import Tokenizer, train_tokenizer

# Part of the cache key: bump when a document generator changes, so no corpus or tokenizer of the old
# generator is taken for the new one (2: the recall and repeat documents).
GENERATOR_VERSION = 2
_TOKENIZER_DOCS = 1000  # documents the default tokenizer is fitted on (plenty for its small vocabulary)


def _key(cfg: SyntheticConfig) -> str:
    fields = asdict(cfg)
    if fields["depth_power"] == 1.0:  # its default: corpora cached before the field existed stay valid
        del fields["depth_power"]
    blob = json.dumps([GENERATOR_VERSION, fields], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def synthetic_documents(cfg: SyntheticConfig):
    """Yield (task, text) for each default document, deterministically from cfg.seed."""
    lo, hi = math.log(cfg.min_sentences), math.log(max(cfg.max_sentences, cfg.min_sentences))
    for i in range(cfg.num_docs):
        r = random.Random(f"default-{cfg.seed}-{i}")
        n = int(round(math.exp(r.uniform(lo, hi))))  # log-uniform: many short, some long documents
        if r.random() < cfg.task_fraction:
            task = cfg.tasks[i % len(cfg.tasks)]
            yield task, training_document(task, r.randrange(2**31), n, cfg.depth_power)
        else:
            yield "filler", Filler(r.randrange(2**31)).text(n)


def default_corpus(cache_dir: str | Path, cfg: SyntheticConfig | None = None) -> Path:
    """Path of the default jsonl corpus, generated (atomically) on first use."""
    cfg = cfg or SyntheticConfig()
    path = Path(cache_dir) / "synthetic" / f"corpus-{_key(cfg)}.jsonl"
    if not path.is_file():
        lines = [json.dumps({"text": text, "task": task}) for task, text in synthetic_documents(cfg)]
        atomic_write(path, "\n".join(lines) + "\n")
    return path


def default_tokenizer(cache_dir: str | Path, cfg: SyntheticConfig | None = None) -> Tokenizer:
    """The sentencepiece model of the default corpus, trained on first use and cached."""
    cfg = cfg or SyntheticConfig()
    path = Path(cache_dir) / "synthetic" / f"tokenizer-{_key(cfg)}.model"
    if not path.is_file():
        corpus = default_corpus(cache_dir, cfg)
        with open(corpus) as f:
            texts = [json.loads(line)["text"] for _, line in zip(range(_TOKENIZER_DOCS), f)]
        train_tokenizer(texts, cfg.vocab_size, path)
    return Tokenizer(path)


def default_source_config(cfg: DataConfig) -> SourceConfig:
    return SourceConfig(path=str(default_corpus(cfg.cache_dir, cfg.synthetic)), name="synthetic")


def load_tokenizer(cfg: DataConfig) -> Tokenizer:
    """cfg.tokenizer (file or model folder), or the default synthetic tokenizer when unset."""
    if cfg.tokenizer:
        return Tokenizer.from_pretrained(cfg.tokenizer)
    if cfg.sources:
        raise ValueError(
            "data.tokenizer must be set when data.sources are given (the model folder, or its tokenizer.model "
            "or tokenizer.json)"
        )
    return default_tokenizer(cfg.cache_dir, cfg.synthetic)
