"""The run folder (`outputs/<run_name>/`: config.yaml, checkpoints/, metrics.jsonl), the checks of a run's
inputs before anything is created, which checkpoint to resume from, and the end-of-run report.
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from powerattn.atomic import atomic_write
from powerattn.manifest import MANIFEST, ManifestError, describe
from powerattn.training.checkpoint import LATEST, STATE_FILE, Checkpointer, TrainerState
from powerattn.training.config import ConfigError, TrainConfig, load_config
from powerattn.training.curriculum import Curriculum, plan_curriculum
from powerattn.training.distributed import Dist, Layout, process_layout

# Sections that make a run what it is: resuming under different values would not continue it.
SIGNATURE_SECTIONS = ("model", "pattern", "curriculum", "batch", "data", "optim", "seed", "precision")


def prepare_run_dir(cfg: TrainConfig, composed, dist: Dist) -> Path:
    """Create output_dir and write the composed config as config.yaml (rank 0)."""
    run_dir = Path(cfg.output_dir)
    if dist.is_main:
        from omegaconf import OmegaConf

        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(composed), resolve=True))
    dist.barrier()
    return run_dir


def preflight(composed) -> tuple[TrainConfig, Layout, Curriculum]:
    """Every check that needs no process group, folder or weights, in the order train.py runs them: the
    config (load_config), the process layout (WORLD_SIZE vs sequence parallelism), the curriculum's batch
    shapes, the inputs (check_inputs) and, on GPUs, the predicted memory of every stage (check_memory).
    Each failure is a one-line ConfigError naming the value."""
    cfg = load_config(composed)
    layout = process_layout(cfg.parallel.sequence_parallel_size)
    curriculum = plan_curriculum(cfg.curriculum.stages, cfg.batch, layout.dp_size, layout.sp_size)
    check_inputs(cfg, layout)
    if cfg.check_memory:
        check_memory(cfg, layout, curriculum)
    return cfg, layout, curriculum


def check_memory(cfg: TrainConfig, layout: Layout, curriculum: Curriculum, gpu_gib: float | None = None) -> None:
    """ConfigError if a curriculum stage's predicted peak (powerattn.memory) does not fit this machine's GPU
    (gpu_gib: its GiB; without one, a CPU-only machine, nothing to check) or its offload the node's memory."""
    from powerattn import memory

    gpu_gib = gpu_gib or memory.local_gpu_gib()
    if gpu_gib is None:
        return
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", layout.world_size))
    memory.check_fits(cfg, layout.world_size, layout.sp_size,
                      [(s.index, s.seq_len, s.micro_batch_size) for s in curriculum.stages], gpu_gib, per_node,
                      memory.local_host_gib())


def check_inputs(cfg: TrainConfig, layout: Layout) -> None:
    """Everything the run will read exists and fits, checked before any process group, folder or weights:
    the model folder, the tokenizer, local data paths, and the checkpoint a resume would continue (its
    config, its layout, its file sizes). Raises ConfigError with one line that names the value."""
    from powerattn.data.sources import resolve, source_name
    from powerattn.data.tokenizer import Tokenizer
    from powerattn.training.modeling import check_model

    m = cfg.model
    if m.path is not None and not os.path.isdir(m.path):
        raise ConfigError(f"model.path: no folder at {m.path!r}; download the HF model there, or point "
                          "model.path (or POWERATTN_MODELS, the folder the model configs look in) at it")
    vocab = None
    if cfg.data.tokenizer:
        try:
            vocab = Tokenizer.from_pretrained(cfg.data.tokenizer).vocab_size
        except (OSError, ValueError) as e:
            raise ConfigError(f"data.tokenizer: {str(e).removeprefix('tokenizer: ')}") from None
    for i, src in enumerate(cfg.data.sources):
        try:
            resolve(src.path, source_name(src))
        except (OSError, ValueError) as e:
            raise ConfigError(f"data.sources[{i}].path: {e}") from None
    check_model(cfg, vocab, layout.sp_size)
    resolve_resume(cfg, Checkpointer(Path(cfg.output_dir) / "checkpoints", cfg.checkpoint.keep_last),
                   signature(cfg, layout), level="size")


