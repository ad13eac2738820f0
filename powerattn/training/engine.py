"""The DeepSpeed engine and one optimizer step.

- `deepspeed_config`: the `deepspeed` config group plus what train.py derives (micro-batch, gradient
  accumulation, clipping, bf16/fp16), so batch sizes cannot contradict each other.
- `TrainingModel`: what DeepSpeed wraps; a `MicroBatch` in (training/microbatch.py), the summed token
  loss of this rank's tokens out (whole rows, or its Ulysses slice) through the model's own forward.
- `train_step`: one optimizer step. The loss is the mean over every target token of the step (all
  micro-batches, all ranks), so gradients do not depend on how a step is split into micro-batches,
  data-parallel ranks or sequence-parallel slices. Accumulation boundaries are ours (stages change
  the number of micro-batches mid-run). Non-finite loss: a micro-batch whose loss is not finite on
  any rank is not backpropagated; a step left without any finite micro-batch is skipped (no
  optimizer update; the LR schedule still advances, so LR stays a function of the step index).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from powerattn.model import LlamaForCausalLM
from powerattn.training.config import TrainConfig
from powerattn.training.curriculum import Stage
from powerattn.training.distributed import Dist
from powerattn.training.microbatch import MicroBatch, make_microbatch
from powerattn.training.optim import build_optimizer, scheduler_factory
from powerattn.training.sequence_parallel import enable_ulysses


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps with a non-finite loss: training stops instead of burning compute."""


def deepspeed_config(cfg: TrainConfig, stage: Stage, precision: str) -> dict:
    """The DeepSpeed config: the `deepspeed` group with the derived batch, clipping and precision keys."""
    ds = copy.deepcopy(cfg.deepspeed)
    ds.update(
        train_micro_batch_size_per_gpu=stage.micro_batch_size,
        gradient_accumulation_steps=stage.grad_accum,
        gradient_clipping=cfg.optim.grad_clip,
        bf16={"enabled": precision == "bf16"},
        fp16={"enabled": True, "loss_scale": 0, "initial_scale_power": 16} if precision == "fp16"
        else {"enabled": False},
        steps_per_print=2**31 - 1,  # progress is ours (tqdm, metrics.jsonl)
        wall_clock_breakdown=False,
    )
    return ds


def cpu_offload(ds_config: dict) -> bool:
    offload = (ds_config.get("zero_optimization") or {}).get("offload_optimizer") or {}
    return offload.get("device", "none") == "cpu"


class TrainingModel(nn.Module):
    """MicroBatch -> summed token loss of its tokens; holds the LM as `lm` (its parameter names inside)."""

    def __init__(self, lm: LlamaForCausalLM):
        super().__init__()
        self.lm = lm

    def forward(self, mb: MicroBatch) -> Tensor:
        return self.lm.loss(mb.input_ids, mb.targets, mb.documents).loss_sum


def build_engine(lm: LlamaForCausalLM, cfg: TrainConfig, ds_config: dict, dist: Dist, total_steps: int):
    """deepspeed.initialize with our AdamW and LR schedule (and the Ulysses groups when sp > 1)."""
    import deepspeed

    if dist.sp_size > 1:
        enable_ulysses(lm, dist.sp_group)
    model = TrainingModel(lm)
    optimizer = build_optimizer(model, cfg.optim, cpu_offload(ds_config))
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config, mpu=dist.mpu,
                                      lr_scheduler=scheduler_factory(cfg.optim, total_steps))
    engine.train()
    return engine


def set_stage_batch(engine, stage: Stage, dp_size: int) -> None:
    """Tell DeepSpeed the stage's batch shape (its sample counters; boundaries and scaling are ours)."""
    conf = engine._config  # no public setter changes both values (set_train_batch_size keeps micro)
    conf.train_micro_batch_size_per_gpu = stage.micro_batch_size
    conf.gradient_accumulation_steps = stage.grad_accum
    conf.train_batch_size = stage.micro_batch_size * stage.grad_accum * dp_size
    if hasattr(engine.optimizer, "gradient_accumulation_steps"):  # ZeRO-1/2 CPU-offload accumulation
        engine.optimizer.gradient_accumulation_steps = stage.grad_accum


@dataclass
class StepResult:
    loss: float          # mean token loss of the step's finite micro-batches, all ranks (nan if none)
    nonfinite: int       # micro-batches whose loss was not finite on some rank
    applied: bool        # whether the optimizer updated the weights
    lr: float
    grad_norm: float | None
    flops: float         # model FLOPs of the step, all ranks (sparse attention as executed)
    tokens: int          # tokens of the step, all ranks (padding included)
    seconds: float


