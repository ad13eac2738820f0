"""wandb through train.py on CPU, offline: a run is written under the run folder, a resumed run logs to the same
run id (kept in trainer_state.json), and logger=none writes no wandb folder."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("wandb")

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
       "WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true"}
ENV.pop("WANDB_MODE", None)
TINY = [
    "progress=false", "final_eval.enabled=false", "model.arch.hidden_size=64", "model.arch.intermediate_size=128",
    "model.arch.num_hidden_layers=2", "model.arch.num_attention_heads=2", "model.arch.num_key_value_heads=2",
    "pattern.block_size=16", "curriculum.stages.0.seq_len=128", "curriculum.stages.0.steps=2",
    "curriculum.stages.1.seq_len=256", "curriculum.stages.1.steps=1", "batch.tokens_per_step=512",
    "batch.micro_batch_tokens=256", "checkpoint.every=0",
]

pytestmark = pytest.mark.slow


def _train(out: Path, *overrides: str) -> None:
    proc = subprocess.run([sys.executable, "train.py", *TINY, f"output_dir={out}", *overrides], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _state(out: Path, step: int) -> dict:
    return json.loads((out / "checkpoints" / f"step_{step:06d}" / "trainer_state.json").read_text())


def test_offline_run_and_resume_keep_one_run_id(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "STOP").touch()  # stop (with a checkpoint) after the first step, as a preempted job would
    _train(out, "logger=wandb", "logger.mode=offline")
    run_id = _state(out, 1)["wandb_id"]
    (first,) = (out / "wandb").glob(f"offline-run-*-{run_id}")
    assert (first / f"run-{run_id}.wandb").stat().st_size > 0
    _train(out, "logger=wandb", "logger.mode=offline")  # resume=auto continues the checkpoint
    assert _state(out, 3)["wandb_id"] == run_id
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(f"-{run_id}") for r in runs)  # `wandb sync` joins them
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_logger_none_writes_no_wandb_folder(tmp_path):
    out = tmp_path / "plain"
    _train(out, "logger=none", "curriculum.stages.0.steps=1")
    assert (out / "metrics.jsonl").is_file() and not (out / "wandb").exists()
    assert _state(out, 2)["wandb_id"] is None
