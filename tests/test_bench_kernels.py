"""bench/kernels.py --smoke on CPU (the torch backend at tiny sizes), so the benchmark script cannot rot."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_kernels_bench_smoke_writes_rows_and_plot(tmp_path):
    subprocess.run([sys.executable, "bench/kernels.py", "--smoke", "--out", str(tmp_path)], cwd=ROOT, check=True,
                   capture_output=True, timeout=300)
    result = json.loads((tmp_path / "kernels.json").read_text())
    assert [r["seq_len"] for r in result["rows"]] == [256, 512]
    assert all(r["triton"]["fwd"] > 0 and r["triton"]["bwd"] > 0 for r in result["rows"])
    assert result["decode"] == [] and (tmp_path / "kernels.png").stat().st_size > 0
