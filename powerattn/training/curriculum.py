"""Sequence-length curriculum: stages of (seq_len, steps), each with its derived batch shape.

Tokens per optimizer step stay constant across stages (unless a stage sets its own): as seq_len
grows, a micro-batch holds fewer rows and gradient accumulation covers the rest of the step. A
micro-batch never holds more than `batch.micro_batch_tokens` tokens per GPU (a row of seq_len is
split over the sequence-parallel group, so one GPU holds seq_len / sp of it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from powerattn.training.config import BatchConfig, ConfigError, StageConfig


@dataclass(frozen=True)
class Stage:
    index: int
    seq_len: int
    start_step: int
    steps: int
    micro_batch_size: int     # rows of seq_len per data-parallel rank per micro-batch
    grad_accum: int           # micro-batches per optimizer step
    tokens_per_step: int      # global: dp_size * micro_batch_size * grad_accum * seq_len
    rope_theta: float | None

    @property
    def end_step(self) -> int:
        return self.start_step + self.steps


@dataclass(frozen=True)
class Curriculum:
    stages: tuple[Stage, ...]

    @property
    def total_steps(self) -> int:
        return self.stages[-1].end_step

    def stage_at(self, step: int) -> Stage:
        """The stage that optimizer step `step` (0-based) belongs to; the last one past the end."""
        for stage in self.stages:
            if step < stage.end_step:
                return stage
        return self.stages[-1]

    def rope_theta_at(self, stage: Stage) -> float | None:
        """The RoPE base in force during `stage`: the latest one set by it or an earlier stage."""
        thetas = [s.rope_theta for s in self.stages[: stage.index + 1] if s.rope_theta is not None]
        return thetas[-1] if thetas else None

    def describe(self) -> str:
        lines = ["stage  seq_len  steps  rows/micro  grad_accum  tokens/step"]
        for s in self.stages:
            lines.append(f"{s.index:>5}  {s.seq_len:>7}  {s.steps:>5}  {s.micro_batch_size:>10}  "
                         f"{s.grad_accum:>10}  {s.tokens_per_step:>11}")
        return "\n".join(lines)


def batch_shape(seq_len: int, tokens_per_step: int, micro_batch_tokens: int, dp_size: int, sp_size: int,
                where: str = "stage", tokens_key: str = "tokens_per_step") -> tuple[int, int]:
    """(rows per micro-batch, gradient accumulation steps) for one stage; ConfigError if impossible."""
    per_gpu_row = seq_len // sp_size
    max_rows = micro_batch_tokens // per_gpu_row
    if max_rows < 1:
        raise ConfigError(
            f"{where}: a row of seq_len={seq_len} puts {per_gpu_row} tokens on each GPU (sequence parallel "
            f"size {sp_size}), more than batch.micro_batch_tokens={micro_batch_tokens}; raise "
            "batch.micro_batch_tokens or parallel.sequence_parallel_size"
        )
    unit = dp_size * seq_len
    if tokens_per_step % unit:
        lo, hi = max(unit, tokens_per_step // unit * unit), (tokens_per_step // unit + 1) * unit
        raise ConfigError(
            f"{where}: {tokens_key}={tokens_per_step} is not a multiple of data-parallel size ({dp_size}) "
            f"x seq_len ({seq_len}) = {unit}; use e.g. {lo} or {hi}"
        )
    rows = tokens_per_step // unit
    micro = max(d for d in range(1, min(rows, max_rows) + 1) if rows % d == 0)
    return micro, rows // micro


def plan_curriculum(stages: list[StageConfig], batch: BatchConfig, dp_size: int, sp_size: int) -> Curriculum:
    """Stages with their batch shapes for this process layout (dp_size x sp_size ranks)."""
    out, start = [], 0
    for i, s in enumerate(stages):
        tokens_per_step = s.tokens_per_step or batch.tokens_per_step
        key = f"curriculum.stages[{i}].tokens_per_step" if s.tokens_per_step else "batch.tokens_per_step"
        micro, accum = batch_shape(s.seq_len, tokens_per_step, batch.micro_batch_tokens, dp_size, sp_size,
                                   where=f"curriculum.stages[{i}]", tokens_key=key)
        steps = s.steps if s.steps is not None else math.ceil(s.tokens / tokens_per_step)
        out.append(Stage(i, s.seq_len, start, steps, micro, accum, tokens_per_step, s.rope_theta))
        start += steps
    return Curriculum(tuple(out))
