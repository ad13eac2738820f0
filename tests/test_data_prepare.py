"""`python -m data.prepare` end to end on a folder of jsonl files, and the loader on its output."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from powerattn.data.config import SourceConfig
from powerattn.data.filler import Filler
from powerattn.data.loader import PackedLoader
from powerattn.data.prepare import main
from powerattn.data.sources import tokenize_source
from powerattn.data.tokenizer import train_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("prep")
    tok = train_tokenizer([Filler(i).text(20) for i in range(30)], 400, d / "tokenizer.model")
    texts = {}
    for name, n in (("web", 40), ("books", 8)):
        long = name == "books"
        texts[name] = [Filler(i + 1000 * long).text(5 + (200 if long else i)) for i in range(n)]
        (d / name).mkdir()
        for part in range(2):
            with open(d / name / f"part{part}.jsonl", "w") as f:
                for t in texts[name][part::2]:
                    f.write(json.dumps({"text": t, "meta": part}) + "\n")
    return d, tok, texts


def _run(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "data.prepare", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("module", ["data.prepare", "powerattn.data.prepare"])
def test_checkout_and_installed_entry_points(module):
    # data/prepare.py is a shim for a checkout; an installed powerattn has only powerattn.data.prepare.
    r = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and f"usage: python -m {module} " in r.stdout, r.stderr


def test_prepare_cli_end_to_end(corpus):
    d, tok, texts = corpus
    out = d / "out"
    r = _run("--input", d / "web", "--input", f"{d / 'books'}/*.jsonl", "--tokenizer", tok.path,
             "--seq-len", 256, "--output", out, "--num-proc", 2)
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    counts = {s["name"]: s["tokens"] for s in manifest["sources"]}
    want = {n: sum(len(tok.encode_document(t)) for t in ts) for n, ts in texts.items()}
    assert counts == want and manifest["seq_len"] == 256 and manifest["tokenizer"] == tok.hash
    for name, n in want.items():  # the per-source token report
        assert any(line.startswith(name) and f"{n:,}" in line for line in r.stdout.splitlines()), r.stdout
    assert (out / "tokenizer.model").read_bytes() == Path(tok.path).read_bytes()
    assert not [p for p in d.iterdir() if p.name.startswith(".")]  # no temporary folders left

    # The prepared folder is a source: it expands to its stores, no tokenisation, any seq_len.
    srcs = tokenize_source(SourceConfig(path=str(out)), tok, d / "cache")
    assert {s.name: s.store.num_tokens for s in srcs} == want
    assert abs(sum(s.weight for s in srcs) - 1.0) < 1e-9
    loader = PackedLoader(srcs, seq_len=512, batch_size=2, pad_id=tok.pad_id)
    total = sum(want.values())
    seen = torch.cat([next(loader)["input_ids"].flatten() for _ in range(total // 1024 + 1)])
    assert seen.numel() >= total and int(seen.max()) < tok.vocab_size
    assert not (d / "cache").exists()

    # Existing output is refused (exit 2) unless --overwrite.
    r = _run("--input", d / "web", "--tokenizer", tok.path, "--seq-len", 64, "--output", out)
    assert r.returncode == 2 and "exists" in r.stderr
    r = _run("--input", d / "web", "--tokenizer", tok.path, "--seq-len", 64, "--output", out, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert [s["name"] for s in json.loads((out / "manifest.json").read_text())["sources"]] == ["web"]


def test_prepare_errors_leave_nothing(corpus, capsys):
    d, tok, _ = corpus
    cases = [
        (["--input", d / "missing"], "no file or folder"),
        (["--input", d / "web", "--text-field", "body"], "text field 'body' not found"),
        (["--input", d / "web", "--input", d / "web"], "collide"),
        (["--input", d / "web", "--seq-len", 0], "--seq-len"),
        (["--input", d / "web", "--tokenizer", d / "nope.model"], "nope.model"),
    ]
    for args, msg in cases:
        full = ["--tokenizer", tok.path, "--seq-len", 64, "--output", d / "bad", *args]
        assert main([str(a) for a in full]) == 2
        assert msg in capsys.readouterr().err, args
        assert not (d / "bad").exists()
    assert not [p for p in d.iterdir() if p.name.startswith(".")]


def test_prepare_slimpajama_chunks_split_by_subset(corpus, tmp_path, capsys):
    from test_data_sources import slimpajama_layout

    _, tok, _ = corpus
    by_set = slimpajama_layout(tmp_path / "sp")
    out = tmp_path / "out"
    chunks = f"slimpajama={tmp_path}/sp/train/chunk*/example_train_*.jsonl.zst"
    args = ["--input", chunks, "--group-by", "meta.redpajama_set_name", "--tokenizer", tok.path, "--seq-len", 64,
            "--output", out, "--num-proc", 1]
    assert main([str(a) for a in args]) == 0
    report = capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    want = {n: sum(len(tok.encode_document(t)) for t in ts) for n, ts in by_set.items()}
    assert {s["group"]: s["tokens"] for s in manifest["sources"]} == want
    assert {s["dir"] for s in manifest["sources"]} == {f"slimpajama/{n}" for n in want}
    assert all(f"slimpajama/{n}" in report for n in want)

    # The prepared folder as a source: its subsets weighted by group_weights.
    weights = {"RedPajamaCommonCrawl": 2, "RedPajamaBook": 1, "RedPajamaArXiv": 1}
    cfg = SourceConfig(path=str(out), name="sp", group_by="meta.redpajama_set_name", group_weights=weights)
    srcs = tokenize_source(cfg, tok, tmp_path / "cache")
    assert {s.name: s.weight for s in srcs} == {f"sp/slimpajama/{n}": w / 4 for n, w in weights.items()}
    assert not (tmp_path / "cache").exists()
