"""Step metrics: FLOPs as executed (per packed document, at the pattern's density), MFU, peak memory,
and their sinks: a tqdm bar on rank 0, `metrics.jsonl` (one line per step) and wandb.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from powerattn.atomic import atomic_write
from powerattn.model import LlamaConfig, flops_per_token
from powerattn.patterns import Pattern

# Dense (no 2:4 sparsity) bf16 tensor-core peak TFLOP/s per GPU, by a lower-case substring of the device
# name; the first match wins, so specific names come before their prefixes.
PEAK_TFLOPS = (
    ("h100 pcie", 756.0), ("h100 nvl", 835.0), ("h200 nvl", 835.0), ("gh200", 989.4), ("h100", 989.4),
    ("h200", 989.4), ("h800", 989.4), ("b200", 2250.0), ("a100", 312.0), ("a800", 312.0), ("l40s", 362.0),
    ("l40", 181.0), ("l4", 121.0), ("a10", 125.0), ("4090", 165.2), ("v100", 125.0),
)


def peak_tflops(device_name: str) -> float | None:
    """Peak dense bf16 TFLOP/s of a GPU by its name (torch.cuda.get_device_name); None if unknown."""
    name = device_name.lower()
    return next((tf for key, tf in PEAK_TFLOPS if key in name), None)


def peak_flops(device: torch.device, override_tflops: float | None = None) -> float | None:
    """Peak FLOP/s of one device for MFU (None on CPU or an unknown GPU without an override)."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    tf = peak_tflops(torch.cuda.get_device_name(device))
    return None if tf is None else tf * 1e12


class FlopCounter:
    """Model FLOPs of a packed batch: each document (segment of cu_seqlens) costs its own length's
    attention at the pattern's density, so packing short documents is not counted as long-context work."""

    def __init__(self, config: LlamaConfig, patterns: Sequence[Pattern]):
        self.config, self.patterns = config, list(patterns)
        self._cache: dict[int, float] = {}

    def sequence(self, length: int) -> float:
        if length not in self._cache:
            self._cache[length] = length * flops_per_token(self.config, length, self.patterns, training=True)
        return self._cache[length]

    def __call__(self, batch: dict) -> float:
        cu = batch["cu_seqlens"].tolist()
        return sum(self.sequence(b - a) for a, b in zip(cu, cu[1:]) if b > a)


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated GPU memory since the last call (CUDA), or the process's peak RSS (CPU)."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        return peak / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kilobytes on Linux


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Drop lines logged after `last_step` (steps a resumed run recomputes), atomically."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= last_step]
    atomic_write(path, "".join(line + "\n" for line in keep))


def _wandb_mode(mode: str) -> str | None:
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE"):
        return None  # wandb reads it itself
    netrc = Path.home() / ".netrc"
    netrc_key = netrc.is_file() and "api.wandb.ai" in netrc.read_text()
    has_key = bool(os.environ.get("WANDB_API_KEY")) or netrc_key
    return "online" if has_key else "offline"


class MetricsLogger:
    """Rank 0 writes; other ranks hold an inert logger."""

    def __init__(self, cfg, run_dir: Path, enabled: bool, total_steps: int, start_step: int,
                 peak: float | None, world_size: int, wandb_id: str | None = None):
        self.enabled, self.peak, self.world_size = enabled, peak, world_size
        self.bar = self.wandb = self.file = None
        self.started = time.perf_counter()
        self.wandb_id = wandb_id
        if not enabled:
            return
        path = run_dir / "metrics.jsonl"
        truncate_jsonl(path, start_step)
        self.file = open(path, "a")
        if cfg.progress and sys.stderr.isatty():  # in log files (SLURM, pipes) one line per step reads better
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True,
                            mininterval=1.0)
        if cfg.logger.backend == "wandb":
            self.wandb = self._init_wandb(cfg, run_dir, wandb_id)

    def _init_wandb(self, cfg, run_dir: Path, wandb_id: str | None):
        import wandb

        lg = cfg.logger
        kwargs = dict(project=lg.project, entity=lg.entity, group=lg.group, tags=lg.tags, name=cfg.run_name,
                      dir=str(run_dir), config=asdict(cfg), id=wandb_id, resume="allow" if wandb_id else None)
        try:
            run = wandb.init(mode=_wandb_mode(lg.mode), settings=wandb.Settings(init_timeout=60), **kwargs)
        except Exception as e:  # no network behind the credentials: keep the run, log offline
            self.message(f"wandb online init failed ({e}); logging offline under {run_dir}/wandb")
            run = wandb.init(mode="offline", **kwargs)
        self.wandb_id = run.id
        return run

    def log(self, step: int, stage, result, total_tokens: int, skipped: int, peak_mem_gb: float) -> dict:
        """Record optimizer step `step` (1-based count of steps done) everywhere; returns the record."""
        tps = result.tokens / max(result.seconds, 1e-9)
        mfu = result.flops / (result.seconds * self.world_size * self.peak) if self.peak else None
        record = {
            "step": step, "stage": stage.index, "seq_len": stage.seq_len, "loss": result.loss,
            "lr": result.lr, "grad_norm": result.grad_norm, "tokens_per_s": tps, "mfu": mfu,
            "peak_mem_gb": peak_mem_gb, "tokens": total_tokens, "step_time_s": result.seconds,
            "nonfinite_microbatches": result.nonfinite, "skipped_steps": skipped,
            "elapsed_s": time.perf_counter() - self.started,
        }
        if not self.enabled:
            return record
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        mfu_text = "-" if mfu is None else f"{100 * mfu:.1f}%"
        text = (f"loss={result.loss:.4f} tok/s={tps:,.0f} mfu={mfu_text} mem={peak_mem_gb:.1f}G "
                f"seq={stage.seq_len}")
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(step - self.bar.n)
        else:
            print(f"step {step}: {text}", flush=True)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if v is not None}, step=step)
        return record

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.file is not None:
            self.file.close()
        if self.wandb is not None:
            self.wandb.finish()
