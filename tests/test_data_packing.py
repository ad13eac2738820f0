"""Packing invariants: each token once and in order, boundaries, masked labels, positions, SP slices."""

import numpy as np
import pytest
import torch

from powerattn.data.loader import PackedLoader, Source
from powerattn.data.packing import IGNORE_INDEX, collate, flatten_batch, iter_packed
from powerattn.data.store import write_store
from powerattn.reference import document_positions
from powerattn.training.microbatch import make_microbatch


def _store(tmp_path, n_docs=120, seed=0, max_len=50, name="s"):
    # Unique token values (1..T) make loss or duplication of any token visible.
    rng = np.random.default_rng(seed)
    lens = rng.integers(1, max_len, n_docs)
    ids = np.arange(1, lens.sum() + 1)
    docs = np.split(ids, np.cumsum(lens)[:-1])
    return write_store(tmp_path / name, docs, vocab_size=1 << 20)


def _check_batch(batch, doc_starts: set, reset=True):
    ids, labels, pos, cu = batch["input_ids"], batch["labels"], batch["position_ids"], batch["cu_seqlens"]
    b, s = ids.shape
    assert ids.dtype == labels.dtype == pos.dtype == torch.int64 and cu.dtype == torch.int32
    flat = ids.flatten().tolist()
    cu_l = cu.tolist()
    # Boundaries: row edges, document starts (and padding), nothing else.
    expect = {0, b * s} | {r * s for r in range(b)} | {i for i, t in enumerate(flat) if t in doc_starts}
    pad_start = [i for i in range(b * s) if flat[i] == 0 and (i % s == 0 or flat[i - 1] != 0)]
    assert set(cu_l) == expect | set(pad_start) and cu_l == sorted(set(cu_l))
    assert batch["max_seqlen"] == max(np.diff(cu_l))
    # Labels: aligned with input_ids, -100 exactly at segment starts and on padding.
    lab = labels.flatten()
    starts = torch.zeros(b * s, dtype=torch.bool)
    starts[cu[:-1].long()] = True
    masked = starts | (ids.flatten() == 0)
    assert torch.equal(lab[~masked], ids.flatten()[~masked]) and (lab[masked] == IGNORE_INDEX).all()
    # Positions restart at every segment, exactly as the attention API derives them from cu_seqlens.
    if reset:
        _, expect_pos = document_positions(cu, b * s)
        assert torch.equal(pos.flatten(), expect_pos)
    else:
        assert torch.equal(pos, torch.arange(s).expand(b, s))


def test_collate_hand_made():
    rows = [[np.array([5, 6, 7]), np.array([8, 9])], [np.array([1, 2, 3, 4])], [np.array([3])]]
    b = collate(rows, 5, pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9], [1, 2, 3, 4, 0], [3, 0, 0, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7, -100, 9], [-100, 2, 3, 4, -100], [-100] + [-100] * 4]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0], [0, 0, 1, 2, 3]]
    assert b["cu_seqlens"].tolist() == [0, 3, 5, 9, 10, 11, 15] and b["max_seqlen"] == 4
    with pytest.raises(ValueError, match="more than seq_len"):
        collate([[np.arange(6)]], 5, pad_id=0)


def test_iter_packed_full_pass(tmp_path):
    st = _store(tmp_path)
    starts = set(st.tokens[st.doc_offsets[:-1]].tolist())
    seen = []
    for batch in iter_packed(st, seq_len=37, batch_size=4, pad_id=0):
        _check_batch(batch, starts)
        seen += [t for t in batch["input_ids"].flatten().tolist() if t]
    assert seen == list(range(1, st.num_tokens + 1))  # all, once, in document order


@pytest.mark.parametrize("reset", [True, False])
def test_loader_full_pass(tmp_path, reset):
    st = _store(tmp_path)
    starts = set(st.tokens[st.doc_offsets[:-1]].tolist())
    loader = PackedLoader([Source("s", st)], seq_len=64, batch_size=3, seed=1, reset_position_ids=reset)
    order = loader.epoch_order(0, 0)
    assert sorted(order.tolist()) == list(range(st.num_docs))
    stream = np.concatenate([st.doc(i) for i in order])
    seen = []
    while len(seen) < st.num_tokens + 64 * 3:
        batch = next(loader)
        _check_batch(batch, starts, reset)
        seen += batch["input_ids"].flatten().tolist()
    assert 0 not in seen  # an endless stream is never padded
    epoch0 = np.array(seen[: st.num_tokens])
    assert np.array_equal(epoch0, stream)  # the permuted documents, each whole and in order
    assert np.array_equal(np.sort(epoch0), np.arange(1, st.num_tokens + 1))
    assert set(seen[st.num_tokens :]) <= set(range(1, st.num_tokens + 1))  # then epoch 1 begins


