"""build_loader under torch.distributed (gloo, 2 CPU processes): one cache, each rank its own shard."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from powerattn.data.build import build_loader
from powerattn.data.config import DataConfig, SyntheticConfig


def _worker(rank, world, tmp, out):
    os.environ["LOCAL_RANK"] = str(rank)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rdzv", rank=rank, world_size=world)
    try:
        cfg = DataConfig(seq_len=64, cache_dir=f"{tmp}/cache", synthetic=SyntheticConfig(num_docs=40))
        loader, _ = build_loader(cfg, batch_size=2, rank=rank, world_size=world)
        torch.save([next(loader)["input_ids"] for _ in range(3)], f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_share_one_cache(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    single, _ = build_loader(
        DataConfig(seq_len=64, cache_dir=str(tmp_path / "cache"), synthetic=SyntheticConfig(num_docs=40)),
        batch_size=4,
    )
    for a, b in zip(r0, r1):
        assert torch.equal(torch.cat([a, b]), next(single)["input_ids"])
    assert len(list((tmp_path / "cache" / "tokenized").iterdir())) == 1
