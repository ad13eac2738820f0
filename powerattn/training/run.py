"""The run folder (`outputs/<run_name>/`: config.yaml, checkpoints/, metrics.jsonl), which checkpoint
to resume from, and the end-of-run report (where the model is, a quick passkey accuracy).
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

import torch

from powerattn.training.checkpoint import Checkpointer, TrainerState
from powerattn.training.config import ConfigError, TrainConfig
from powerattn.training.distributed import Dist

# Sections that make a run what it is: resuming under different values would not continue it.
SIGNATURE_SECTIONS = ("model", "pattern", "curriculum", "batch", "data", "optim", "seed", "precision")


def prepare_run_dir(cfg: TrainConfig, composed, dist: Dist) -> Path:
    """Create output_dir and write the composed config as config.yaml (rank 0)."""
    run_dir = Path(cfg.output_dir)
    if dist.is_main:
        from omegaconf import OmegaConf

        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = run_dir / ".config.yaml.tmp"
        tmp.write_text(OmegaConf.to_yaml(composed, resolve=True) if hasattr(composed, "_metadata")
                       else OmegaConf.to_yaml(OmegaConf.create(asdict(cfg))))
        os.replace(tmp, run_dir / "config.yaml")
    dist.barrier()
    return run_dir


def signature(cfg: TrainConfig, dist: Dist) -> dict:
    """The training-relevant config plus the process layout ZeRO partitions were saved for."""
    out = {k: _plain(getattr(cfg, k)) for k in SIGNATURE_SECTIONS}
    out["layout"] = {"world_size": dist.world_size, "sequence_parallel_size": dist.sp_size,
                     "zero_stage": (cfg.deepspeed.get("zero_optimization") or {}).get("stage", 0)}
    return out


def _plain(value):
    return asdict(value) if hasattr(value, "__dataclass_fields__") else value


def _flat(d, prefix: str = "") -> dict:
    if not isinstance(d, dict):
        return {prefix: d}
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def signature_diff(saved: dict, current: dict) -> list[str]:
    a, b = _flat(saved), _flat(current)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def resolve_resume(cfg: TrainConfig, ckpt: Checkpointer, current: dict) -> tuple[Path | None, TrainerState]:
    """(checkpoint to resume from, its trainer state) per cfg.resume: auto | none | a checkpoint folder.

    auto continues output_dir's `latest` only under the same training config (else ConfigError naming
    the differences); an explicit folder is taken as given (differences are reported by the caller).
    """
    ckpt.remove_partial()
    if cfg.resume == "none":
        if ckpt.complete():
            raise ConfigError(f"resume=none but {ckpt.root} already holds checkpoints; use resume=auto, "
                              "a new run_name, or delete the folder")
        return None, TrainerState(config=current)
    if cfg.resume == "auto":
        path = ckpt.latest()
        if path is None:
            return None, TrainerState(config=current)
    else:
        path = Path(cfg.resume)
        if not (path / "trainer_state.json").is_file():
            raise ConfigError(f"resume: {cfg.resume!r} is not a complete checkpoint folder "
                              "(no trainer_state.json)")
    state = Checkpointer.read_state(path)
    diff = signature_diff(state.config, current)
    layout = [d for d in diff if d.startswith("layout.")]
    if layout and current["layout"]["zero_stage"] > 0:
        raise ConfigError(f"resume: {path} was saved by another process layout ({layout}); ZeRO partitions "
                          "load only into the same number of processes and sequence-parallel size")
    if diff and cfg.resume == "auto":
        raise ConfigError(f"resume=auto: {path} belongs to a run with another config ({diff}); use a new "
                          "run_name, or resume=<checkpoint folder> to continue from it deliberately")
    state.config = current
    return path, state


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
        f"{fe.samples} samples per cell)")
    return acc
