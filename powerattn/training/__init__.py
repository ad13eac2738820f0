"""Training components, one concern each (train.py is their table of contents):

config (schema + validation), distributed (process groups), curriculum (stages and batch shapes),
modeling (build the model, RoPE per stage), optim (AdamW + LR schedule), engine (DeepSpeed, one
step), sequence_parallel (Ulysses), checkpoint (save / seal / resume), metrics (MFU, logs), preemption
(SIGTERM / SIGUSR1), run (input checks, output folder, resume choice, final report), verify (CLI).
The names below load on first use: `powerattn.training.config` checks a config without importing torch.
"""

from powerattn.lazy import lazy_exports

__all__ = [
    "Checkpointer", "ConfigError", "Curriculum", "Dist", "FlopCounter", "Layout", "MetricsLogger",
    "NonFiniteGuard", "NonFiniteLossError", "Resume", "Stage", "StepResult", "StopRequest", "TrainConfig",
    "TrainerState", "apply_stage_context", "build_engine", "build_model", "capture_rng", "check_inputs",
    "check_model", "deepspeed_config", "final_report", "follow_config", "init_distributed", "load_checkpoint",
    "load_config", "peak_flops", "peak_memory_gb", "plan_curriculum", "preflight", "prepare_run_dir", "process_layout",
    "resolve_precision", "resolve_resume", "restore_rng", "resume_point", "set_stage_batch", "signature",
    "signature_diff", "train_step", "write_checkpoint",
]
__getattr__, __dir__ = lazy_exports(__name__, {
    "Checkpointer": "checkpoint", "TrainerState": "checkpoint", "capture_rng": "checkpoint",
    "load_checkpoint": "checkpoint", "restore_rng": "checkpoint", "write_checkpoint": "checkpoint",
    "ConfigError": "config", "TrainConfig": "config", "load_config": "config",
    "Curriculum": "curriculum", "Stage": "curriculum", "plan_curriculum": "curriculum",
    "Dist": "distributed", "Layout": "distributed", "init_distributed": "distributed",
    "process_layout": "distributed",
    "NonFiniteGuard": "engine", "NonFiniteLossError": "engine", "StepResult": "engine", "build_engine": "engine",
    "deepspeed_config": "engine", "set_stage_batch": "engine", "train_step": "engine",
    "FlopCounter": "metrics", "MetricsLogger": "metrics", "peak_flops": "metrics", "peak_memory_gb": "metrics",
    "apply_stage_context": "modeling", "build_model": "modeling", "check_model": "modeling",
    "resolve_precision": "modeling",
    "follow_config": "optim",
    "StopRequest": "preemption",
    "Resume": "run", "check_inputs": "run", "final_report": "run", "preflight": "run", "prepare_run_dir": "run",
    "resolve_resume": "run", "resume_point": "run", "signature": "run", "signature_diff": "run",
})
