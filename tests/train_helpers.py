"""Shared by the end-to-end tests of train.py: the small run they all use, launching it, reading its output,
and the single-process reference curve (computed once per test session)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline",
       "PYTHONPATH": str(ROOT)}
# A very small model for 16 steps in 2 stages, a checkpoint every 3 steps.
SMALL = [
    "logger=none", "progress=false", "final_eval.enabled=false", "model.arch.hidden_size=64",
    "model.arch.intermediate_size=128", "model.arch.num_hidden_layers=2", "model.arch.num_attention_heads=2",
    "model.arch.num_key_value_heads=2", "pattern.block_size=16", "curriculum.stages.0.seq_len=128",
    "curriculum.stages.0.steps=4", "curriculum.stages.1.seq_len=256", "curriculum.stages.1.steps=12",
    "batch.tokens_per_step=1024", "batch.micro_batch_tokens=256", "checkpoint.every=3",
]
TRAIN = [sys.executable, "train.py"]


def run(cmd: list[str], timeout: int = 240, env: dict | None = None, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=env or ENV, capture_output=True, text=True, timeout=timeout)
    if ok:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def latest(out: Path) -> str:
    return (out / "checkpoints" / "latest").read_text().strip()


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 180, what: str = "a condition") -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        assert proc.poll() is None, f"the run ended before {what}"
        time.sleep(0.01)
    raise TimeoutError(f"no {what} within {timeout} s")


def wait_for_steps(out: Path, proc: subprocess.Popen, steps: int, timeout: float = 180) -> None:
    path = out / "metrics.jsonl"
    wait_for(lambda: path.is_file() and len(path.read_text().splitlines()) >= steps, proc, timeout,
             f"{steps} steps")


def reference_run(tmp_path_factory) -> Path:
    """The single-process run of SMALL (16 steps), once per session, shared by every test module."""
    out = tmp_path_factory.getbasetemp() / "reference_run"
    if not (out / "checkpoints" / "latest").is_file():
        run([*TRAIN, *SMALL, f"output_dir={out}"])
    return out


def assert_same_curve(got: list[dict], want: list[dict], exact: bool = False) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want]
    losses = torch.tensor([r["loss"] for r in got], dtype=torch.float64)
    expected = torch.tensor([r["loss"] for r in want], dtype=torch.float64)
    tol = 0.0 if exact else 1e-5
    torch.testing.assert_close(losses, expected, rtol=tol, atol=tol)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    """The `error: ...` line a rejected run printed, asserting it is the only output of note."""
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]
