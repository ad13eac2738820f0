"""Checkpoints: `checkpoints/step_NNNNNN/{model/, engine/, trainer_state.json}` and `checkpoints/latest`.

A checkpoint is written into a hidden `.step_NNNNNN.partial` folder, renamed into place once every
rank has finished, and only then named by `latest` (written atomically). A crash at any moment
therefore leaves `latest` on the previous complete checkpoint; leftover partial folders are removed
at the next start. The newest `keep_last` complete checkpoints are kept. Ranks must share a file
system (every rank writes its own DeepSpeed shards).
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

LATEST = "latest"
STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


@dataclass
class TrainerState:
    """Everything besides weights and optimizer that an exact resume needs (JSON)."""

    step: int = 0                       # optimizer steps done
    stage: int = 0
    tokens: int = 0                     # tokens consumed, all ranks (skipped steps included)
    skipped_steps: int = 0              # steps without an optimizer update (non-finite loss)
    nonfinite_in_row: int = 0
    loader: dict = field(default_factory=dict)
    rng: dict = field(default_factory=dict)
    wandb_id: str | None = None
    config: dict = field(default_factory=dict)  # the training-relevant config sections (resume check)


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a).tobytes()).decode()


def _unb64(s: str, dtype) -> np.ndarray:
    return np.frombuffer(base64.b64decode(s), dtype=dtype)


def capture_rng() -> dict:
    """Python, numpy and torch (CPU + current CUDA device) RNG states, JSON-encodable."""
    version, internal, gauss = random.getstate()
    name, key, pos, has_gauss, cached = np.random.get_state()
    out = {"python": [version, _b64(np.array(internal, dtype=np.uint32)), gauss],
           "numpy": [name, _b64(key), int(pos), int(has_gauss), float(cached)],
           "torch": _b64(torch.get_rng_state().numpy())}
    if torch.cuda.is_available():
        out["cuda"] = _b64(torch.cuda.get_rng_state().numpy())
    return out


def restore_rng(state: dict) -> None:
    """Inverse of capture_rng (a no-op for an empty dict)."""
    if not state:
        return
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(int(x) for x in _unb64(internal, np.uint32)), gauss))
    name, key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, _unb64(key, np.uint32).copy(), pos, has_gauss, cached))
    torch.set_rng_state(torch.from_numpy(_unb64(state["torch"], np.uint8).copy()))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.from_numpy(_unb64(state["cuda"], np.uint8).copy()))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself survives a power loss
    finally:
        os.close(fd)


class Checkpointer:
    """Save, publish, rotate and find checkpoints under `root` (the run's checkpoints/ folder)."""

    def __init__(self, root: str | os.PathLike, keep_last: int, rank: int = 0,
                 barrier: Callable[[], None] = lambda: None):
        self.root, self.keep_last, self.rank, self.barrier = Path(root), keep_last, rank, barrier

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir()
                 if (m := _STEP_DIR.match(p.name)) and (p / STATE_FILE).is_file()]
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        """The checkpoint `latest` names, if it is complete."""
        pointer = self.root / LATEST
        if not pointer.is_file():
            return None
        path = self.root / pointer.read_text().strip()
        return path if (path / STATE_FILE).is_file() else None

    def remove_partial(self) -> None:
        """Delete folders of checkpoints that were interrupted while being written (rank 0)."""
        if self.rank == 0 and self.root.is_dir():
            for p in self.root.glob(".step_*.partial"):
                shutil.rmtree(p, ignore_errors=True)
        self.barrier()

    def save(self, step: int, write: Callable[[Path], None], state: TrainerState) -> Path:
        """Write checkpoint `step`: every rank runs `write(folder)` (model/, engine/); rank 0 adds
        trainer_state.json, renames the folder into place, points `latest` at it and rotates."""
        name = step_dir_name(step)
        final, partial = self.root / name, self.root / f".{name}.partial"
        if self.rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        self.barrier()
        write(partial)
        self.barrier()
        if self.rank == 0:
            _write_atomic(partial / STATE_FILE, json.dumps(asdict(state), indent=1))
            if final.exists():  # the same step saved again (e.g. a finished run re-saved): swap it out
                old = self.root / f".{name}.old"
                shutil.rmtree(old, ignore_errors=True)
                os.rename(final, old)
                os.rename(partial, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(partial, final)
            _write_atomic(self.root / LATEST, name + "\n")
            self._rotate(final)
        self.barrier()
        return final

    def _rotate(self, newest: Path) -> None:
        keep = self.complete()[-self.keep_last:]
        for p in self.complete():
            if p not in keep and p != newest:
                shutil.rmtree(p, ignore_errors=True)

    @staticmethod
    def read_state(path: str | os.PathLike) -> TrainerState:
        with open(Path(path) / STATE_FILE) as f:
            return TrainerState(**json.load(f))


def write_checkpoint(folder: Path, engine, lm, tokenizer, save_dtype: str | None,
                     max_shard_size: str) -> None:
    """model/ (HF safetensors + tokenizer) and engine/ (DeepSpeed: weights, optimizer, LR schedule).

    Every rank calls this: under ZeRO-3 the HF save gathers one parameter at a time and every rank
    writes its own optimizer partition.
    """
    dtype = getattr(torch, save_dtype) if save_dtype else None
    lm.save_pretrained(str(folder / "model"), max_shard_size=max_shard_size, dtype=dtype)
    if torch.distributed.get_rank() == 0:  # a model built from scratch has no source folder to copy it from
        tokenizer.save(folder / "model")
    engine.save_checkpoint(str(folder), tag="engine", save_latest=False)


def load_checkpoint(engine, folder: Path) -> None:
    """Restore weights, optimizer and LR scheduler from `folder/engine`."""
    path, _ = engine.load_checkpoint(str(folder), tag="engine", load_optimizer_states=True,
                                     load_lr_scheduler_states=True)
    if path is None:
        raise FileNotFoundError(f"no DeepSpeed state under {folder / 'engine'}")
