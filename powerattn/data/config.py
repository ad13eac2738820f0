"""Dataclass config of the data section; `configs/data/*.yaml` mirror these fields one to one."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class SourceConfig:
    """One corpus of the mixture.

    `path` is a local file, glob or folder (jsonl/json/parquet/csv/arrow files, jsonl/json/txt/csv also
    compressed as .gz/.zst/.bz2/.xz; a .txt file is one document; a `save_to_disk` folder; a
    `python -m powerattn.data.prepare` output), or a hub dataset id `owner/name` when online (`split` applies to
    hub ids and saved DatasetDicts). `weight` is the source's share of training tokens (weights are
    normalised over sources). `group_by` (a dotted field such as SlimPajama's
    `meta.redpajama_set_name`) splits the source into one sub-source per value, named NAME/VALUE;
    `group_weights` then sets their shares of the source's weight (every group named; 0 drops one),
    else they share it in proportion to their tokens. Documents of at least
    `upsample_min_tokens` tokens appear `upsample_factor` times per epoch (fractions are drawn per
    epoch), the per-source long-document upsampling of Fu et al. / ProLong. `streaming` tokenises
    in one process while reading, and skips the Arrow copy `datasets` otherwise makes of local
    files (worth it for very large corpora); without it, tokenisation runs on `num_proc` processes.
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
    group_by: str | None = None        # dotted field, e.g. meta.redpajama_set_name: a sub-source per value
    group_weights: dict[str, float] | None = None  # relative weights of the groups; None: by their tokens

    def __post_init__(self) -> None:
        if self.group_by is not None and not all(self.group_by.split(".")):
            raise ValueError(f"data source {self.path!r}: group_by {self.group_by!r} is not a dotted field name")
        if self.group_weights is None:
            return
        if self.group_by is None:
            raise ValueError(f"data source {self.path!r}: group_weights needs group_by (the field to group on)")
        bad = {g: w for g, w in self.group_weights.items() if not w >= 0}
        if bad or not any(w > 0 for w in self.group_weights.values()):
            raise ValueError(f"data source {self.path!r}: group_weights must be >= 0 with one > 0, got "
                             f"{self.group_weights}")


@dataclass
class SyntheticConfig:
    """The embedded default corpus: grammatical filler plus task documents (`tasks`, powerattn.data.synthetic)."""

    num_docs: int = 2000
    min_sentences: int = 20            # ~12 tokens a sentence
    max_sentences: int = 400
    task_fraction: float = 0.5         # share of documents that carry a synthetic task
    # Task documents take these in turn (powerattn.data.synthetic.DOCUMENT_TASKS; repeat a name to weight it).
    tasks: list[str] = field(default_factory=lambda: ["niah_multikey", "passkey", "variable_tracking"])
    depth_power: float = 1.0           # needle depth = uniform ** depth_power: > 1 trains long distances more
    vocab_size: int = 1024
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.depth_power > 0:
            raise ValueError(f"data.synthetic.depth_power must be > 0, got {self.depth_power}")


@dataclass
class DataConfig:
    """Everything the loader needs besides the tokenizer and the process layout.

    An empty `sources` list selects the embedded synthetic default (no network). `tokenizer` is a
    sentencepiece `tokenizer.model`, an HF `tokenizer.json` or a model folder holding one; None with
    the default data means the sentencepiece model trained on the synthetic corpus and cached under
    `cache_dir` (training from a model folder, `model.path`, uses that folder's tokenizer instead).
    """

    sources: list[SourceConfig] = field(default_factory=list)
    tokenizer: str | None = None
    text_field: str = "text"
    seq_len: int = 1024
    cache_dir: str = ".cache/powerattn_data"
    num_proc: int = 1                  # processes for datasets.map tokenisation
    reset_position_ids: bool = True    # position ids restart at every document (pairs with cu_seqlens)
    # True: a document that does not fit the rest of a row starts the next one (the rest is padding),
    # so documents up to a row long are never cut; costs padding, keeps long-range examples whole.
    whole_documents: bool = False
    seed: int = 0
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


def as_data_config(cfg) -> DataConfig:
    """A DataConfig (nested dataclasses) from a DataConfig, mapping or Hydra DictConfig; typos are errors.

    OmegaConf merges it into the DataConfig structured config: unknown keys and wrong types fail there.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

    if isinstance(cfg, DataConfig):  # its sources may still be mappings: check them too
        cfg = dataclasses.asdict(cfg)
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), cfg))
    except ConfigKeyError as e:
        where = ".".join(["data", *str(e.full_key).split(".")[:-1]])
        known = sorted(getattr(e.object_type, "__dataclass_fields__", {}))
        raise ValueError(f"{where}: unknown key(s) {[str(e.key)]}; known keys are {known}") from None
    except OmegaConfBaseException as e:
        raise ValueError(f"data.{e.full_key}: {str(e).splitlines()[0]}") from None
