"""Data pipeline: sources through HF `datasets`, sentencepiece tokenizer, packed document-aware batches,
synthetic long-context tasks, and a resumable distributed loader.

    from data import DataConfig, build_loader
    loader, tok = build_loader(DataConfig(seq_len=4096), batch_size=1, rank=r, world_size=w, sp_size=sp)
    batch = next(loader)            # input_ids, labels, position_ids [B, S]; cu_seqlens, max_seqlen
    loss = model(**flatten_batch(batch))   # packed documents as one row, document-masked
    loader.set_seq_len(8192)        # curriculum stage change
    state = loader.state_dict()     # into trainer_state.json; loader.load_state_dict(state) resumes exactly

The batch format (labels masking at document starts, cu_seqlens over the flattened batch) is
documented in `data.packing`; the stream definition (mixture, epochs, sharding) in `data.loader`.
Offline preparation: `python -m data.prepare --input PATH_OR_GLOB --tokenizer MODEL_FOLDER
--seq-len N --output DIR`; a prepared DIR is then usable as a source path.
"""

from data.build import build_loader, local_rank_zero_first
from data.config import DataConfig, SourceConfig, SyntheticConfig, as_data_config
from data.default import default_corpus, default_tokenizer, load_tokenizer
from data.loader import PackedLoader, Source
from data.packing import (
    IGNORE_INDEX,
    collate,
    flatten_batch,
    iter_packed,
)
from data.sources import load_sources, tokenize_source
from data.store import TokenStore, write_store
from data.synthetic import (
    TASKS,
    Sample,
    TaskSpec,
    TokenPrompt,
    make_task,
    niah_multikey,
    passkey,
    variable_tracking,
)
from data.tokenizer import Tokenizer, train_tokenizer

__all__ = [
    "IGNORE_INDEX",
    "TASKS",
    "DataConfig",
    "PackedLoader",
    "Sample",
    "Source",
    "SourceConfig",
    "SyntheticConfig",
    "TaskSpec",
    "TokenPrompt",
    "TokenStore",
    "Tokenizer",
    "as_data_config",
    "build_loader",
    "collate",
    "default_corpus",
    "default_tokenizer",
    "flatten_batch",
    "iter_packed",
    "load_sources",
    "load_tokenizer",
    "local_rank_zero_first",
    "make_task",
    "niah_multikey",
    "passkey",
    "tokenize_source",
    "train_tokenizer",
    "variable_tracking",
    "write_store",
]
