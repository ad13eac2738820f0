"""Dataclass config of the data section; `configs/data/*.yaml` mirror these fields one to one."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SourceConfig:
    """One corpus of the mixture.

    `path` is a local file, glob or folder (jsonl/json/parquet/txt/arrow files, a `save_to_disk`
    folder, or a `python -m data.prepare` output), or a hub dataset id when online. `weight` is the
    source's share of training tokens (weights are normalised over sources). Documents of at least
    `upsample_min_tokens` tokens appear `upsample_factor` times per epoch (fractions are drawn per
    epoch), the per-source long-document upsampling of Fu et al. / ProLong.
    """

    path: str
    name: str | None = None            # defaults to the file / folder stem
    weight: float = 1.0
    text_field: str | None = None      # None: DataConfig.text_field
    split: str = "train"
    streaming: bool = False            # tokenise while streaming; use max_docs to take a prefix
    max_docs: int | None = None
    upsample_min_tokens: int | None = None
    upsample_factor: float = 1.0


@dataclass
class SyntheticConfig:
    """The embedded default corpus: grammatical filler plus passkey / NIAH / variable-tracking documents."""

    num_docs: int = 2000
    min_sentences: int = 20            # ~12 tokens a sentence
    max_sentences: int = 400
    task_fraction: float = 0.5         # share of documents that carry a synthetic task
    vocab_size: int = 1024
    seed: int = 0


@dataclass
class DataConfig:
    """Everything the loader needs besides the tokenizer and the process layout.

    An empty `sources` list selects the embedded synthetic default (no network). `tokenizer` is a
    sentencepiece `tokenizer.model` or a model folder holding one; None with the default data means
    the sentencepiece model trained on the synthetic corpus and cached under `cache_dir`.
    """

    sources: list[SourceConfig] = field(default_factory=list)
    tokenizer: str | None = None
    text_field: str = "text"
    seq_len: int = 1024
    cache_dir: str = ".cache/powerattn_data"
    num_proc: int = 1                  # processes for datasets.map tokenisation
    reset_position_ids: bool = True    # position ids restart at every document (pairs with cu_seqlens)
    seed: int = 0
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


def source_from_dict(d: dict | SourceConfig) -> SourceConfig:
    """Accept a plain mapping (from YAML) as well as a SourceConfig; unknown keys are an error."""
    if isinstance(d, SourceConfig):
        return d
    known = set(SourceConfig.__dataclass_fields__)
    bad = sorted(set(d) - known)
    if bad:
        raise ValueError(f"data source: unknown key(s) {bad}; known keys are {sorted(known)}")
    return SourceConfig(**d)
