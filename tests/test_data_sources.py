"""Sources via HF datasets: formats (compressed too), SlimPajama's layout and subsets, tokenisation cache,
streaming, num_proc, errors (missing paths vs hub ids), default data."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import powerattn.data.sources as sources_mod
from powerattn.data.build import build_loader
from powerattn.data.config import DataConfig, SourceConfig, SyntheticConfig
from powerattn.data.default import default_corpus, default_tokenizer
from powerattn.data.filler import Filler
from powerattn.data.sources import load_sources, tokenize_source
from powerattn.data.tokenizer import train_tokenizer

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


def test_side_by_side_runs_build_the_cache_once(tok, tmp_path):
    f, log = _jsonl(tmp_path / "d.jsonl", TEXTS), tmp_path / "builds.log"
    script = (
        "import time, powerattn.data.sources as s\n"
        "from powerattn.data.config import SourceConfig\nfrom powerattn.data.tokenizer import Tokenizer\n"
        "build = s.build_store\n"
        "def slow(*a, **k):\n"
        f"    open({str(log)!r}, 'a').write('build\\n'); time.sleep(1.5); return build(*a, **k)\n"
        "s.build_store = slow\n"
        f"(src,) = s.tokenize_source(SourceConfig(path={str(f)!r}), Tokenizer({str(tok.path)!r}), "
        f"{str(tmp_path / 'c')!r}, num_proc=2)\n"
        "print(src.store.num_docs)\n"
    )
    root = Path(__file__).resolve().parents[1]
    procs = [subprocess.Popen([sys.executable, "-c", script], cwd=root, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for _, e in outs]
    assert [o.strip() for o, _ in outs] == [str(len(TEXTS))] * 2
    assert log.read_text() == "build\n"  # the second waited for the first, then hit its cache


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

    from powerattn.data.config import as_data_config

    yaml = "seq_len: 8192\nsources: [{path: /d/web, weight: 2, upsample_min_tokens: 4096}]"
    cfg = as_data_config(OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.create(yaml)))
    assert cfg.seq_len == 8192 and isinstance(cfg.sources[0], SourceConfig) and cfg.sources[0].weight == 2
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['seqlen'\]"):
        as_data_config({"seqlen": 5})
    with pytest.raises(ValueError, match=r"data\.synthetic: unknown key\(s\) \['num_doc'\]"):
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


# ---- corpora as downloaded: compressed jsonl, SlimPajama's chunk layout and subsets, hub ids ----------

SETS = {"RedPajamaCommonCrawl": 0, "RedPajamaBook": 1, "RedPajamaArXiv": 2}


def slimpajama_layout(root, texts=TEXTS):
    """A miniature cerebras/SlimPajama-627B download: {train,validation}/chunk*/example_*.jsonl.zst."""
    import zstandard

    names = list(SETS)
    by_set = {n: [] for n in names}
    for split, chunks, files in (("train", 2, 2), ("validation", 1, 1)):
        for c in range(1, chunks + 1):
            for f in range(files):
                kind = "train" if split == "train" else "holdout"
                path = root / split / f"chunk{c}" / f"example_{kind}_{f}.jsonl.zst"
                path.parent.mkdir(parents=True, exist_ok=True)
                rows = []
                for i in range(6):
                    t = texts[(c * 7 + f * 13 + i * 3) % len(texts)] + (" holdout" if split != "train" else "")
                    name = names[(c + f + i) % len(names)]
                    rows.append({"text": t, "meta": {"redpajama_set_name": name}})
                    if split == "train":
                        by_set[name].append(t)
                lines = "".join(json.dumps(r) + "\n" for r in rows).encode()
                path.write_bytes(zstandard.ZstdCompressor().compress(lines))
    return by_set


@pytest.mark.parametrize("ext", [".gz", ".zst", ".bz2", ".xz"])
def test_compressed_jsonl(tok, tmp_path, ext):
    import bz2
    import gzip
    import lzma

    import zstandard

    compress = {".gz": gzip.compress, ".zst": zstandard.ZstdCompressor().compress, ".bz2": bz2.compress,
                ".xz": lzma.compress}[ext]
    data = "".join(json.dumps({"text": t}) + "\n" for t in TEXTS[:20]).encode()
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / f"part.jsonl{ext}").write_bytes(compress(data))
    want = [tok.encode_document(t) for t in TEXTS[:20]]
    (src,) = tokenize_source(SourceConfig(path=str(tmp_path / "in")), tok, tmp_path / "c")  # a folder of them
    assert src.name == "in" and _docs(src.store) == want
    glob_cfg = SourceConfig(path=str(tmp_path / "in" / f"*.jsonl{ext}"), name="s", streaming=True)
    assert _docs(tokenize_source(glob_cfg, tok, tmp_path / "c")[0].store) == want


def test_slimpajama_layout_through_its_config(tok, tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    from powerattn.data.config import as_data_config
    from powerattn.data.loader import PackedLoader

    by_set = slimpajama_layout(tmp_path / "SlimPajama-627B")
    monkeypatch.setenv("POWERATTN_DATA", str(tmp_path))  # the config's default root
    monkeypatch.delenv("SLIMPAJAMA", raising=False)
    yaml = OmegaConf.load(Path(__file__).resolve().parents[1] / "configs/data/slimpajama.yaml")
    yaml.tokenizer, yaml.cache_dir = tok.path, str(tmp_path / "cache")
    cfg = as_data_config(yaml)
    srcs = load_sources(cfg, tok)
    # One sub-source per RedPajama subset, train chunks only, weighted by tokens (SlimPajama's own mixture).
    want = {f"slimpajama/{n}": sorted(tok.encode_document(t) for t in ts) for n, ts in by_set.items()}
    assert {s.name: sorted(_docs(s.store)) for s in srcs} == want
    tokens = {s.name: s.store.num_tokens for s in srcs}
    assert all(abs(s.weight - tokens[s.name] / sum(tokens.values())) < 1e-9 for s in srcs)
    assert all(s.upsample_factor == 3.0 for s in srcs)
    assert next(PackedLoader(srcs, seq_len=64, batch_size=2))["input_ids"].shape == (2, 64)
    mapped = dataclasses.replace(cfg.sources[0], streaming=False, max_docs=None)  # datasets.map path: same stores
    assert {s.name: _docs(s.store) for s in tokenize_source(mapped, tok, tmp_path / "c2")} == \
        {s.name: _docs(s.store) for s in srcs}

    # Reweighted subsets (0 drops one) from the same cache: no re-tokenisation.
    monkeypatch.setattr(sources_mod, "build_groups", lambda *a, **k: pytest.fail("re-tokenised"))
    cfg.sources[0].group_weights = {"RedPajamaCommonCrawl": 3, "RedPajamaBook": 1, "RedPajamaArXiv": 0}
    assert {s.name: s.weight for s in load_sources(cfg, tok)} == {
        "slimpajama/RedPajamaCommonCrawl": 0.75, "slimpajama/RedPajamaBook": 0.25}
    cfg.sources[0].group_weights = {"RedPajamaCommonCrawl": 1, "RedPajamaBooks": 1}
    with pytest.raises(ValueError, match=r"not found: \['RedPajamaBooks'\]; without a weight: "
                                         r"\['RedPajamaArXiv', 'RedPajamaBook'\]"):
        load_sources(cfg, tok)


def test_group_by_errors(tok, tmp_path):
    with pytest.raises(ValueError, match="group_weights needs group_by"):
        SourceConfig(path="x", group_weights={"a": 1})
    with pytest.raises(ValueError, match="must be >= 0 with one > 0"):
        SourceConfig(path="x", group_by="meta.set", group_weights={"a": 0})
    f = _jsonl(tmp_path / "d.jsonl", TEXTS[:5])  # rows {"text", "n"}: no meta
    for streaming in (False, True):
        cfg = SourceConfig(path=str(f), group_by="meta.set", streaming=streaming)
        with pytest.raises(ValueError, match=r"group_by field 'meta.set' not found; columns are \['text', 'n'\]"):
            tokenize_source(cfg, tok, tmp_path / "c")
    from powerattn.data.sources import check_source

    with pytest.raises(ValueError, match="group_by field 'n.x' not found in the first document"):
        check_source(SourceConfig(path=str(f), group_by="n.x"))
    part = tmp_path / "part.jsonl"
    part.write_text(json.dumps({"text": "a", "meta": {"set": "A"}}) + "\n" + json.dumps({"text": "b", "meta": {}}))
    with pytest.raises(ValueError, match=r"part.jsonl.*group_by field 'meta.set' is missing or empty in a document"):
        tokenize_source(SourceConfig(path=str(part), group_by="meta.set"), tok, tmp_path / "c")
    assert not [p for p in (tmp_path / "c" / "tokenized").iterdir() if not p.name.startswith(".map")]


def test_missing_paths_are_not_hub_ids(tok, tmp_path, monkeypatch):
    import datasets

    calls = []
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)

    def hub(path, **kw):
        calls.append(path)
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub (LocalEntryNotFoundError)\nTraceback lines")

    monkeypatch.setattr(datasets, "load_dataset", hub)
    (tmp_path / "corpora").mkdir()
    for path in ("corpora/web", "corpora/web/part.jsonl", "web.jsonl.zst", "./web", "a/b/c", "corpus"):
        with pytest.raises(FileNotFoundError, match=f"no file or folder at '{path}'$"):
            tokenize_source(SourceConfig(path=path), tok, tmp_path / "c")
    assert calls == []  # none of these looked like a hub id
    with pytest.raises(FileNotFoundError) as e:  # owner/name: tried on the hub, failure on one line
        tokenize_source(SourceConfig(path="someone/corpus"), tok, tmp_path / "c")
    assert calls == ["someone/corpus"] and "\n" not in str(e.value)
    assert "no local file or folder at 'someone/corpus', and loading it as a hub dataset id failed: " \
           "Couldn't reach" in str(e.value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="'someone/corpus' .*offline mode is on, so it is not tried"):
        tokenize_source(SourceConfig(path="someone/corpus"), tok, tmp_path / "c")
    assert calls == ["someone/corpus"]
