"""Checkpoints: `checkpoints/step_NNNNNN/{model/, engine/, trainer_state.json, manifest.json}` and
`checkpoints/latest`.

A checkpoint is written into a hidden `.step_NNNNNN.partial` folder; when every rank has finished,
its files get the umask's permissions and `manifest.json` (size + sha256 of every file, hashed by all
ranks in parallel) is written last; the folder is renamed into place and only then named by `latest`
(written atomically). A crash at any moment therefore leaves `latest` on the previous complete
checkpoint; leftover partial folders are removed at the next start. Resuming checks a checkpoint
against its manifest first (`check`). The newest `keep_last` complete checkpoints are kept. Ranks
must share a file system (every rank writes its own DeepSpeed shards).
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from powerattn import manifest
from powerattn.atomic import atomic_write, replace_dir
from powerattn.manifest import MANIFEST, ManifestError
from powerattn.model import CheckpointError
from powerattn.training.distributed import Dist

LATEST = "latest"
STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


@dataclass
class TrainerState:
    """Everything besides weights, optimizer and RNG states (engine/, see write_checkpoint) that an exact
    resume needs (JSON)."""

    step: int = 0                       # optimizer steps done
    stage: int = 0
    tokens: int = 0                     # tokens consumed, all ranks (skipped steps included)
    skipped_steps: int = 0              # steps without an optimizer update (non-finite loss)
    nonfinite_in_row: int = 0
    loader: dict = field(default_factory=dict)
    wandb_id: str | None = None
    config: dict = field(default_factory=dict)  # the training-relevant config sections (resume check)


def capture_rng() -> dict:
    """Python, numpy and torch (CPU + current CUDA device) RNG states, as tensors and plain values: what
    DeepSpeed's client_state holds and torch.load(weights_only=True) reads back."""
    version, internal, gauss = random.getstate()
    name, key, pos, has_gauss, cached = np.random.get_state()
    out = {"python": [version, torch.tensor(internal, dtype=torch.int64), gauss],
           "numpy": [name, torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
           "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def restore_rng(state: dict) -> None:
    """Inverse of capture_rng (a no-op for an empty dict)."""
    if not state:
        return
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal.tolist()), gauss))
    name, key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _solo() -> Dist:
    return Dist(0, 1, 0, torch.device("cpu"))


def step_of(path: Path) -> int | None:
    m = _STEP_DIR.match(Path(path).name)
    return int(m.group(1)) if m else None


class Checkpointer:
    """Save, seal, publish, rotate, find and check checkpoints under `root` (the run's checkpoints/ folder).

    `dist` gives the rank, barriers and the object collectives that spread hashing over ranks; without
    one, the calling process does everything (tests, tools, the checks before distributed init).
    """

    def __init__(self, root: str | os.PathLike, keep_last: int, dist: Dist | None = None):
        self.root, self.keep_last, self.dist = Path(root), keep_last, dist or _solo()
        self.rank = self.dist.rank

    def complete(self) -> list[Path]:
        """Sealed checkpoints (manifest written; not yet checked against it), oldest first."""
        if not self.root.is_dir():
            return []
        found = [(step, p) for p in self.root.iterdir()
                 if (step := step_of(p)) is not None and (p / MANIFEST).is_file()]
        return [p for _, p in sorted(found)]

    def pointer(self) -> Path | None:
        """The folder `latest` names (whatever its state), or None without a readable `latest`."""
        try:
            name = (self.root / LATEST).read_text().strip()
        except (OSError, UnicodeDecodeError):
            return None
        return self.root / name if _STEP_DIR.match(name) else None

    def latest(self) -> Path | None:
        """The checkpoint `latest` names, if it is sealed."""
        path = self.pointer()
        return path if path is not None and (path / MANIFEST).is_file() else None

    def candidates(self) -> list[Path]:
        """What resume=auto tries, in order: the checkpoint `latest` names, then older sealed ones, newest first."""
        named = self.pointer()
        older = [p for p in reversed(self.complete()) if p != named]
        if named is not None:
            older = [p for p in older if step_of(p) < step_of(named)]
        return ([named] if named is not None and named.is_dir() else []) + older

    def remove_partial(self) -> None:
        """Delete folders of checkpoints that were interrupted while being written or replaced (rank 0)."""
        if self.rank == 0 and self.root.is_dir():
            for p in [*self.root.glob(".step_*.partial"), *self.root.glob(".step_*.old")]:
                shutil.rmtree(p, ignore_errors=True)
        self.dist.barrier()

    def save(self, step: int, write: Callable[[Path], None], state: TrainerState) -> Path:
        """Write checkpoint `step`: every rank runs `write(folder)` (model/, engine/); rank 0 adds
        trainer_state.json; all ranks hash the files; rank 0 writes the manifest, renames the folder
        into place, points `latest` at it and rotates."""
        name = step_dir_name(step)
        final, partial = self.root / name, self.root / f".{name}.partial"
        if self.rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        self.dist.barrier()
        write(partial)
        self.dist.barrier()
        if self.rank == 0:
            atomic_write(partial / STATE_FILE, json.dumps(asdict(state), indent=1))
        self._seal(partial)
        if self.rank == 0:
            replace_dir(partial, final)  # the same step saved again (a finished run re-saved): swapped out
            self.point_latest(final)
            self._rotate(final)
        self.dist.barrier()
        return final

    def point_latest(self, path: Path) -> None:
        """Name `path` in `latest` (atomically; rank 0)."""
        if self.rank == 0:
            atomic_write(self.root / LATEST, path.name + "\n")

    def _seal(self, folder: Path) -> None:
        """Permissions per umask, then manifest.json: rank 0 lists the files, every rank hashes a share."""
        sizes = None
        if self.rank == 0:
            manifest.publish_permissions(folder)
            sizes = manifest.list_files(folder)
        sizes = self.dist.broadcast_object(sizes)
        mine = manifest.split_work(sizes, self.dist.world_size)[self.rank]
        digests = {}
        for part in self.dist.gather_object(manifest.hash_files(folder, mine)):
            digests.update(part)
        if self.rank == 0:
            manifest.write_manifest(folder, {n: {"size": sizes[n], manifest.ALGORITHM: digests[n]}
                                             for n in sizes})

    def check(self, path: Path, level: str = "hash") -> list[str]:
        """What is wrong with checkpoint `path` (empty: intact) at `level` (hash | size | none).

        Collective when a Dist was given: rank 0 reads the manifest and checks sizes, then every rank
        hashes a share of the files; every rank returns the same answer.
        """
        problems, files = [], {}
        if self.rank == 0:
            try:
                files = manifest.read_manifest(path)
                problems = manifest.size_problems(path, files) if level != "none" else []
                if not problems and STATE_FILE not in files:
                    problems = [f"its manifest does not list {STATE_FILE}"]
            except ManifestError as e:
                problems = [str(e).removeprefix(f"{path} ")]
        problems, files = self.dist.broadcast_object((problems, files))
        if problems or level != "hash":
            return problems
        mine = manifest.split_work({n: e["size"] for n, e in files.items()}, self.dist.world_size)[self.rank]
        found = manifest.hash_problems(path, files, mine)
        return sorted(p for part in self.dist.gather_object(found) for p in part)

    def _rotate(self, newest: Path) -> None:
        keep = self.complete()[-self.keep_last:]
        for p in self.complete():
            if p not in keep and p != newest:
                shutil.rmtree(p, ignore_errors=True)

    @staticmethod
    def read_state(path: str | os.PathLike) -> TrainerState:
        """trainer_state.json of checkpoint `path`; ManifestError (one line) if it is missing or unreadable."""
        file = Path(path) / STATE_FILE
        try:
            with open(file) as f:
                return TrainerState(**json.load(f))
        except FileNotFoundError:
            raise ManifestError(f"{path} is not a checkpoint folder (no {STATE_FILE})") from None
        except (ValueError, TypeError, UnicodeDecodeError) as e:
            raise ManifestError(f"{file} is unreadable ({type(e).__name__}: {e})") from None


