"""PackedLoader: mixture proportions, upsampling, exact resume, distributed sharding, errors."""

import json

import numpy as np
import pytest
import torch

from powerattn.data.loader import PackedLoader, Source
from powerattn.data.store import write_store


def _store(path, n_docs, lo, hi, base, seed=0):
    # Tokens of source k live in [base, base + 10**6): the source of any token is readable from it.
    rng = np.random.default_rng(seed)
    lens = rng.integers(lo, hi, n_docs)
    ids = base + np.arange(1, lens.sum() + 1)
    return write_store(path, np.split(ids, np.cumsum(lens)[:-1]), vocab_size=1 << 24)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    d = tmp_path_factory.mktemp("stores")
    return [_store(d / f"s{k}", 200, 1, 80, base=k * 10**6, seed=k) for k in range(3)]


def _sources(stores, weights=(0.5, 0.3, 0.2), **kw):
    return [Source(f"s{k}", st, w, **kw) for k, (st, w) in enumerate(zip(stores, weights))]


def _equal(a, b):
    return all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


def test_mixture_proportions(stores):
    loader = PackedLoader(_sources(stores), seq_len=16, batch_size=64, seed=0)
    ids = torch.cat([next(loader)["input_ids"] for _ in range(100)])   # 6400 rows
    share = torch.bincount(ids.flatten() // 10**6, minlength=3).double() / ids.numel()
    assert torch.allclose(share, torch.tensor([0.5, 0.3, 0.2], dtype=torch.double), atol=0.02), share
    rows_single_source = (ids // 10**6 == (ids[:, :1] // 10**6)).all()
    assert rows_single_source  # a row is drawn from one source


def test_upsampling_long_documents(tmp_path):
    short = [np.arange(1, 11) + 10 * i for i in range(100)]         # 100 docs of 10 tokens
    long = [np.arange(1, 101) + 10**5 + 100 * i for i in range(20)]  # 20 docs of 100 tokens
    st = write_store(tmp_path / "u", short + long, vocab_size=1 << 24)
    for factor, expect in ((3.0, 3.0), (1.5, 1.5)):
        loader = PackedLoader([Source("u", st, upsample_min_tokens=50, upsample_factor=factor)], 32, seed=0)
        counts = np.mean([np.bincount(loader.epoch_order(0, e), minlength=120) for e in range(40)], axis=0)
        assert (counts[:100] == 1).all()
        assert abs(counts[100:].mean() - expect) < 0.1
    # Upsampled tokens really come out of the loader: long docs go from 2/3 to 6/7 of the tokens.
    loader = PackedLoader([Source("u", st, upsample_min_tokens=50, upsample_factor=3.0)], 100, batch_size=10)
    ids = torch.cat([next(loader)["input_ids"] for _ in range(40)])
    assert abs((ids > 10**5).double().mean().item() - 6000 / 7000) < 0.03
    with pytest.raises(ValueError, match="upsample_factor"):
        Source("u", st, upsample_factor=0.5)


def test_resume_gives_the_same_next_batches(stores):
    srcs = _sources(stores, (1, 1, 1), upsample_min_tokens=60, upsample_factor=2.0)
    ref = PackedLoader(srcs, seq_len=48, batch_size=2, seed=7)
    for _ in range(30):
        next(ref)
    ref.set_seq_len(96, batch_size=3)  # a curriculum stage change before the checkpoint
    for _ in range(5):
        next(ref)
    state = json.loads(json.dumps(ref.state_dict()))  # as trainer_state.json stores it
    expected = [next(ref) for _ in range(10)]
    ref.set_seq_len(128)
    expected += [next(ref) for _ in range(100)]  # enough to cross epoch ends of every source

    resumed = PackedLoader(srcs, seq_len=8, batch_size=1, seed=7)
    resumed.load_state_dict(state)
    got = [next(resumed) for _ in range(10)]
    resumed.set_seq_len(128)
    got += [next(resumed) for _ in range(100)]
    assert all(_equal(a, b) for a, b in zip(expected, got))
    assert resumed.state_dict() == ref.state_dict()
    assert all(epoch >= 1 for epoch, _ in ref.state_dict()["cursors"])


def test_resume_rejects_other_data(stores):
    state = PackedLoader(_sources(stores), 16, seed=0).state_dict()
    with pytest.raises(ValueError, match="sources"):
        PackedLoader(_sources(stores[:2], (1, 1)), 16, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        PackedLoader(_sources(stores), 16, seed=1).load_state_dict(state)


def test_distributed_shards_disjoint_and_covering(stores):
    world, sp, b, steps = 8, 2, 2, 25
    per_rank = {}
    for rank in range(world):
        loader = PackedLoader(_sources(stores), 32, b, seed=3, rank=rank, world_size=world, sp_size=sp)
        per_rank[rank] = [next(loader) for _ in range(steps)]
        assert loader.state_dict() == per_rank.setdefault("state", loader.state_dict())  # same on all ranks
    # Ranks of one sequence-parallel group see identical batches.
    for rank in range(0, world, sp):
        assert all(_equal(x, y) for x, y in zip(per_rank[rank], per_rank[rank + 1]))
    # Data-parallel ranks together = the single-process stream with the global batch, row for row.
    single = PackedLoader(_sources(stores), 32, b * world // sp, seed=3)
    for step in range(steps):
        whole = next(single)["input_ids"]
        parts = torch.cat([per_rank[r][step]["input_ids"] for r in range(0, world, sp)])
        assert torch.equal(parts, whole)
    tokens = [set(torch.cat([x["input_ids"] for x in per_rank[r]]).flatten().tolist())
              for r in range(0, world, sp)]
    for i in range(len(tokens)):
        for j in range(i + 1, len(tokens)):
            assert not tokens[i] & tokens[j]  # within an epoch no token goes to two ranks


def test_deterministic_given_seed(stores):
    a = PackedLoader(_sources(stores), 32, 2, seed=11)
    b = PackedLoader(_sources(stores), 32, 2, seed=11)
    c = PackedLoader(_sources(stores), 32, 2, seed=12)
    xa, xb, xc = ([next(ld) for _ in range(5)] for ld in (a, b, c))
    assert all(_equal(x, y) for x, y in zip(xa, xb))
    assert not all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(xa, xc))


def test_bad_arguments(stores):
    with pytest.raises(ValueError, match="not a multiple of sp_size"):
        PackedLoader(_sources(stores), 16, world_size=6, sp_size=4)
    with pytest.raises(ValueError, match="rank 4"):
        PackedLoader(_sources(stores), 16, rank=4, world_size=4)
    with pytest.raises(ValueError, match="unique"):
        PackedLoader([Source("a", stores[0]), Source("a", stores[1])], 16)
    with pytest.raises(ValueError, match="weight"):
        Source("a", stores[0], weight=0)
    with pytest.raises(ValueError, match="seq_len"):
        PackedLoader(_sources(stores), 0)


def test_resume_on_another_world_size(stores):
    single = PackedLoader(_sources(stores), 32, 4, seed=5)
    ranks = [PackedLoader(_sources(stores), 32, 1, seed=5, rank=r, world_size=4) for r in range(4)]
    for _ in range(6):
        assert torch.equal(torch.cat([next(ld)["input_ids"] for ld in ranks]), next(single)["input_ids"])
    state = ranks[0].state_dict()
    resumed = [PackedLoader(_sources(stores), 8, 1, seed=5, rank=r, world_size=2) for r in range(2)]
    for ld in resumed:
        ld.load_state_dict(state)
        ld.set_seq_len(32, batch_size=2)  # same global batch of 4 rows, now on 2 ranks
    for _ in range(6):
        assert torch.equal(torch.cat([next(ld)["input_ids"] for ld in resumed]), next(single)["input_ids"])
