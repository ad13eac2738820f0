"""The eval job's configuration (configs/eval.yaml): schema and the checks that need no torch and no weights.

`check_eval_config` runs first in eval.py, so a mistyped key, a bad value or a missing checkpoint folder
fails in well under a second; `runner.Job` repeats nothing and resolves the rest against the weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from powerattn.choices import BACKENDS, DTYPE_NAMES

TASKS = ("passkey", "ruler", "ppl", "receptive_field")
# The parameters each task accepts: a typo is an error, not a silently ignored key.
TASK_KEYS = {
    "passkey": {"name", "lengths", "depths", "samples", "digits"},
    "ruler": {"name", "lengths", "samples", "tasks"},
    "ppl": {"name", "lengths", "data", "text_field", "cache_dir", "tokens_per_length", "buckets", "mode"},
    "receptive_field": {"name", "length", "depths", "samples", "digits"},
}


@dataclass
class EvalConfig:
    """The schema of configs/eval.yaml (defaults and comments there)."""

    checkpoint: str | None = None
    task: Any = None                    # a task name, or a mapping {name: ..., <task parameters>}
    tokenizer: str | None = None
    pattern: Any = None
    attention_schedule: Any = None
    backend: str = "auto"
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int = 1
    seed: int = 0
    progress: bool = True
    output_dir: str = "."


def eval_config(cfg) -> EvalConfig:
    """The composed eval config (or a mapping) merged into EvalConfig: unknown keys and wrong types fail."""
    from omegaconf import OmegaConf, open_dict
    from omegaconf.errors import OmegaConfBaseException

    raw = OmegaConf.create(cfg)
    with open_dict(raw):
        raw.pop("hydra", None)
    missing = [k for k in ("checkpoint", "task") if k not in raw or OmegaConf.is_missing(raw, k) or raw[k] is None]
    if missing:
        raise ValueError(f"eval: set {' and '.join(missing)} (checkpoint=DIR task=passkey)")
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(EvalConfig), raw))
    except OmegaConfBaseException as e:
        raise ValueError(f"eval: {e.full_key}: {str(e).splitlines()[0]}") from None


def check_eval_config(cfg) -> EvalConfig:
    """EvalConfig with every check that needs neither torch nor the weights; ValueError / FileNotFoundError."""
    e = eval_config(cfg)
    folder = Path(e.checkpoint).expanduser()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"checkpoint {str(folder.resolve())!r} is not an HF model folder (no config.json)")
    task = dict(e.task) if isinstance(e.task, Mapping) else {"name": e.task}
    if task.get("name") not in TASKS:
        raise ValueError(f"eval: unknown task {task.get('name')!r}; choose one of {TASKS}")
    unknown = sorted(set(task) - TASK_KEYS[task["name"]])
    if unknown:
        raise ValueError(f"eval: task {task['name']!r} has no parameter(s) {unknown}; it accepts "
                         f"{sorted(TASK_KEYS[task['name']])}")
    if e.backend not in BACKENDS:
        raise ValueError(f"eval: unknown backend {e.backend!r}; choose one of {BACKENDS}")
    if e.dtype != "auto" and e.dtype not in DTYPE_NAMES:
        raise ValueError(f"eval: unknown dtype {e.dtype!r}; use auto or one of {sorted(DTYPE_NAMES)}")
    if e.batch_size < 1:
        raise ValueError(f"eval: batch_size must be >= 1, got {e.batch_size}")
    return e
