"""Checkpointer: layout, `latest` only after a complete write (also when the process dies mid-write),
keep-last-K rotation, RNG state round trip, and the resume rules (config signature, resume=none/path)."""

import json
import random
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from powerattn.training.checkpoint import Checkpointer, TrainerState, capture_rng, restore_rng
from powerattn.training.config import ConfigError, TrainConfig
from powerattn.training.distributed import Dist
from powerattn.training.metrics import truncate_jsonl
from powerattn.training.run import resolve_resume, signature

ROOT = Path(__file__).resolve().parents[1]


def _writer(folder: Path) -> None:
    (folder / "model").mkdir()
    (folder / "model" / "model.safetensors").write_bytes(b"weights")
    (folder / "engine").mkdir()


def test_save_layout_latest_and_rotation(tmp_path):
    ckpt = Checkpointer(tmp_path / "checkpoints", keep_last=2)
    assert ckpt.latest() is None
    for step in (10, 20, 30):
        path = ckpt.save(step, _writer, TrainerState(step=step))
        assert ckpt.latest() == path == tmp_path / "checkpoints" / f"step_{step:06d}"
        assert (path / "model" / "model.safetensors").is_file()
        assert Checkpointer.read_state(path).step == step
    assert [p.name for p in ckpt.complete()] == ["step_000020", "step_000030"]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_000030\n"
    ckpt.save(30, _writer, TrainerState(step=30, tokens=7))  # the same step again replaces it whole
    assert Checkpointer.read_state(ckpt.latest()).tokens == 7
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]


def test_a_failed_write_never_becomes_latest(tmp_path):
    ckpt = Checkpointer(tmp_path, keep_last=3)
    good = ckpt.save(1, _writer, TrainerState(step=1))

    def broken(folder: Path) -> None:
        _writer(folder)
        raise OSError("disk full")

    with pytest.raises(OSError):
        ckpt.save(2, broken, TrainerState(step=2))
    assert ckpt.latest() == good and ckpt.complete() == [good]
    ckpt.remove_partial()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_000001"]


def test_a_process_killed_mid_write_leaves_latest_on_the_previous_checkpoint(tmp_path):
    ckpt = Checkpointer(tmp_path, keep_last=3)
    good = ckpt.save(1, _writer, TrainerState(step=1))
    script = (
        "import os, sys; from pathlib import Path\n"
        "from powerattn.training.checkpoint import Checkpointer, TrainerState\n"
        "def die(folder):\n"
        "    (folder / 'model').mkdir(); (folder / 'model' / 'part').write_bytes(b'x'); os._exit(137)\n"
        f"Checkpointer(Path({str(tmp_path)!r}), 3).save(2, die, TrainerState(step=2))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 137, proc.stderr
    assert ckpt.latest() == good and ckpt.complete() == [good]
    assert (tmp_path / ".step_000002.partial").is_dir()
    ckpt.remove_partial()
    assert not (tmp_path / ".step_000002.partial").exists()


def test_latest_naming_an_incomplete_folder_is_ignored(tmp_path):
    (tmp_path / "step_000005").mkdir()
    (tmp_path / "latest").write_text("step_000005\n")
    assert Checkpointer(tmp_path, 1).latest() is None


def test_rng_states_round_trip_through_a_weights_only_load(tmp_path):
    torch.save(capture_rng(), tmp_path / "rng.pt")  # as in DeepSpeed's client_state
    state = torch.load(tmp_path / "rng.pt", weights_only=True)
    first = (random.random(), np.random.rand(), torch.rand(3))
    restore_rng(state)
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert first[:2] == again[:2] and torch.equal(first[2], again[2])


def _setup(tmp_path):
    cfg = TrainConfig(output_dir=str(tmp_path))
    cfg.curriculum.stages = []
    dist = Dist(0, 1, 0, torch.device("cpu"))
    ckpt = Checkpointer(tmp_path / "checkpoints", 2)
    return cfg, dist, ckpt


def test_resume_auto_continues_only_the_same_run(tmp_path):
    cfg, dist, ckpt = _setup(tmp_path)
    assert resolve_resume(cfg, ckpt, signature(cfg, dist)).path is None  # nothing yet: from scratch
    saved = ckpt.save(4, _writer, TrainerState(step=4, config=signature(cfg, dist)))
    resume = resolve_resume(cfg, ckpt, signature(cfg, dist))
    assert resume.path == saved and resume.state.step == 4 and not resume.changes
    changed = replace(cfg, optim=replace(cfg.optim, lr=1.0))
    with pytest.raises(ConfigError, match=r"optim\.lr: 0\.0003 -> 1\.0"):
        resolve_resume(changed, ckpt, signature(changed, dist))
    # Named explicitly, a checkpoint of another config is taken (a deliberate continuation).
    explicit = replace(changed, resume=str(saved))
    resume = resolve_resume(explicit, ckpt, signature(explicit, dist))
    assert resume.path == saved and resume.changes == ["optim.lr: 0.0003 -> 1.0"] and not resume.weights_only


def test_resume_none_and_bad_paths(tmp_path):
    cfg, dist, ckpt = _setup(tmp_path)
    ckpt.save(1, _writer, TrainerState(step=1, config=signature(cfg, dist)))
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        resolve_resume(replace(cfg, resume="none"), ckpt, signature(cfg, dist))
    with pytest.raises(ConfigError, match="resume: no folder at"):
        resolve_resume(replace(cfg, resume=str(tmp_path / "nowhere")), ckpt, signature(cfg, dist))


def test_zero_partitions_need_the_same_layout(tmp_path):
    cfg, dist, ckpt = _setup(tmp_path)
    cfg.deepspeed = {"zero_optimization": {"stage": 3}}
    ckpt.save(1, _writer, TrainerState(step=1, config=signature(cfg, dist)))
    two = Dist(0, 2, 0, torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"saved by 1 process\(es\).*this run has 2 .*launch 1 process\(es\), "
                                          "or add resume_optimizer=false"):
        resolve_resume(cfg, ckpt, signature(cfg, two))
    # Asked for, the weights alone continue on another layout (a fresh optimizer).
    resume = resolve_resume(replace(cfg, resume_optimizer=False), ckpt, signature(cfg, two))
    assert resume.weights_only and resume.weights == resume.path / "model"
    # Without ZeRO partitions the whole state loads into any layout, and the run is the same run.
    cfg.deepspeed = {}
    ckpt.save(2, _writer, TrainerState(step=2, config=signature(cfg, dist)))
    assert resolve_resume(cfg, ckpt, signature(cfg, two)).path.name == "step_000002"


def test_metrics_of_recomputed_steps_are_dropped_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 6)))
    truncate_jsonl(path, 3)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
