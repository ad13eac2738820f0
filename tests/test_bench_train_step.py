"""bench/train_step.py --smoke runs on CPU and writes its table, JSON and PNG (so the script cannot rot)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_train_step", ROOT / "bench" / "train_step.py")
train_step = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_step)


def test_smoke_run_writes_json_png_and_table(tmp_path):
    cmd = [sys.executable, "bench/train_step.py", "--smoke", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "train_step_smoke.json").read_text())
    rows = data["rows"]
    assert [r["pattern"] for r in rows] == train_step.PATTERNS
    full = next(r for r in rows if r["pattern"] == "full")
    assert full["density"] == 1.0 and full["speedup_vs_full"] == 1.0
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["step_ms"] > 0 and r["loss"] == r["loss"]
        assert r["mfu"] is None  # no peak FLOP/s on a CPU
    power = next(r for r in rows if r["pattern"] == "power")
    assert power["density"] < 1 and power["flops_per_token"] < full["flops_per_token"]
    assert data["meta"]["backend"] == "torch"
    assert data["meta"]["command"].startswith("python bench/train_step.py --smoke")
    png = tmp_path / "train_step_smoke.png"
    assert png.stat().st_size > 5000 and png.read_bytes()[:4] == b"\x89PNG"
    assert "tokens/s" in proc.stdout and "power" in proc.stdout


@pytest.mark.parametrize("name,peak", [("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0),
                                       ("NVIDIA H200", 989.4), ("NVIDIA A100-SXM4-80GB", 312.0),
                                       ("NVIDIA L4", 121.0), ("Some Future GPU", None)])
def test_peak_table(name, peak):
    assert train_step.peak_tflops(name) == peak


def test_presets_build_valid_configs():
    for name in train_step.MODELS:
        cfg = train_step.model_config(name, 32768, checkpointing=True)
        assert cfg.max_position_embeddings >= 32768 and cfg.activation_checkpointing is True
    one_b = train_step.model_config("llama-3.2-1b", 32768, checkpointing=False)
    assert (one_b.hidden_size, one_b.num_hidden_layers, one_b.head_dim) == (2048, 16, 64)