def signature(cfg: TrainConfig, layout: Layout | Dist) -> dict:
    """The training-relevant config plus the process layout ZeRO partitions were saved for."""
    out = {k: _plain(getattr(cfg, k)) for k in SIGNATURE_SECTIONS}
    out["layout"] = {"world_size": layout.world_size, "sequence_parallel_size": layout.sp_size,
                     "zero_stage": zero_stage(cfg)}
    return out


def zero_stage(cfg: TrainConfig) -> int:
    return (cfg.deepspeed.get("zero_optimization") or {}).get("stage", 0)


def _plain(value):
    return asdict(value) if hasattr(value, "__dataclass_fields__") else value


def _flat(d, prefix: str = "") -> dict:
    """{"a.b[1].c": value} for nested dicts and lists, so a difference names the exact key."""
    if isinstance(d, (list, tuple)) and d and all(isinstance(v, (dict, list, tuple)) for v in d):
        items = [(f"{prefix}[{i}]", v) for i, v in enumerate(d)]
    elif isinstance(d, dict) and d:
        items = [(f"{prefix}.{k}" if prefix else str(k), v) for k, v in d.items()]
    else:
        return {prefix: d}
    out = {}
    for key, v in items:
        out.update(_flat(v, key))
    return out


def signature_diff(saved: dict, current: dict) -> list[str]:
    a, b = _flat(saved), _flat(current)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _layout_words(layout: dict) -> str:
    return (f"{layout.get('world_size')} process(es), sequence parallel {layout.get('sequence_parallel_size')}, "
            f"ZeRO-{layout.get('zero_stage')}")


@dataclass
class Resume:
    """Where a run starts: `path` (None: from scratch) and its trainer state."""

    path: Path | None
    state: TrainerState
    weights_only: bool = False                         # model/ weights, fresh optimizer (resume_optimizer=false)
    changes: list[str] = field(default_factory=list)   # config differences of a deliberate resume=<folder>
    warnings: list[str] = field(default_factory=list)  # damaged checkpoints passed over

    @property
    def weights(self) -> Path | None:
        """The HF folder to load the model from instead of model.path (weights-only resume)."""
        return self.path / "model" if self.path is not None and self.weights_only else None


def resolve_resume(cfg: TrainConfig, ckpt: Checkpointer, current: dict, level: str = "hash") -> Resume:
    """The checkpoint to resume from per cfg.resume (auto | none | a checkpoint folder), checked against
    its manifest at `level` (hash | size | none; collective when `ckpt` has a Dist).

    auto takes output_dir's `latest`, or, if that is damaged, the newest intact older one (a warning
    per damaged one), and only under the same training config; an explicit folder must be intact and
    may differ in config (a deliberate continuation; `changes` lists the differences). ZeRO partitions
    need the process layout they were saved by, unless cfg.resume_optimizer is false.
    """
    fresh = Resume(None, TrainerState(config=current))
    if cfg.resume == "none":
        if ckpt.complete():
            raise ConfigError(f"resume=none but {ckpt.root} already holds checkpoints; use resume=auto, "
                              "a new run_name, or delete the folder")
        return fresh
    if cfg.resume != "auto":
        path = Path(cfg.resume)
        if not path.is_dir() or not ((path / STATE_FILE).is_file() or (path / MANIFEST).is_file()):
            what = "no folder at" if not path.is_dir() else "not a checkpoint folder:"
            raise ConfigError(f"resume: {what} {cfg.resume!r}; give a checkpoint folder "
                              "(outputs/<run>/checkpoints/step_N), auto or none")
        problems = ckpt.check(path, level)
        if problems:
            raise ConfigError(f"resume: {describe(path, problems)}; resume from another checkpoint "
                              f"(python -m powerattn.training.verify {path.parent} checks them all)")
        return _accept(cfg, path, current, deliberate=True)
    warnings = []
    named = ckpt.pointer()
    if named is not None and not named.is_dir():
        warnings.append(f"{ckpt.root / LATEST} names {named.name}, which does not exist")
    for path in ckpt.candidates():
        problems = ckpt.check(path, level)
        if problems:
            warnings.append(describe(path, problems))
            continue
        out = _accept(cfg, path, current, deliberate=False)
        out.warnings = [f"{w}; resuming from {path.name} instead" for w in warnings]
        return out
    if warnings:
        raise ConfigError(f"resume=auto: no intact checkpoint in {ckpt.root} ({warnings[0]}); resume from a "
                          "copy with resume=<folder>, or start anew with another run_name")
    return fresh


