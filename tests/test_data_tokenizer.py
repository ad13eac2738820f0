"""Sentencepiece wrapper and trainer: round trips, BOS/EOS conventions, hashing, clear errors."""

import json

import pytest

from data.filler import Filler
from data.tokenizer import Tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = [Filler(i).text(50) for i in range(40)] + ["VAR ABCDE = 12345. The pass key is 67890."]
    return train_tokenizer(texts, 400, tmp_path_factory.mktemp("tok") / "tokenizer.model")


def test_llama_layout_and_round_trip(tok):
    assert (tok.sp.unk_id(), tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.pad_id == tok.eos_id  # no pad piece: padding reuses EOS (never labelled)
    text = "The quiet river  sang.\nThe pass key is 90210.\n\nVAR QWXYZ = VAR ABCDE ~ ü"
    ids = tok.encode(text, bos=False)
    assert tok.decode(ids) == text  # identity normalisation + byte fallback: exact
    digits = tok.encode("90210", bos=False)
    assert len([i for i in digits if tok.sp.id_to_piece(i).strip("▁")]) == 5  # digits split


def test_document_wrapping(tok):
    doc = tok.encode_document("A river sang.")
    assert doc[0] == tok.bos_id and doc[-1] == tok.eos_id
    assert tok.encode("A river sang.") == doc[:-1]  # add_bos by default, no EOS
    assert tok.encode_batch(["A river sang.", "x"], eos=True)[0] == doc
    assert tok.decode(doc) == "A river sang."


def test_from_pretrained_folder_reads_tokenizer_config(tok, tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(open(tok.path, "rb").read())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))
    t2 = Tokenizer.from_pretrained(tmp_path)
    assert not t2.add_bos and t2.encode_document("x")[0] != t2.bos_id
    assert t2.hash != tok.hash  # same model, different document convention: different cache key
    assert Tokenizer(tok.path).hash == tok.hash


def test_vocab_too_large_falls_back(tmp_path):
    t = train_tokenizer(["tiny corpus of words"] * 5, 5000, tmp_path / "t.model")
    assert 0 < t.vocab_size < 5000


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model"):
        Tokenizer(tmp_path / "nope.model")
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        Tokenizer(tmp_path)
    with pytest.raises(ValueError, match="vocab_size=100 is too small"):
        train_tokenizer(["some words"], 100, tmp_path / "t.model")
    with pytest.raises(ValueError, match="no non-empty text"):
        train_tokenizer(["", "\n"], 100, tmp_path / "t.model")
