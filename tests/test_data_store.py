"""Token stores: atomic publication, interrupted builds never look complete, concurrent builders."""

import numpy as np
import pytest

from powerattn.data.store import StoreWriter, TokenStore, write_store


def test_round_trip_and_dtypes(tmp_path):
    docs = [[1, 2, 3], [4], [5, 6]]
    st = write_store(tmp_path / "a", docs, vocab_size=32000)
    assert st.tokens.dtype == np.uint16 and st.num_docs == 3 and st.num_tokens == 6
    assert [st.doc(i).tolist() for i in range(3)] == docs
    big = write_store(tmp_path / "b", [[70000, 1]], vocab_size=128256)  # Llama-3-sized vocabularies
    assert big.tokens.dtype == np.uint32 and big.doc(0).tolist() == [70000, 1]


def test_interrupted_build_is_not_a_cache_hit(tmp_path):
    with pytest.raises(RuntimeError), StoreWriter(tmp_path / "s", 100, {"name": "s"}) as w:
        w.add_docs([[1, 2, 3]])
        raise RuntimeError("killed mid-build")
    assert not TokenStore.is_complete(tmp_path / "s") and list(tmp_path.iterdir()) == []
    with pytest.raises(FileNotFoundError, match="incomplete"):
        TokenStore(tmp_path / "s")


def test_concurrent_builders_publish_one_store(tmp_path):
    w1 = StoreWriter(tmp_path / "s", 100, {"name": "s"})
    w2 = StoreWriter(tmp_path / "s", 100, {"name": "s"})
    for w in (w1, w2):
        w.add_docs([[1, 2], [3]])
    a, b = w1.commit(), w2.commit()  # the second finds the first's complete store and discards its own
    assert a.path == b.path and b.num_tokens == 3
    assert [p.name for p in tmp_path.iterdir()] == ["s"]


def test_empty_store_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="'e'.*empty"), StoreWriter(tmp_path / "e", 100, {"name": "e"}) as w:
        w.commit()
    assert list(tmp_path.iterdir()) == []
