"""eval.py end to end on a tiny random checkpoint: results.json schema and a PNG for every task,
perplexity against the model's own loss, the layered receptive field, and errors before any work."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from powerattn import make_pattern, receptive_field
from powerattn.data import IGNORE_INDEX, default_tokenizer, flatten_batch, iter_packed, write_store
from powerattn.evaluation.coverage import layered_coverage
from powerattn.evaluation.perplexity import run_perplexity
from powerattn.evaluation.runner import SCHEMA, run
from powerattn.model import LlamaConfig, LlamaForCausalLM, from_pretrained, next_token_targets

ROOT = Path(__file__).resolve().parents[1]
TOP_KEYS = {"schema", "task", "checkpoint", "model", "attention", "environment", "config", "task_config",
            "elapsed_s", "plot", "summary", "results"}
RESULT_KEYS = {
    "passkey": {"lengths", "depths", "samples", "digits", "accuracy", "accuracy_by_length",
                "accuracy_by_depth", "mean_accuracy", "records"},
    "ruler": {"lengths", "samples", "tasks", "scores", "average", "records"},
    "ppl": {"mode", "buckets", "tokens_per_length", "corpus", "lengths", "per_length"},
    "receptive_field": {"length", "layers", "samples", "theory", "measured", "agreement", "reference",
                        "records"},
}
SUMMARY_KEYS = {
    "passkey": {"mean_accuracy", "accuracy_by_length"},
    "ruler": {"average", "average_by_length"},
    "ppl": {"ppl_by_length"},
    "receptive_field": {"coverage", "layers_to_full", "mean_accuracy", "accuracy_where_reachable",
                        "accuracy_where_unreachable"},
}
SMALL = {
    "passkey": ["task.lengths=[160,320]", "task.depths=3", "task.samples=2"],
    "ruler": ["task.lengths=[256,384]", "task.samples=2"],
    "ppl": ["task.lengths=[128,256]", "task.tokens_per_length=1024", "task.buckets=4"],
    "receptive_field": ["task.length=512", "task.depths=4", "task.samples=2"],
}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("data_cache")


@pytest.fixture(scope="module")
def tokenizer(cache):
    return default_tokenizer(cache)


def make_checkpoint(path: Path, tokenizer, schedule=None) -> Path:
    cfg = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, bos_token_id=tokenizer.bos_id,
                      eos_token_id=tokenizer.eos_id)
    model = LlamaForCausalLM(cfg, make_pattern("power", block_size=32), attention_schedule=schedule)
    model.save_pretrained(str(path))
    shutil.copy(tokenizer.path, path / "tokenizer.model")
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", tokenizer)


def compose_cfg(overrides):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        return compose(config_name="eval", overrides=overrides)


def check_outputs(out: Path, task: str) -> dict:
    res = json.loads((out / "results.json").read_text())
    assert set(res) == TOP_KEYS
    assert res["schema"] == SCHEMA and res["task"] == task
    assert set(res["results"]) == RESULT_KEYS[task]
    assert set(res["summary"]) == SUMMARY_KEYS[task]
    assert res["config"]["task"]["name"] == task
    png = out / res["plot"]
    assert png.name == f"{task}.png" and png.stat().st_size > 5000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*tmp*"))
    return res


def test_cli_passkey_writes_results_and_heatmap(checkpoint, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "eval.py", f"checkpoint={checkpoint}", "task=passkey", f"output_dir={out}",
           "batch_size=3", "progress=false", *SMALL["passkey"]]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = check_outputs(out, "passkey")
    r = res["results"]
    assert r["depths"] == [0.0, 0.5, 1.0] and r["lengths"] == [160, 320]
    assert len(r["records"]) == 2 * 3 * 2 and len(r["accuracy"]) == 2 and len(r["accuracy"][0]) == 3
    assert res["attention"]["source"] == "checkpoint" and res["attention"]["pattern"]["name"] == "power"
    assert (out / ".hydra" / "config.yaml").is_file()


@pytest.mark.parametrize("task", ["ruler", "ppl", "receptive_field"])
def test_task_writes_results_and_png(task, checkpoint, cache, tmp_path):
    extra = [f"task.cache_dir={cache}"] if task == "ppl" else []
    cfg = compose_cfg([f"checkpoint={checkpoint}", f"task={task}", f"output_dir={tmp_path}", "batch_size=4",
                       "progress=false", *SMALL[task], *extra])
    run(cfg)
    res = check_outputs(tmp_path, task)
    r = res["results"]
    if task == "ruler":
        assert set(r["scores"]) == {"niah_multikey", "variable_tracking"}
        assert all(0 <= s <= 1 for s in r["average"])
    if task == "ppl":
        assert [x["length"] for x in r["per_length"]] == [128, 256]
        assert all(x["tokens"] > 0 and x["ppl"] > 1 for x in r["per_length"])
        assert r["corpus"][0]["name"] == "heldout_synthetic"
    if task == "receptive_field":
        assert len(r["theory"]["coverage_by_layer"]) == 3 and len(r["measured"]["accuracy"]) == 4
        assert r["theory"]["num_blocks"] == 512 // 32


def test_pattern_override_and_hybrid_checkpoint(tokenizer, tmp_path):
    ckpt = make_checkpoint(tmp_path / "hybrid", tokenizer, schedule=[1])
    pattern = "pattern={name: sliding_window, window: 2}"
    cfg = compose_cfg([f"checkpoint={ckpt}", "task=receptive_field", f"output_dir={tmp_path / 'a'}",
                       "progress=false", pattern, *SMALL["receptive_field"]])
    res = check_outputs(run(cfg).parent, "receptive_field")
    att = res["attention"]
    assert att["source"] == "override" and att["full_attention_layers"] == [1]  # hybrid layers kept
    assert att["pattern"] == {"name": "sliding_window", "block_size": 32, "window": 2, "sink": 1}
    assert res["summary"]["coverage"] == 1.0 and res["summary"]["layers_to_full"] == 2
    cfg = compose_cfg([f"checkpoint={ckpt}", "task=passkey", f"output_dir={tmp_path / 'b'}", "progress=false",
                       "pattern=full", "attention_schedule=sparse", *SMALL["passkey"]])
    att = check_outputs(run(cfg).parent, "passkey")["attention"]
    assert att["pattern"]["name"] == "full" and att["full_attention_layers"] == []
    # A configs/pattern option (the training group: name, params and schedule).
    if (ROOT / "configs" / "pattern" / "sliding_window_hybrid.yaml").is_file():
        cfg = compose_cfg([f"checkpoint={ckpt}", "task=passkey", f"output_dir={tmp_path / 'd'}",
                           "progress=false", "pattern=sliding_window_hybrid", "pattern.block_size=32",
                           *SMALL["passkey"]])
        att = check_outputs(run(cfg).parent, "passkey")["attention"]
        assert att["pattern"]["name"] == "sliding_window" and att["full_attention_layers"] == [2]
    # The same form written inline: {name, schedule, **params}.
    cfg = compose_cfg([f"checkpoint={ckpt}", "task=passkey", f"output_dir={tmp_path / 'c'}", "progress=false",
                       "pattern={name: power, window: 3, schedule: [0]}", *SMALL["passkey"]])
    att = check_outputs(run(cfg).parent, "passkey")["attention"]
    assert att["key"] == "power(block_size=32,window=3,sink=1)" and att["full_attention_layers"] == [0]


def test_layered_coverage_matches_receptive_field():
    pat = make_pattern("sliding_window", block_size=16, window=2, sink=0)
    plain = layered_coverage(pat, [], 4, 1024)
    assert plain["coverage_by_layer"] == receptive_field(pat, 1024, 4).coverage
    assert plain["reachable_by_block"][-5:] == [True] * 5 and not plain["reachable_by_block"][0]
    hybrid = layered_coverage(pat, [2], 4, 1024)
    assert hybrid["coverage_by_layer"][:2] == plain["coverage_by_layer"][:2]
    assert hybrid["coverage_by_layer"][2:] == [1.0, 1.0] and hybrid["layers_to_full"] == 3


@pytest.mark.parametrize("mode", ["documents", "concat"])
def test_perplexity_equals_the_model_loss(checkpoint, tokenizer, mode, tmp_path):
    docs = [tokenizer.encode_document("The quiet river slept again. " * n) for n in (3, 30, 11, 50, 7)]
    store = write_store(tmp_path / "store", docs, tokenizer.vocab_size)
    model = from_pretrained(checkpoint)
    res = run_perplexity(model, tokenizer, [64], [store], tokens_per_length=10_000, buckets=4, mode=mode,
                         batch_size=2, progress=False)
    row = res["per_length"][0]
    assert row["tokens"] == sum(b["tokens"] for b in row["buckets"])
    mean_of_buckets = sum(b["loss"] * b["tokens"] for b in row["buckets"]) / row["tokens"]
    assert mean_of_buckets == pytest.approx(row["loss"], rel=1e-6)
    # The same rows through the model's own loss: the token-weighted mean of its per-batch means.
    total, count = 0.0, 0
    for batch in iter_packed(store, 64, 2, tokenizer.pad_id, reset_position_ids=mode == "documents"):
        if mode == "documents":
            batch = flatten_batch(batch)
            cu = batch["cu_seqlens"]
        else:
            cu = None
        with torch.no_grad():
            loss = model(batch["input_ids"], labels=batch["labels"], cu_seqlens=cu)
        n = int((next_token_targets(batch["labels"], cu) != IGNORE_INDEX).sum())
        total, count = total + float(loss) * n, count + n
    assert row["tokens"] == count
    assert row["loss"] == pytest.approx(total / count, rel=1e-4)


@pytest.mark.parametrize("overrides,error,match", [
    (["checkpoint=/nonexistent/model"], FileNotFoundError, "config.json"),
    (["task.lenghts=[128]"], Exception, "lenghts"),
    (["task.lengths=[16]"], ValueError, "too short"),
    (["pattern={name: nopattern}"], ValueError, "unknown pattern"),
    (["task=ruler", "+task.tasks.bogus={}"], ValueError, "unknown task"),
    (["task=ppl", "task.mode=sideways"], ValueError, "mode"),
    (["dtype=float8"], ValueError, "dtype"),
    (["backend=cuda_magic"], ValueError, "backend"),
    (["attention_schedule=hybrid:9/7"], ValueError, "attention_schedule"),
])
def test_bad_config_fails_before_writing(checkpoint, tmp_path, overrides, error, match):
    out = tmp_path / "never"
    base = [f"checkpoint={checkpoint}", f"output_dir={out}", "progress=false"]
    with pytest.raises(error, match=match):
        run(compose_cfg(base + overrides))
    assert not out.exists()