def train_step(engine, loader, stage: Stage, dist: Dist, flops_of) -> StepResult:
    """One optimizer step over stage.grad_accum micro-batches from `loader` (see the module docstring)."""
    start = time.perf_counter()
    lr = float(engine.get_lr()[0])
    batches = [next(loader) for _ in range(stage.grad_accum)]
    mbs = [make_microbatch(b, dist.sp_rank, dist.sp_size) for b in batches]  # host memory: count targets first
    # Every rank of a Ulysses group holds the same rows (flops counts 1/sp of them) but scores only its slice.
    step_targets, flops = dist.sum(sum(mb.num_targets for mb in mbs), sum(map(flops_of, batches)) / dist.sp_size)
    scale = dist.dp_size / max(step_targets, 1.0)  # DeepSpeed averages gradients over dp_size replicas
    loss_sum = loss_count = 0.0
    nonfinite = backwards = 0
    for i, mb in enumerate(mbs):
        last = i == len(mbs) - 1
        engine.set_gradient_accumulation_boundary(last)
        loss = engine(mb.to(dist.device))
        value = float(loss.detach().float().item())
        bad = not math.isfinite(value)
        # One all-reduce: the micro-batch's global loss and targets, and whether any rank saw a bad loss.
        total, targets, bad_ranks = dist.sum(0.0 if bad else value, mb.num_targets, float(bad))
        if bad_ranks:
            nonfinite += 1
            if last and backwards:  # the boundary must still happen (ZeRO-1 reduces gradients there)
                _neutral_backward(engine, dist)
            continue
        engine.backward(loss * scale, scale_wrt_gas=False)
        backwards += 1
        loss_sum, loss_count = loss_sum + total, loss_count + targets
    norm = None
    if backwards:
        if not engine.zero_optimization():  # DeepSpeed reports a norm only for its ZeRO optimizers
            norm = _grad_norm(engine.module)
        engine.step()
        norm = engine.get_global_grad_norm() if norm is None else norm
    else:
        engine.lr_scheduler.step()
    mean = loss_sum / max(loss_count, 1.0) if backwards else float("nan")
    return StepResult(loss=mean, nonfinite=nonfinite, applied=backwards > 0, lr=lr,
                      grad_norm=None if norm is None else float(norm), flops=flops,
                      tokens=stage.tokens_per_step, seconds=time.perf_counter() - start)


def _grad_norm(module: nn.Module) -> float:
    """L2 norm of the (already all-reduced) gradients, before clipping."""
    norms = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def _neutral_batch(dist: Dist) -> MicroBatch:
    """A tiny valid micro-batch whose zero-weighted backward closes an accumulation without gradient."""
    n = 8 * dist.sp_size
    ids = torch.zeros(1, n, dtype=torch.long)
    batch = {"input_ids": ids, "labels": ids.clone(), "position_ids": torch.arange(n)[None],
             "cu_seqlens": torch.tensor([0, n], dtype=torch.int32), "max_seqlen": n}
    return make_microbatch(batch, dist.sp_rank, dist.sp_size).to(dist.device)


def _neutral_backward(engine, dist: Dist) -> None:
    loss = engine(_neutral_batch(dist))
    if dist.any(not math.isfinite(float(loss.detach().float().item()))):
        raise NonFiniteLossError("the loss is not finite even on a dummy batch: the weights have diverged; "
                                 "resume from an earlier checkpoint with a lower optim.lr")
    engine.backward(loss * 0.0, scale_wrt_gas=False)


class NonFiniteGuard:
    """Counts steps with a non-finite loss; raises NonFiniteLossError after `limit` in a row."""

    def __init__(self, limit: int, in_row: int = 0):
        self.limit, self.in_row = limit, in_row

    def update(self, result: StepResult, step: int) -> None:
        self.in_row = self.in_row + 1 if result.nonfinite else 0
        if self.in_row >= self.limit:
            raise NonFiniteLossError(
                f"the loss was not finite in {self.in_row} consecutive steps (the last: step {step}); "
                f"stopping (max_nonfinite_in_row={self.limit}). Resume from the last checkpoint with a "
                "lower optim.lr, more optim.warmup_steps or a smaller optim.grad_clip"
            )
