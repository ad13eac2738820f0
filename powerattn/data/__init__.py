"""Data pipeline: sources through HF `datasets`, sentencepiece tokenizer, packed document-aware batches,
synthetic long-context tasks, and a resumable distributed loader.

    from powerattn.data import DataConfig, build_loader
    loader, tok = build_loader(DataConfig(seq_len=4096), batch_size=1, rank=r, world_size=w, sp_size=sp)
    batch = next(loader)            # input_ids, labels, position_ids [B, S]; cu_seqlens, max_seqlen
    loss = model(**flatten_batch(batch))   # packed documents as one row, document-masked
    loader.set_seq_len(8192)        # curriculum stage change
    state = loader.state_dict()     # into trainer_state.json; loader.load_state_dict(state) resumes exactly

The batch format (labels masking at document starts, cu_seqlens over the flattened batch) is
documented in `powerattn.data.packing`; the stream definition (mixture, epochs, sharding) in
`powerattn.data.loader`. Offline preparation: `python -m powerattn.data.prepare --input PATH_OR_GLOB
--tokenizer MODEL_FOLDER --seq-len N --output DIR` (from a checkout also `python -m data.prepare`); a
prepared DIR is then usable as a source path. The names below load on first use: `powerattn.data.config`
and `powerattn.data.synthetic` (config checks) import neither torch nor sentencepiece.
"""

from powerattn.lazy import lazy_exports

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
__getattr__, __dir__ = lazy_exports(__name__, {
    "build_loader": "build", "local_rank_zero_first": "build",
    "DataConfig": "config", "SourceConfig": "config", "SyntheticConfig": "config", "as_data_config": "config",
    "default_corpus": "default", "default_tokenizer": "default", "load_tokenizer": "default",
    "PackedLoader": "loader", "Source": "loader",
    "IGNORE_INDEX": "packing", "collate": "packing", "flatten_batch": "packing", "iter_packed": "packing",
    "load_sources": "sources", "tokenize_source": "sources",
    "TokenStore": "store", "write_store": "store",
    "TASKS": "synthetic", "Sample": "synthetic", "TaskSpec": "synthetic", "TokenPrompt": "synthetic",
    "make_task": "synthetic", "niah_multikey": "synthetic", "passkey": "synthetic", "variable_tracking": "synthetic",
    "Tokenizer": "tokenizer", "train_tokenizer": "tokenizer",
})
