"""bench/vs_hf.py --smoke runs on CPU and writes its JSON and table (so the script cannot rot)."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_vs_hf", ROOT / "bench" / "vs_hf.py")
vs_hf = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = vs_hf  # its dataclasses look their module up there
_spec.loader.exec_module(vs_hf)


def test_smoke_run_writes_json_and_table(tmp_path):
    pytest.importorskip("transformers")
    cmd = [sys.executable, "bench/vs_hf.py", "--smoke", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "vs_hf_smoke.json").read_text())
    meta, rows = data["meta"], data["rows"]
    assert meta["command"].startswith("python bench/vs_hf.py --smoke")
    assert {"torch", "triton", "transformers", "liger-kernel"} <= meta["versions"].keys()
    assert meta["versions"]["torch"] and meta["date"] and meta["device"]
    assert [r["name"] for r in rows] == vs_hf.NAMES and {r["seq_len"] for r in rows} == {256}
    by_name = {r["name"]: r for r in rows}
    for r in rows:
        if r["liger"]:  # no CUDA here: Liger rows are recorded, not run
            assert r["status"] == "skipped" and "CUDA" in r["reason"]
            continue
        assert r["status"] == "ok", r
        assert r["tokens_per_s"] > 0 and r["step_ms"] > 0 and len(r["step_ms_all"]) == meta["steps"]
        assert abs(r["loss"] - math.log(512)) < 1.0  # random init: near uniform over the smoke vocabulary
        assert r["speed_x_hf_sdpa"] == pytest.approx(r["tokens_per_s"] / by_name["hf_sdpa"]["tokens_per_s"])
        assert "speed_x_hf_liger" not in r and "peak_memory_gib" not in r and r["mfu"] is None
    assert by_name["full_kernel"]["attention_backend"] == "torch"
    assert by_name["full_sdpa"]["attention_backend"] == "sdpa"
    assert by_name["power"]["flops_per_token"] < by_name["full_kernel"]["flops_per_token"]
    assert "tokens/s" in proc.stdout and "skipped: Liger" in proc.stdout


def test_hf_liger_rows_run_after_every_other_row():
    order = vs_hf.plan(vs_hf.ROWS, [8192, 32768])
    liger_hf = [i for i, (r, _) in enumerate(order) if r.impl == "hf" and r.liger]
    assert liger_hf == list(range(len(order) - 2, len(order)))
    assert [n for _, n in order[:len(vs_hf.ROWS) - 1]] == [8192] * (len(vs_hf.ROWS) - 1)


def test_ratios_against_both_hf_baselines():
    def ok(name, tps, mem):
        return {"name": name, "seq_len": 8, "status": "ok", "tokens_per_s": tps, "peak_memory_gib": mem,
                "tflops": tps / 100, "step_ms": 8e3 / tps}

    rows = [ok("hf_sdpa", 10.0, 40.0), ok("hf_sdpa_liger", 20.0, 20.0), ok("power", 50.0, 10.0),
            {"name": "full_sdpa", "seq_len": 8, "status": "oom"}]
    vs_hf.add_ratios(rows, peak=1.0, measured_peak=0.5)
    power = rows[2]
    assert power["speed_x_hf_sdpa"] == 5.0 and power["speed_x_hf_liger"] == 2.5
    assert power["memory_x_hf_sdpa"] == 0.25 and power["memory_x_hf_liger"] == 0.5
    assert power["mfu"] == 0.5 and power["mfu_measured_peak"] == 1.0
    assert "speed_x_hf_sdpa" not in rows[3]
    assert "oom" in vs_hf.table(rows)