def _accept(cfg: TrainConfig, path: Path, current: dict, deliberate: bool) -> Resume:
    try:
        state = Checkpointer.read_state(path)
    except ManifestError as e:
        raise ConfigError(f"resume: {e}") from None
    saved = dict(state.config)
    saved_layout, layout = saved.pop("layout", {}), current["layout"]
    changes = signature_diff(saved, {k: v for k, v in current.items() if k != "layout"})
    weights_only = not cfg.resume_optimizer
    if saved_layout != layout and max(saved_layout.get("zero_stage", 0), layout["zero_stage"]) > 0 \
            and not weights_only:
        raise ConfigError(
            f"resume: {path} was saved by {_layout_words(saved_layout)}, this run has {_layout_words(layout)}; "
            f"ZeRO optimizer partitions load only into the layout they were saved by: launch "
            f"{saved_layout.get('world_size')} process(es), or add resume_optimizer=false to continue from its "
            "model/ weights with a fresh optimizer")
    if changes and not deliberate:
        raise ConfigError(f"resume=auto: {path} belongs to a run with another config ({changes}); use a new "
                          "run_name, or resume=<checkpoint folder> to continue from it deliberately under the "
                          "new config")
    state.config = current
    return Resume(path, state, weights_only, changes)


def resume_point(cfg: TrainConfig, ckpt: Checkpointer, dist: Dist) -> Resume:
    """resolve_resume at cfg.checkpoint.verify, after deleting interrupted writes; damaged checkpoints it
    passes over are reported (one line each) and `latest` is pointed at the one it takes."""
    ckpt.remove_partial()
    out = resolve_resume(cfg, ckpt, signature(cfg, dist), level=cfg.checkpoint.verify)
    if out.warnings and dist.is_main:
        for w in out.warnings:
            print(f"warning: {w}", file=sys.stderr, flush=True)
        ckpt.point_latest(out.path)
    return out


def final_report(lm, tokenizer, cfg: TrainConfig, model_dir: Path | None, say) -> float | None:
    """Print where the model is and, when configured, a quick passkey accuracy (every rank evaluates)."""
    from powerattn.evaluation import quick_passkey
    from powerattn.training.sequence_parallel import ulysses_disabled

    if model_dir is None:
        say("no checkpoint written (checkpoint.final=false)")
    else:
        say(f"model: {model_dir} (HF safetensors: powerattn.model.from_pretrained or transformers "
            "AutoModelForCausalLM load it)")
    fe = cfg.final_eval
    if not fe.enabled:
        return None
    was_training = lm.training
    lm.eval()
    with torch.no_grad(), ulysses_disabled(lm):
        acc = quick_passkey(lm, tokenizer, list(fe.lengths), list(fe.depths), fe.samples, seed=cfg.seed)
    lm.train(was_training)
    say(f"passkey accuracy: {acc:.3f} (lengths {list(fe.lengths)}, depths {list(fe.depths)}, "
        f"{fe.samples} samples per cell): a check that the trained model generates, not a result. Retrieval "
        "is learned from retrieval-dense data at scale (the pattern study's base: 48M tokens of short task "
        "documents, 96% at 1K; docs/study.md); eval.py task=passkey measures a real checkpoint")
    return acc
