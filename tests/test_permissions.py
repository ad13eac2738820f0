"""What the project writes follows the user's umask (0644/0755 under the usual 022; 0640/0750 under 027, the
umask used here so that a hard-coded 0644 would show): checkpoints' model folders, the data caches (synthetic
corpus, tokenizer, tokenised stores) and `python -m data.prepare` outputs - not the 0700/0600 that temporary
folders and safetensors create."""

import json
import os
from pathlib import Path

import pytest

from powerattn.data import DataConfig, SyntheticConfig, build_loader
from powerattn.model import LlamaConfig, LlamaForCausalLM

UMASK = 0o027


@pytest.fixture
def umask_027():
    old = os.umask(UMASK)
    yield
    os.umask(old)


def _modes(root: Path) -> tuple[set[int], set[int]]:
    entries = [root, *root.rglob("*")]
    dirs = {p.stat().st_mode & 0o777 for p in entries if p.is_dir()}
    files = {p.stat().st_mode & 0o777 for p in entries if p.is_file() and not p.name.endswith(".lock")}
    return dirs, files


def test_model_folders_caches_and_prepared_data_follow_the_umask(tmp_path, umask_027):
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2))
    model.save_pretrained(str(tmp_path / "model"))
    assert _modes(tmp_path / "model") == ({0o750}, {0o640})

    cache = tmp_path / "cache"
    cfg = DataConfig(seq_len=64, cache_dir=str(cache),
                     synthetic=SyntheticConfig(num_docs=30, min_sentences=2, max_sentences=20, vocab_size=400))
    _, tokenizer = build_loader(cfg)
    stores = [p for p in (cache / "tokenized").iterdir()]
    assert stores and (cache / "synthetic").is_dir()
    for folder in [cache / "synthetic", *stores]:
        assert _modes(folder) == ({0o750}, {0o640}), folder

    from powerattn.data.prepare import main as prepare

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(5)))
    out = tmp_path / "prepared"
    assert prepare(["--input", str(corpus), "--tokenizer", tokenizer.path, "--seq-len", "64", "--output", str(out),
                    "--cache-dir", str(tmp_path / "prep_cache")]) == 0
    assert _modes(out) == ({0o750}, {0o640})
