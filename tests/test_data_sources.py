"""Sources via HF datasets: formats, tokenisation cache, streaming, num_proc, errors, default data."""

import json

import numpy as np
import pytest

import data.sources as sources_mod
from data.build import build_loader
from data.config import DataConfig, SourceConfig, SyntheticConfig
from data.default import default_corpus, default_tokenizer
from data.filler import Filler
from data.sources import load_sources, tokenize_source
from data.tokenizer import train_tokenizer

TEXTS = [Filler(i).text(1 + i % 9) for i in range(60)]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer(TEXTS, 400, tmp_path_factory.mktemp("tok") / "tokenizer.model")


def _jsonl(path, texts, field="text"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({field: t, "n": i}) + "\n" for i, t in enumerate(texts)))
    return path


def _docs(store):
    return [store.doc(i).tolist() for i in range(store.num_docs)]


def test_jsonl_folder_tokenised_as_documents(tok, tmp_path):
    _jsonl(tmp_path / "in" / "a.jsonl", TEXTS[:30])
    _jsonl(tmp_path / "in" / "sub" / "b.jsonl", TEXTS[30:])
    (src,) = tokenize_source(SourceConfig(path=str(tmp_path / "in"), weight=2.0), tok, tmp_path / "c")
    assert src.name == "in" and src.weight == 2.0
    assert _docs(src.store) == [tok.encode_document(t) for t in TEXTS]  # [BOS] text [EOS], file order