def test_whole_documents_are_never_cut(tmp_path):
    """whole_documents: a document up to a row long lies whole in one row (the rest of the row before it
    is padding); a longer one is split at row starts only; every token still comes once and in order;
    a resumed loader continues the same stream."""
    st = write_store(tmp_path / "w", [np.arange(a, b) for a, b in
                                      [(1, 41), (41, 71), (71, 171), (171, 191), (191, 250), (250, 261)]],
                     vocab_size=1 << 20)
    starts = set(st.tokens[st.doc_offsets[:-1]].tolist())
    loader = PackedLoader([Source("s", st)], seq_len=64, batch_size=2, seed=3, whole_documents=True)
    stream = np.concatenate([st.doc(i) for i in loader.epoch_order(0, 0)]).tolist()
    seen, rows = [], []
    for _ in range(4):
        batch = next(loader)
        _check_batch(batch, starts)
        rows += batch["input_ids"].tolist()
    for row in rows:
        seen += [t for t in row if t]
        cu = [0] + [i for i in range(1, 64) if row[i] and (row[i] in starts or not row[i - 1])]
        for a, b in zip(cu, cu[1:] + [64]):
            piece = [t for t in row[a:b] if t]
            doc = next(st.doc(i).tolist() for i in range(st.num_docs) if piece and piece[0] in st.doc(i))
            if len(doc) <= 64:
                assert not piece or piece == doc  # whole, never cut at a row end
    assert seen[: st.num_tokens] == stream  # each token once, in order
    assert any(0 in row[1:] and row[-1] == 0 for row in rows)  # padding where a document did not fit
    state = loader.state_dict()
    again = PackedLoader([Source("s", st)], seq_len=64, batch_size=2, seed=3, whole_documents=True)
    again.load_state_dict(state)
    assert torch.equal(next(again)["input_ids"], next(loader)["input_ids"])


def test_long_document_split_keeps_order(tmp_path):
    st = write_store(tmp_path / "long", [np.arange(1, 301), np.arange(301, 311)], vocab_size=1 << 20)
    loader = PackedLoader([Source("s", st)], seq_len=64, batch_size=1, seed=0)
    rows = [next(loader) for _ in range(5)]
    flat = torch.cat([r["input_ids"].flatten() for r in rows]).tolist()
    i = flat.index(1)
    assert flat[i : i + 300] == list(range(1, 301))
    for r in rows:  # every continuation restarts positions at the row start
        assert r["position_ids"][0, 0] == 0 and r["labels"][0, 0] == IGNORE_INDEX


def test_flattened_batch_feeds_sparse_attention(tmp_path):
    import powerattn

    st = _store(tmp_path)
    batch = flatten_batch(next(PackedLoader([Source("s", st)], seq_len=40, batch_size=3)))
    assert batch["input_ids"].shape == (1, 120) and batch["cu_seqlens"][-1] == 120
    q = torch.randn(1, 120, 2, 8)
    pat = powerattn.make_pattern("power", block_size=4, window=2, sink=1)
    out = powerattn.sparse_attention(q, q, q, pat, cu_seqlens=batch["cu_seqlens"], backend="torch",
                                     max_seqlen=batch["max_seqlen"])
    assert out.shape == q.shape


def test_sequence_parallel_shards(tmp_path):
    st = _store(tmp_path)
    batch = next(PackedLoader([Source("s", st)], seq_len=64, batch_size=2))
    shards = [make_microbatch(batch, r, 4) for r in range(4)]
    assert torch.equal(torch.cat([s.input_ids for s in shards], dim=1), batch["input_ids"])
    assert torch.equal(torch.cat([s.documents.position_ids for s in shards], dim=1), batch["position_ids"])
    shift = torch.cat([s.targets for s in shards], dim=1)
    assert torch.equal(shift[:, :-1], batch["labels"][:, 1:]) and (shift[:, -1] == IGNORE_INDEX).all()
    assert all(s.documents.cu_seqlens is batch["cu_seqlens"] for s in shards)
    assert sum(s.num_targets for s in shards) == make_microbatch(batch).num_targets
    with pytest.raises(ValueError, match="not divisible"):
        make_microbatch(batch, 0, 3)
