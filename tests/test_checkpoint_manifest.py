"""Manifests: what a checkpoint records, how damage is found (sizes always, hashes by default), what resume,
from_pretrained, eval.py and `python -m powerattn.training.verify` do with a damaged checkpoint, permissions
that follow the umask, pickles loaded weights_only, and SIGTERM arriving while a checkpoint is written."""

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from powerattn import manifest
from powerattn.manifest import MANIFEST, ManifestError
from powerattn.model import CheckpointError, LlamaConfig, LlamaForCausalLM, from_pretrained
from powerattn.training.checkpoint import Checkpointer, TrainerState, load_checkpoint
from powerattn.training.config import ConfigError, TrainConfig
from powerattn.training.distributed import Dist
from powerattn.training.run import resolve_resume, resume_point, signature
from powerattn.training.verify import main as verify_main

ROOT = Path(__file__).resolve().parents[1]
CPU = Dist(0, 1, 0, torch.device("cpu"))


def _writer(folder: Path) -> None:
    (folder / "model").mkdir()
    (folder / "model" / "model.safetensors").write_bytes(b"weights" * 100)
    (folder / "engine").mkdir()
    (folder / "engine" / "mp_rank_00_model_states.pt").write_bytes(b"optimizer" * 100)


def _flip(path: Path) -> None:
    """Damage a file without changing its size (only a hash finds it)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))


def _run(tmp_path, steps=(3, 6), keep=3):
    cfg = TrainConfig(output_dir=str(tmp_path))
    cfg.curriculum.stages = []
    ckpt = Checkpointer(tmp_path / "checkpoints", keep)
    for step in steps:
        ckpt.save(step, _writer, TrainerState(step=step, config=signature(cfg, CPU)))
    return cfg, ckpt


def test_a_checkpoint_records_every_file_and_verifies(tmp_path):
    _, ckpt = _run(tmp_path, steps=(3,))
    folder = ckpt.latest()
    files = manifest.read_manifest(folder)
    assert sorted(files) == ["engine/mp_rank_00_model_states.pt", "model/model.safetensors", "trainer_state.json"]
    assert files["model/model.safetensors"]["size"] == 700 and len(files["trainer_state.json"]["sha256"]) == 64
    manifest.verify(folder)
    assert ckpt.check(folder) == [] and ckpt.complete() == [folder]


@pytest.mark.parametrize("damage, level, found", [
    (lambda f: os.truncate(f / "engine/mp_rank_00_model_states.pt", 10), "size",
     "engine/mp_rank_00_model_states.pt has 10 bytes, the manifest says 900"),
    (lambda f: _flip(f / "model/model.safetensors"), "hash",
     "model/model.safetensors does not match its recorded sha256"),
    (lambda f: (f / "model/model.safetensors").unlink(), "size", "model/model.safetensors is missing"),
    (lambda f: (f / MANIFEST).write_text("{not json"), "size", "manifest.json is unreadable"),
    (lambda f: (f / MANIFEST).unlink(), "size", "has no manifest.json"),
])
def test_damage_is_found(tmp_path, damage, level, found):
    _, ckpt = _run(tmp_path, steps=(3,))
    folder = ckpt.latest() or tmp_path / "checkpoints" / "step_000003"
    damage(folder)
    assert any(found in p for p in ckpt.check(folder, level)), ckpt.check(folder, level)
    with pytest.raises(ManifestError, match="damaged|manifest"):
        manifest.verify(folder, level)
    if level == "hash":  # a size check does not read the bytes
        assert ckpt.check(folder, "size") == []


def test_work_is_split_evenly_and_the_same_everywhere():
    sizes = {"a": 100, "b": 60, "c": 50, "d": 10, "e": 1}
    parts = manifest.split_work(sizes, 2)
    assert sorted(sum(parts, [])) == sorted(sizes) and parts == manifest.split_work(dict(reversed(sizes.items())), 2)
    assert abs(sum(sizes[n] for n in parts[0]) - sum(sizes[n] for n in parts[1])) <= 20


def test_resume_auto_falls_back_past_a_damaged_newest_checkpoint(tmp_path):
    cfg, ckpt = _run(tmp_path)
    current = signature(cfg, CPU)
    os.truncate(tmp_path / "checkpoints/step_000006/engine/mp_rank_00_model_states.pt", 10)
    resume = resolve_resume(cfg, ckpt, current, level="size")
    assert resume.path.name == "step_000003" and resume.state.step == 3
    assert len(resume.warnings) == 1 and "step_000006 is damaged: engine/mp_rank_00_model_states.pt has 10 bytes" \
        in resume.warnings[0] and resume.warnings[0].endswith("resuming from step_000003 instead")
    # Only a hash finds a flipped byte; `latest` is pointed at the checkpoint taken.
    _flip(tmp_path / "checkpoints/step_000003/model/model.safetensors")
    ckpt.save(9, _writer, TrainerState(step=9, config=current))
    (tmp_path / "checkpoints/step_000009/trainer_state.json").write_text("{bad")  # the raw JSON error before
    assert resolve_resume(cfg, ckpt, current, level="size").path.name == "step_000003"
    with pytest.raises(ConfigError, match=r"^resume=auto: no intact checkpoint in .*step_000009 is damaged: "
                                          r"trainer_state.json has 4 bytes") as e:
        resume_point(cfg, ckpt, CPU)
    assert "\n" not in str(e.value)
    ckpt.save(12, _writer, TrainerState(step=12, config=current))
    os.truncate(tmp_path / "checkpoints/step_000012/model/model.safetensors", 1)
    ckpt.save(15, _writer, TrainerState(step=15, config=current))
    (tmp_path / "checkpoints/latest").write_text("step_000018\n")  # names a folder that is gone
    resume = resolve_resume(cfg, ckpt, current)
    assert resume.path.name == "step_000015" and "names step_000018, which does not exist" in resume.warnings[0]


def test_resume_point_repoints_latest_at_the_checkpoint_it_takes(tmp_path, capsys):
    cfg, ckpt = _run(tmp_path)
    _flip(tmp_path / "checkpoints/step_000006/trainer_state.json")
    assert resume_point(cfg, ckpt, CPU).path.name == "step_000003"
    assert ckpt.latest().name == "step_000003"
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("warning: ") and "trainer_state.json does not match" in err[0]


def test_an_explicit_damaged_checkpoint_is_a_one_line_error(tmp_path):
    cfg, ckpt = _run(tmp_path)
    folder = tmp_path / "checkpoints/step_000006"
    _flip(folder / "engine/mp_rank_00_model_states.pt")
    with pytest.raises(ConfigError, match=r"^resume: .*step_000006 is damaged: engine/mp_rank_00_model_states.pt "
                                          r"does not match .*python -m powerattn.training.verify"):
        resolve_resume(replace(cfg, resume=str(folder)), ckpt, signature(cfg, CPU))
    (folder / MANIFEST).unlink()  # not sealed (or saved before manifests existed)
    with pytest.raises(ConfigError, match="has no manifest.json"):
        resolve_resume(replace(cfg, resume=str(folder)), ckpt, signature(cfg, CPU), level="none")


@pytest.mark.parametrize("umask, dirs, files", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_checkpoints_follow_the_umask(tmp_path, umask, dirs, files):
    import tempfile

    def private_writer(folder: Path) -> None:  # what mkdtemp and safetensors do: 0700 / 0600
        tempfile.mkdtemp(dir=folder, prefix="model")
        fd = os.open(folder / "engine.pt", os.O_CREAT | os.O_WRONLY, 0o600)
        os.close(fd)

    old = os.umask(umask)
    try:
        folder = Checkpointer(tmp_path / "ck", 1).save(1, private_writer, TrainerState(step=1))
    finally:
        os.umask(old)
    entries = [folder, *folder.rglob("*")]
    assert len(entries) == 5  # the folder, model*/, engine.pt, trainer_state.json, manifest.json
    assert {p.stat().st_mode & 0o777 for p in entries if p.is_dir()} == {dirs}
    assert {p.stat().st_mode & 0o777 for p in entries if p.is_file()} == {files}
    assert (tmp_path / "ck/latest").stat().st_mode & 0o777 == files


def _model_checkpoint(tmp_path) -> Path:
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2))
    step = tmp_path / "step_000001"
    step.mkdir()
    model.save_pretrained(str(step / "model"))
    (step / "trainer_state.json").write_text("{}")
    manifest.seal(step)
    return step / "model"


def test_from_pretrained_and_eval_check_the_manifest(tmp_path):
    model_dir = _model_checkpoint(tmp_path)
    # save_pretrained: mkdtemp (0700) and safetensors (0600) no longer make the folder private.
    assert model_dir.stat().st_mode & 0o777 == manifest.umask_mode(0o777)
    assert {p.stat().st_mode & 0o777 for p in model_dir.iterdir()} == {manifest.umask_mode(0o666)}
    from_pretrained(model_dir)
    _flip(model_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model is damaged: model/model.safetensors does not match"):
        from_pretrained(model_dir)
    from_pretrained(model_dir, verify="size")  # sizes only: the flipped byte goes unseen (documented)
    os.truncate(model_dir / "model.safetensors", 100)
    proc = subprocess.run([sys.executable, "eval.py", f"checkpoint={model_dir}", "task=passkey",
                           f"output_dir={tmp_path / 'eval'}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {model_dir} is damaged: model/model.safetensors has 100 bytes, the manifest says "
        f"{manifest.read_manifest(model_dir.parent)['model/model.safetensors']['size']}")


def test_verify_cli_checks_a_run_and_seals_an_old_checkpoint(tmp_path, capsys):
    _run(tmp_path)
    assert verify_main([str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [f"ok       {tmp_path}/checkpoints/step_000003", f"ok       {tmp_path}/checkpoints/step_000006",
                   "latest   step_000006"]
    _flip(tmp_path / "checkpoints/step_000006/model/model.safetensors")
    assert verify_main([str(tmp_path), "--level", "size"]) == 0
    assert verify_main([str(tmp_path / "checkpoints")]) == 1
    out = capsys.readouterr().out.splitlines()
    assert "DAMAGED  " in out[-2] and out[-1] == "latest   step_000006  (not an intact checkpoint)"
    old = tmp_path / "checkpoints/step_000003"
    (old / MANIFEST).unlink()
    assert verify_main([str(old)]) == 1
    assert verify_main(["--seal", str(old)]) == 0 and verify_main([str(old)]) == 0
    assert verify_main(["--seal", str(old)]) == 2  # sealed already


def test_engine_pickles_load_weights_only(tmp_path):
    """DeepSpeed's own classes load; any other pickled object is refused, not run."""

    class Engine:  # what load_checkpoint uses of a DeepSpeed engine
        def __init__(self):
            from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

            self.checkpoint_engine = TorchCheckpointEngine()

        def load_checkpoint(self, folder, tag, **kw):
            for f in sorted(Path(folder, tag).glob("*.pt")):
                self.loaded = self.checkpoint_engine.load(str(f), map_location="cpu")
            return folder, {}

    from deepspeed.runtime.zero.config import ZeroStageEnum

    (tmp_path / "engine").mkdir()
    torch.save({"zero_stage": ZeroStageEnum.weights, "w": torch.ones(2)}, tmp_path / "engine" / "a.pt")
    engine = Engine()
    load_checkpoint(engine, tmp_path)
    assert engine.loaded["zero_stage"] == ZeroStageEnum.weights
    torch.save({"evil": subprocess.Popen}, tmp_path / "engine" / "b.pt")  # a global outside the allowed list
    with pytest.raises(CheckpointError, match=r"b.pt: torch.load\(weights_only=True\) refuses it \(it pickles \S*Popen"
                                              r".*checkpoint.weights_only=false"):
        load_checkpoint(engine, tmp_path)
    load_checkpoint(engine, tmp_path, weights_only=False)  # the user's explicit trust
    assert "load" not in engine.checkpoint_engine.__dict__  # DeepSpeed's own loader is back


