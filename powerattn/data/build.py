"""`build_loader`: DataConfig + process layout -> a ready PackedLoader (what train.py calls)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

from powerattn.data.config import DataConfig, as_data_config
from powerattn.data.default import load_tokenizer
from powerattn.data.loader import PackedLoader
from powerattn.data.sources import load_sources
from powerattn.data.tokenizer import Tokenizer

T = TypeVar("T")


def local_rank_zero_first(fn: Callable[[], T]) -> T:
    """Run fn on each node's local rank 0 first, then on the other ranks (which then hit its caches).

    Without an initialised torch.distributed group this is just fn(). Caches are published
    atomically, so local-rank-0s of several nodes sharing one cache folder are safe too.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return fn()
    first = int(os.environ.get("LOCAL_RANK", dist.get_rank())) == 0
    if first:
        result = fn()
    dist.barrier()
    if not first:
        result = fn()
    return result


def build_loader(
    cfg: DataConfig | dict, batch_size: int = 1, rank: int = 0, world_size: int = 1, sp_size: int = 1,
    tokenizer: Tokenizer | None = None,
) -> tuple[PackedLoader, Tokenizer]:
    """Tokenise (or open the caches of) cfg's sources and return the loader for this rank and its tokenizer.

    cfg may be a DataConfig, a dict or a Hydra DictConfig of the same fields (unknown keys are errors).

    batch_size is per data-parallel rank; ranks of one sequence-parallel group (sp_size consecutive
    ranks) receive identical batches.
    """
    cfg = as_data_config(cfg)
    tokenizer = tokenizer or local_rank_zero_first(lambda: load_tokenizer(cfg))
    sources = local_rank_zero_first(lambda: load_sources(cfg, tokenizer))
    loader = PackedLoader(
        sources, cfg.seq_len, batch_size, seed=cfg.seed, rank=rank, world_size=world_size,
        sp_size=sp_size, pad_id=tokenizer.pad_id, reset_position_ids=cfg.reset_position_ids,
        whole_documents=cfg.whole_documents,
    )
    return loader, tokenizer