def write_checkpoint(folder: Path, engine, lm, tokenizer, save_dtype: str | None,
                     max_shard_size: str) -> None:
    """model/ (HF safetensors + tokenizer) and engine/ (DeepSpeed: weights, optimizer, LR schedule, and the
    RNG states in its client_state).

    Every rank calls this: under ZeRO-3 the HF save gathers one parameter at a time and every rank
    writes its own optimizer partition.
    """
    dtype = getattr(torch, save_dtype) if save_dtype else None
    lm.save_pretrained(str(folder / "model"), max_shard_size=max_shard_size, dtype=dtype)
    if torch.distributed.get_rank() == 0:  # a model built from scratch has no source folder to copy it from
        tokenizer.save(folder / "model")
    engine.save_checkpoint(str(folder), tag="engine", client_state={"rng": capture_rng()}, save_latest=False)


def _deepspeed_globals() -> list:
    """The classes DeepSpeed pickles into its optimizer states beside tensors (ZeRO 0-3, fp16 loss scaling,
    bf16 slice mappings): the only non-tensor objects a weights_only load accepts."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def load_checkpoint(engine, folder: Path, weights_only: bool = True) -> None:
    """Restore weights, optimizer, LR scheduler and RNG states from `folder/engine`.

    DeepSpeed's files are torch pickles; with weights_only (the default) every one is read by
    torch.load(weights_only=True), which rebuilds tensors, containers and _deepspeed_globals() only and
    refuses anything else (CheckpointError naming it) instead of running it.
    """
    backend = engine.checkpoint_engine
    if weights_only:
        allowed = _deepspeed_globals()

        def safe_load(path: str, map_location=None):
            try:
                with torch.serialization.safe_globals(allowed):
                    return torch.load(path, map_location=map_location, weights_only=True)
            except pickle.UnpicklingError as e:
                found = re.search(r"GLOBAL (\S+)", str(e))
                what = f"it pickles {found.group(1)}" if found else str(e).splitlines()[0][:200]
                raise CheckpointError(f"{path}: torch.load(weights_only=True) refuses it ({what}, which is not a "
                                      "DeepSpeed state class); if you trust this checkpoint, resume with "
                                      "checkpoint.weights_only=false") from None

        backend.load = safe_load  # DeepSpeed reads every engine file through its checkpoint engine
    try:
        path, client = engine.load_checkpoint(str(folder), tag="engine", load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
    finally:
        backend.__dict__.pop("load", None)
    if path is None:
        raise CheckpointError(f"no DeepSpeed state under {folder / 'engine'}")
    restore_rng((client or {}).get("rng", {}))