def test_other_formats(tok, tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"body": TEXTS[:20]})
    ds.to_parquet(str(tmp_path / "x.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "txt").mkdir()
    for i, t in enumerate(TEXTS[:3]):
        (tmp_path / "txt" / f"book{i}.txt").write_text(t + "\nsecond line\n")
    want = [tok.encode_document(t) for t in TEXTS[:20]]
    for path in ("x.parquet", "saved"):
        cfg = SourceConfig(path=str(tmp_path / path), text_field="body")
        (src,) = tokenize_source(cfg, tok, tmp_path / "c")
        assert _docs(src.store) == want
    (src,) = tokenize_source(SourceConfig(path=str(tmp_path / "txt" / "*.txt")), tok, tmp_path / "c")
    assert src.store.num_docs == 3  # one document per .txt file, newlines kept
    assert tok.decode(src.store.doc(0)).startswith(TEXTS[0] + "\nsecond line")


def test_cache_hit_on_second_run(tok, tmp_path, monkeypatch):
    f = _jsonl(tmp_path / "d.jsonl", TEXTS)
    (first,) = tokenize_source(SourceConfig(path=str(f)), tok, tmp_path / "c", num_proc=2)
    monkeypatch.setattr(sources_mod, "build_store", lambda *a, **k: pytest.fail("re-tokenised"))
    (second,) = tokenize_source(SourceConfig(path=str(f)), tok, tmp_path / "c")
    assert second.store.path == first.store.path and _docs(second.store) == _docs(first.store)
    # Nothing but the store is left in the cache (the datasets.map files are gone).
    assert [p.name for p in (tmp_path / "c" / "tokenized").iterdir()] == [first.store.path.name]
    monkeypatch.undo()
    _jsonl(f, TEXTS[:10])  # the file changed: new key, re-tokenised
    (third,) = tokenize_source(SourceConfig(path=str(f)), tok, tmp_path / "c")
    assert third.store.path != first.store.path and third.store.num_docs == 10


def test_num_proc_and_streaming_agree(tok, tmp_path):
    f = _jsonl(tmp_path / "d.jsonl", TEXTS)
    one = tokenize_source(SourceConfig(path=str(f)), tok, tmp_path / "c1")[0].store
    two = tokenize_source(SourceConfig(path=str(f)), tok, tmp_path / "c2", num_proc=2)[0].store
    streamed = tokenize_source(SourceConfig(path=str(f), streaming=True), tok, tmp_path / "c3")[0].store
    assert _docs(one) == _docs(two) == _docs(streamed)
    assert np.array_equal(one.doc_offsets, two.doc_offsets)
    head = tokenize_source(SourceConfig(path=str(f), streaming=True, max_docs=7), tok, tmp_path / "c4")[0]
    assert _docs(head.store) == _docs(one)[:7]


def test_clear_errors(tok, tmp_path):
    c = tmp_path / "c"
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        tokenize_source(SourceConfig(path=str(tmp_path / "missing.jsonl")), tok, c)
    with pytest.raises(FileNotFoundError, match=r"glob .*nothing/\*\.jsonl.* matches no files"):
        tokenize_source(SourceConfig(path=str(tmp_path / "nothing" / "*.jsonl")), tok, c)
    f = _jsonl(tmp_path / "body.jsonl", TEXTS[:3], field="body")
    with pytest.raises(ValueError, match=r"text field 'text' not found; columns are \['body', 'n'\]"):
        tokenize_source(SourceConfig(path=str(f)), tok, c)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty.jsonl.*empty"):
        tokenize_source(SourceConfig(path=str(tmp_path / "empty.jsonl")), tok, c)
    (tmp_path / "nums.jsonl").write_text('{"text": 5}\n')
    with pytest.raises(TypeError, match="nums.jsonl.*'text' holds int"):
        tokenize_source(SourceConfig(path=str(tmp_path / "nums.jsonl")), tok, c)
    (tmp_path / "mixed").mkdir()
    _jsonl(tmp_path / "mixed" / "a.jsonl", TEXTS[:2])
    (tmp_path / "mixed" / "b.txt").write_text("x")
    with pytest.raises(ValueError, match="mixes file types"):
        tokenize_source(SourceConfig(path=str(tmp_path / "mixed")), tok, c)
    with pytest.raises(ValueError, match="unknown key"):
        load_sources(DataConfig(sources=[{"path": "x", "wieght": 2}]), tok)
    assert not list(c.glob("tokenized/*")) or all(not p.name.startswith(".") for p in c.glob("tokenized/*"))


def test_config_from_yaml_and_typos():
    from omegaconf import OmegaConf

    from data.config import as_data_config

    yaml = "seq_len: 8192\nsources: [{path: /d/web, weight: 2, upsample_min_tokens: 4096}]"
    cfg = as_data_config(OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.create(yaml)))
    assert cfg.seq_len == 8192 and isinstance(cfg.sources[0], SourceConfig) and cfg.sources[0].weight == 2
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['seqlen'\]"):
        as_data_config({"seqlen": 5})
    with pytest.raises(ValueError, match="data.synthetic: unknown key"):
        as_data_config({"synthetic": {"num_doc": 5}})


def test_embedded_default_end_to_end(tmp_path, monkeypatch):
    cfg = DataConfig(seq_len=128, cache_dir=str(tmp_path / "cache"), synthetic=SyntheticConfig(num_docs=60))
    loader, tok = build_loader(cfg, batch_size=2)
    batch = next(loader)
    assert batch["input_ids"].shape == (2, 128) and int(batch["input_ids"].max()) < tok.vocab_size
    text = tok.decode(batch["input_ids"][0].tolist())
    assert "." in text and "  " not in text
    # Second build: corpus, tokenizer and token store all come from the cache.
    monkeypatch.setattr(sources_mod, "build_store", lambda *a, **k: pytest.fail("re-tokenised"))
    loader2, tok2 = build_loader(cfg, batch_size=2)
    assert tok2.hash == tok.hash and _equal_batch(next(loader2), batch)
    # Reproducible from scratch (nodes with node-local caches must agree on token ids).
    other = DataConfig(seq_len=128, cache_dir=str(tmp_path / "other"), synthetic=SyntheticConfig(num_docs=60))
    assert default_corpus(other.cache_dir, other.synthetic).read_bytes() == default_corpus(
        cfg.cache_dir, cfg.synthetic).read_bytes()
    assert default_tokenizer(other.cache_dir, other.synthetic).hash == tok.hash


def _equal_batch(a, b):
    return all((a[k] == b[k]).all() if hasattr(a[k], "shape") else a[k] == b[k] for k in a)
