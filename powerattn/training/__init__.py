"""Training components, one concern each (train.py is their table of contents):

config (schema + validation), distributed (process groups), curriculum (stages and batch shapes),
modeling (build the model, RoPE per stage), optim (AdamW + LR schedule), engine (DeepSpeed, one
step), sequence_parallel (Ulysses), checkpoint (save / resume), metrics (MFU, logs), preemption
(SIGTERM / SIGUSR1), run (output folder, resume choice, final report).
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
from powerattn.training.distributed import Dist, init_distributed
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
from powerattn.training.preemption import StopRequest
from powerattn.training.run import final_report, prepare_run_dir, resolve_resume, signature, signature_diff

__all__ = [
    "Checkpointer", "ConfigError", "Curriculum", "Dist", "FlopCounter", "MetricsLogger", "NonFiniteGuard",
    "NonFiniteLossError", "Stage", "StepResult", "StopRequest", "TrainConfig", "TrainerState",
    "apply_stage_context", "build_engine", "build_model", "capture_rng", "check_model", "deepspeed_config",
    "final_report", "init_distributed", "load_checkpoint", "load_config", "peak_flops", "peak_memory_gb",
    "plan_curriculum", "prepare_run_dir", "resolve_precision", "resolve_resume", "restore_rng",
    "set_stage_batch", "signature", "signature_diff", "train_step", "write_checkpoint",
]
