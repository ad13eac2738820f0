"""AdamW (no weight decay on norms and biases) and the warmup + cosine / linear / constant LR schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from powerattn.model.zero3 import full_shape
from powerattn.training.config import OptimConfig


class LRSchedule:
    """Multiplier of the peak LR at optimizer step `step`: linear warmup, then decay to min_lr_ratio.

    A plain object (not a lambda) so LambdaLR's state_dict, and with it an exact resume, can hold it.
    """

    def __init__(self, cfg: OptimConfig, total_steps: int):
        self.warmup, self.total = cfg.warmup_steps, max(total_steps, 1)
        self.kind, self.floor = cfg.schedule, cfg.min_lr_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if self.kind == "cosine" else 1 - progress
        return self.floor + (1 - self.floor) * shape


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Matrices decay; vectors (RMSNorm weights, biases) do not. Works on ZeRO-3 partitioned params."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if len(full_shape(p)) >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimConfig, cpu_offload: bool) -> torch.optim.Optimizer:
    """torch AdamW, or DeepSpeed's CPU Adam when ZeRO offloads optimizer states (DeepSpeed requires it)."""
    groups = param_groups(model, cfg.weight_decay)
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if cpu_offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)


def scheduler_factory(cfg: OptimConfig, total_steps: int):
    """What deepspeed.initialize takes as lr_scheduler: optimizer -> LambdaLR (built on its optimizer)."""
    schedule = LRSchedule(cfg, total_steps)
    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def follow_config(scheduler, cfg: OptimConfig, total_steps: int, step: int) -> None:
    """Put an optimizer and its LR schedule at optimizer step `step` under `cfg`.

    A DeepSpeed checkpoint restores the schedule it was saved with (LambdaLR keeps the LRSchedule's
    fields, the peak LR and the total steps) and the optimizer's hyperparameters; a run resumed under
    a changed lr, schedule or curriculum must follow the new ones from its step on. Under an unchanged
    config this sets exactly what was restored. Param groups are [decay, no_decay] (param_groups()).
    """
    schedule = LRSchedule(cfg, total_steps)
    groups = scheduler.optimizer.param_groups
    scheduler.last_epoch = step
    scheduler.base_lrs = [cfg.lr] * len(groups)
    scheduler.lr_lambdas = [schedule] * len(groups)
    for i, group in enumerate(groups):
        group.update(initial_lr=cfg.lr, lr=cfg.lr * schedule(step), betas=tuple(cfg.betas), eps=cfg.eps)
        if i == 0:
            group["weight_decay"] = cfg.weight_decay
    scheduler._last_lr = [g["lr"] for g in groups]
