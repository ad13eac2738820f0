"""Continued pretraining with PowerAttention on DeepSpeed (guide: docs/training.md).

    python train.py                                              # embedded tiny run, CPU or GPU, minutes
    torchrun --nproc_per_node 8 train.py +experiment=llama_128k  # one node; launch/ for more
    python train.py +experiment=llama_128k --cfg job             # print the composed config

Each line of main() is one component of powerattn.training; together they are one training step
after another, with the curriculum, checkpoints and graceful stops around it.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys

import hydra
from omegaconf import DictConfig


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
def main(composed: DictConfig) -> None:
    received = []  # SIGTERM / SIGUSR1 before the StopRequest exists (imports, checks, loading) count too
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, lambda signum, frame: received.append(signum))
    from powerattn.training.config import ConfigError, load_config

    try:  # before torch is imported: a bad value fails in well under a second
        load_config(composed)
    except ConfigError as e:  # the same on every rank: rank 0 says it
        sys.exit(f"error: {e}" if os.environ.get("RANK", "0") == "0" else 1)
    from torch.distributed import is_initialized as dist_started

    from powerattn.manifest import ManifestError
    from powerattn.model import CheckpointError
    from powerattn.training import NonFiniteLossError

    try:
        train(composed, received)
    except (ConfigError, CheckpointError, ManifestError, NonFiniteLossError) as e:  # one line, no traceback
        # A config error found before the process group exists is the same on every rank: rank 0 says it.
        quiet = isinstance(e, ConfigError) and os.environ.get("RANK", "0") != "0" and not dist_started()
        sys.exit(1 if quiet else f"error: {e}")


def train(composed: DictConfig, received: list[int]) -> None:
    # Imported here, not at the top, so that Hydra rejects a mistyped key or group in ~0.5 s
    # instead of after ~2 s of importing torch and DeepSpeed.
    from powerattn.data import build_loader
    from powerattn.training import (
        Checkpointer,
        ConfigError,
        FlopCounter,
        MetricsLogger,
        NonFiniteGuard,
        StopRequest,
        apply_stage_context,
        build_engine,
        build_model,
        check_model,
        deepspeed_config,
        final_report,
        follow_config,
        init_distributed,
        load_checkpoint,
        peak_flops,
        peak_memory_gb,
        preflight,
        prepare_run_dir,
        resolve_precision,
        resume_point,
        set_stage_batch,
        train_step,
        write_checkpoint,
    )

    # Checks that need no process group, folder or weights: the config, the process layout, the model
    # folder, tokenizer and data paths, the checkpoint a resume would take. Each fails in one line.
    cfg, _, curriculum = preflight(composed)
    if cfg.check_only:
        return

    # Setup: processes, the run folder, the resume point (checked against its manifest), data, model, engine.
    dist = init_distributed(cfg.parallel.sequence_parallel_size)
    run_dir = prepare_run_dir(cfg, composed, dist)
    stop = StopRequest(run_dir / "STOP", received)  # a SIGTERM: finish the step, one checkpoint, exit 0
    ckpt = Checkpointer(run_dir / "checkpoints", cfg.checkpoint.keep_last, dist)
    resume = resume_point(cfg, ckpt, dist)
    state = resume.state
    stage = curriculum.stage_at(state.step)

    data_cfg = dataclasses.replace(cfg.data, seq_len=stage.seq_len)
    try:
        loader, tokenizer = build_loader(data_cfg, stage.micro_batch_size, dist.rank, dist.world_size,
                                         dist.sp_size)
    except (FileNotFoundError, ValueError) as e:  # the data's own one-line messages (empty source, no field)
        raise ConfigError(f"data: {e}") from None
    arch = check_model(cfg, tokenizer.vocab_size, dist.sp_size)  # reads config.json only
    precision, dtype = resolve_precision(cfg.precision, dist.device)
    ds_config = deepspeed_config(cfg, stage, precision)
    lm = build_model(cfg, arch, tokenizer.bos_id, tokenizer.eos_id, ds_config, dtype, dist.device, resume.weights)
    engine = build_engine(lm, cfg, ds_config, dist, curriculum.total_steps)
    if resume.path is not None:
        if not resume.weights_only:
            load_checkpoint(engine, resume.path, cfg.checkpoint.weights_only)
        loader.load_state_dict(state.loader)
    follow_config(engine.lr_scheduler, cfg.optim, curriculum.total_steps, state.step)  # the new lr, if changed

    log = MetricsLogger(cfg, run_dir, dist.is_main, curriculum.total_steps, state.step,
                        peak_flops(dist.device, cfg.peak_tflops), dist.world_size, state.wandb_id)
    state.wandb_id = log.wandb_id
    log.message(f"run folder {run_dir}; {dist.world_size} process(es), sequence parallel {dist.sp_size}, "
                f"{precision}; " + (f"resuming {resume.path} at step {state.step}" if resume.path else "from scratch")
                + (" (its model/ weights, a fresh optimizer)" if resume.weights_only else "")
                + (f"; config changes: {resume.changes}" if resume.changes else ""))
    log.message(curriculum.describe())
    flops_of = FlopCounter(lm.config, lm.layer_patterns)
    guard = NonFiniteGuard(cfg.max_nonfinite_in_row, state.nonfinite_in_row)

    def save():
        state.loader, state.nonfinite_in_row = loader.state_dict(), guard.in_row
        write = lambda folder: write_checkpoint(folder, engine, lm, tokenizer, cfg.checkpoint.save_dtype,
                                                cfg.checkpoint.max_shard_size)
        return ckpt.save(state.step, write, state)

    # The loop: stage switches, one optimizer step, bookkeeping, checkpoints, graceful stops.
    current, saved = None, ckpt.latest()
    while state.step < curriculum.total_steps:
        stage = curriculum.stage_at(state.step)
        if stage != current:
            loader.set_seq_len(stage.seq_len, stage.micro_batch_size)
            set_stage_batch(engine, stage, dist.dp_size)
            if apply_stage_context(lm, curriculum, stage):
                log.message(f"stage {stage.index}: RoPE theta {lm.config.rope_theta:g}, "
                            f"max_position_embeddings {lm.config.max_position_embeddings}")
            current = stage
        result = train_step(engine, loader, stage, dist, flops_of)
        state.step, state.stage = state.step + 1, stage.index
        state.tokens += result.tokens
        state.skipped_steps += not result.applied
        log.log(state.step, stage, result, state.tokens, state.skipped_steps, peak_memory_gb(dist.device))
        guard.update(result, state.step)
        stopping = stop.requested(dist)
        if stopping or (cfg.checkpoint.every and state.step % cfg.checkpoint.every == 0):
            saved = save()
            stopping = stopping or stop.requested(dist)  # a signal during the write: that checkpoint is the one
        if stopping:
            log.message(f"stopped by {stop.reason or 'another rank'} after step {state.step}; checkpoint "
                        f"{saved}; run the same command to resume")
            stop.clear(dist)
            log.close()
            return

    if cfg.checkpoint.final and (saved is None or Checkpointer.read_state(saved).step != state.step):
        saved = save()
    log.close()
    final_report(lm, tokenizer, cfg, saved and saved / "model", log.message)


if __name__ == "__main__":
    main()
    # The run is over. A stop signal from now on (a launcher passing on a SIGTERM that came late) must not kill
    # the process while the interpreter shuts down, which restores the default handlers: torchrun would report
    # the finished run as failed. Ignored signals stay ignored through shutdown.
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
