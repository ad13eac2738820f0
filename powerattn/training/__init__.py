"""Training components, one concern each (train.py is their table of contents):

config (schema + validation), distributed (process groups), curriculum (stages and batch shapes),
modeling (build the model, RoPE per stage), optim (AdamW + LR schedule), engine (DeepSpeed, one
step), sequence_parallel (Ulysses), checkpoint (save / seal / resume), metrics (MFU, logs), preemption
(SIGTERM / SIGUSR1), run (input checks, output folder, resume choice, final report), verify (CLI).
"""

from powerattn.training.checkpoint import (
    Checkpointer,
    TrainerState,
    capture_rng,
    load_checkpoint,
    restore_rng,
    write_checkpoint,
)
from powerattn.training.config import ConfigError, TrainConfig, load_config
from powerattn.training.curriculum import Curriculum, Stage, plan_curriculum
from powerattn.training.distributed import Dist, Layout, init_distributed, process_layout
from powerattn.training.engine import (
    NonFiniteGuard,
    NonFiniteLossError,
    StepResult,
    build_engine,
    deepspeed_config,
    set_stage_batch,
    train_step,
)
from powerattn.training.metrics import FlopCounter, MetricsLogger, peak_flops, peak_memory_gb
from powerattn.training.modeling import apply_stage_context, build_model, check_model, resolve_precision
from powerattn.training.optim import follow_config
from powerattn.training.preemption import StopRequest
from powerattn.training.run import (
    Resume,
    check_inputs,
    final_report,
    preflight,
    prepare_run_dir,
    resolve_resume,
    resume_point,
    signature,
    signature_diff,
)

__all__ = [
    "Checkpointer", "ConfigError", "Curriculum", "Dist", "FlopCounter", "Layout", "MetricsLogger",
    "NonFiniteGuard", "NonFiniteLossError", "Resume", "Stage", "StepResult", "StopRequest", "TrainConfig",
    "TrainerState", "apply_stage_context", "build_engine", "build_model", "capture_rng", "check_inputs",
    "check_model", "deepspeed_config", "final_report", "follow_config", "init_distributed", "load_checkpoint",
    "load_config", "peak_flops", "peak_memory_gb", "plan_curriculum", "preflight", "prepare_run_dir", "process_layout",
    "resolve_precision", "resolve_resume", "restore_rng", "resume_point", "set_stage_batch", "signature",
    "signature_diff", "train_step", "write_checkpoint",
]