SIGTERM_MID_WRITE = """
import os, signal, sys
from pathlib import Path
from powerattn.training.checkpoint import Checkpointer, TrainerState
from powerattn.training.preemption import StopRequest
root = Path(sys.argv[1])
if sys.argv[2] == "handled":
    stop = StopRequest(root / "STOP")
def write(folder):
    (folder / "model").mkdir()
    (folder / "model" / "a.bin").write_bytes(b"x" * 1000)
    os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-write
    (folder / "model" / "b.bin").write_bytes(b"y" * 1000)
Checkpointer(root, 3).save(2, write, TrainerState(step=2))
print(stop.reason)
"""


def test_sigterm_during_a_checkpoint_write(tmp_path):
    """Handled (train.py): the write completes and becomes latest, the stop comes after. Unhandled (the
    process dies mid-write, as with kill -9): latest stays on the previous checkpoint."""
    for mode in ("handled", "default"):
        root = tmp_path / mode
        ckpt = Checkpointer(root, 3)
        ckpt.save(1, _writer, TrainerState(step=1))
        proc = subprocess.run([sys.executable, "-c", SIGTERM_MID_WRITE, str(root), mode], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
        if mode == "handled":
            assert proc.returncode == 0 and proc.stdout.strip() == "SIGTERM", proc.stderr
            assert ckpt.latest().name == "step_000002" and ckpt.check(ckpt.latest()) == []
            assert json.loads((root / "step_000002/trainer_state.json").read_text())["step"] == 2
        else:
            assert proc.returncode == -15, proc.stderr
            assert ckpt.latest().name == "step_000001" and ckpt.check(ckpt.latest()) == []
            assert (root / ".step_000002.partial").is_dir()
            ckpt.remove_partial()
            assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000001"]
