"""Per-GPU memory of a training run, predicted from the model's shape and the run's config before it starts.

    python -m powerattn.memory +experiment=llama3_8b_128k --gpus 2                 # the same overrides as train.py
    python -m powerattn.memory model=llama3_1b deepspeed=zero3 --gpus 1 --lengths 262144 524288

The prediction is the peak of torch's allocated memory (what train.py logs as peak_mem_gb), the largest of
three moments of a step, each a sum of terms counted from what this repository's code keeps alive:

- model states: bf16 weights and gradients (2 + 2 bytes a parameter), fp32 master weights and AdamW moments
  (4 + 8), divided over the ranks as the ZeRO stage says (stage 3: all of it; DeepSpeed partitions over every
  rank, Ulysses groups included); offloaded parts live in CPU memory instead;
- ZeRO-3 gathered weights: with more than one rank, up to stage3_max_live_parameters gathered at once;
- activations, per token a GPU holds (rows x seq_len / sequence-parallel size): a checkpointed layer keeps
  its input (2H bytes; none with model.offload_activations); a layer not checkpointed keeps everything its
  backward needs (two RMSNorms 8H each: an fp32 copy, the normalised and the scaled output; attention's q, k,
  v, output and, under Ulysses, the all-to-all's output; the MLP's gate, up, SiLU and product, 2I each);
  backward of one layer adds that layer's saved set again (recomputed) plus the MLP's gradients (4I) and the
  residual stream's (4H); with model.tiled_mlp=T the MLP's share is one tile's, 12 I T bytes in all;
- the loss: chunked cross-entropy's float32 logits and probabilities of one chunk (10 C V bytes) and lm_head's
  float32 gradient (4 V H) at the start of backward; the optimizer step: one float32 gradient sub-group.

Calibrated against train.py runs on H200s (docs/training.md#memory-planning has the table and the errors).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

GiB = 2**30
DS_MAX_LIVE = 10**9   # DeepSpeed's stage3_max_live_parameters and sub_group_size defaults
DS_SUB_GROUP = 10**9
# What the CUDA context, NCCL and cuBLAS take outside torch's allocator, and the share of the rest that a
# peak may use before fragmentation decides (measured: an 8B run at 256K failed with 124 GiB allocated and
# 12 GiB reserved but free).
OUTSIDE_ALLOCATOR_GIB = 1.5
SAFE_FRACTION = 0.9
# The share of a node's RAM that pinned offload buffers may take: the OS, data workers and page cache need the rest.
HOST_SAFE_FRACTION = 0.8


@dataclass(frozen=True)
class Layout:
    """How a run is spread: ranks, Ulysses group, ZeRO stage and what DeepSpeed offloads to the CPU."""

    world: int = 1
    sp: int = 1
    zero: int = 0
    precision: str = "bf16"            # bf16 | fp16 | fp32
    offload_optimizer: bool = False
    offload_param: bool = False
    max_live_parameters: int = DS_MAX_LIVE
    sub_group_size: int = DS_SUB_GROUP

    @classmethod
    def from_deepspeed(cls, ds: dict, world: int, sp: int, precision: str) -> Layout:
        zero = ds.get("zero_optimization") or {}
        device = lambda key: (zero.get(key) or {}).get("device", "none") == "cpu"
        return cls(world, sp, int(zero.get("stage", 0)), precision, device("offload_optimizer"),
                   device("offload_param"), int(zero.get("stage3_max_live_parameters", DS_MAX_LIVE)),
                   int(zero.get("sub_group_size", DS_SUB_GROUP)))


@dataclass
class Estimate:
    """Bytes per GPU (host: CPU memory per GPU's process); `peak` is the largest of the three moments."""

    weights: float
    grads: float
    optimizer: float
    gathered: float
    checkpoints: float
    layer: float           # backward of the last layer: saved set + gradients (+ layers not checkpointed)
    loss: float            # start of backward: chunked cross-entropy buffers + lm_head's fp32 gradient
    step: float            # optimizer step: one fp32 gradient sub-group
    host: float

    @property
    def states(self) -> float:
        return self.weights + self.grads + self.optimizer

    @property
    def moments(self) -> dict[str, float]:
        base = self.states + self.gathered
        return {"backward": base + self.checkpoints + self.layer, "loss": base + self.checkpoints + self.loss,
                "step": base + self.step}

    @property
    def peak(self) -> float:
        return max(self.moments.values())

    @property
    def peak_at(self) -> str:
        return max(self.moments, key=self.moments.get)


def count_parameters(config) -> tuple[int, int]:
    """(all parameters, lm_head's) of a LlamaConfig, counted on the meta device (tied lm_head counted once)."""
    import torch

    from powerattn.model import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config, init_weights=False)
    return sum(p.numel() for p in model.parameters()), model.lm_head.weight.numel()


def estimate(config, tokens: int, layout: Layout, params: tuple[int, int] | None = None) -> Estimate:
    """Predicted per-GPU memory for one micro-batch of `tokens` tokens on each GPU (rows x seq_len / sp)."""
    n, _ = params or count_parameters(config)
    mixed = layout.precision in ("bf16", "fp16")
    a = 2 if mixed else 4                                         # bytes of a weight / activation element
    w = layout.world
    part = {0: (1, 1, 1), 1: (1, 1, w), 2: (1, w, w), 3: (w, w, w)}[layout.zero]  # weights, grads, optimizer
    opt_bytes = (4 if mixed else 0) + 8                           # fp32 master (mixed precision) + AdamW moments
    weights = 0.0 if layout.offload_param else n * a / part[0]
    grads = n * a / part[1]
    optimizer = 0.0 if layout.offload_optimizer else n * opt_bytes / part[2]
    if layout.zero == 0 and mixed:
        optimizer += n * 4                                        # DeepSpeed's bf16 optimizer keeps fp32 gradients
    host = (n * (opt_bytes + 4) / part[2] if layout.offload_optimizer else 0) + (
        n * a / part[0] if layout.offload_param else 0)
    gathered = min(n, layout.max_live_parameters) * a if layout.zero == 3 and w > 1 else 0.0

    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    hq, hkv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    tile = config.tiled_mlp if 0 < config.tiled_mlp < tokens else 0
    norm = 4 * h + 2 * a * h                                      # fp32 copy, normalised, scaled output
    attention = a * (hq + 2 * hkv) + a * hq + (a * hq if layout.sp > 1 else 0)  # q k v, output, all-to-all output
    mlp = 0 if tile else 4 * a * i                                # gate, up, SiLU, product
    saved = 2 * norm + attention + mlp                            # what one layer keeps for its backward
    grads_transient = (0 if tile else 2 * a * i) + 2 * a * h      # MLP gradients, residual stream gradients
    checkpointed = len(config.checkpointed_layers())
    plain = config.num_hidden_layers - checkpointed
    per_token_ckpt = a * h * checkpointed
    checkpoints = tokens * (0 if config.offload_activations else per_token_ckpt) + tokens * plain * saved
    host += tokens * per_token_ckpt if config.offload_activations else 0
    layer = tokens * ((saved if checkpointed else 0) + grads_transient) + 6 * a * i * (tile or 0)
    chunk = min(config.loss_chunk_size, tokens)
    loss = tokens * (norm + 2 * a * h) + 10 * chunk * v + 2 * v * h + (4 * v * h if tokens > chunk else 0)
    step = 0.0
    if not layout.offload_optimizer and mixed:
        step = 4 * (min(layout.sub_group_size, n / part[2]) if layout.zero == 3 else n / part[2])
    return Estimate(weights, grads, optimizer, gathered, checkpoints, layer, loss, step, host)


def verdict(peak: float, gpu_gib: float) -> str:
    usable = gpu_gib - OUTSIDE_ALLOCATOR_GIB
    if peak / GiB <= SAFE_FRACTION * usable:
        return "fits"
    if peak / GiB <= usable:
        return "tight: fragmentation decides (expandable_segments helps)"
    return "DOES NOT FIT"


def host_fits(host_per_gpu: float, gpus_per_node: int, host_gib: float | None) -> bool:
    """Whether the node's CPU memory holds what every GPU's process offloads (True when unknown)."""
    return host_gib is None or host_per_gpu * gpus_per_node / GiB <= HOST_SAFE_FRACTION * host_gib


def host_verdict(host_per_gpu: float, gpus_per_node: int, host_gib: float | None) -> str:
    """The table's host note ("" when nothing is offloaded)."""
    if not host_per_gpu:
        return ""
    note = f"; host {host_per_gpu / GiB:.0f} GiB"
    if host_fits(host_per_gpu, gpus_per_node, host_gib):
        return note
    return f"{note} x {gpus_per_node} GPUs: HOST MEMORY DOES NOT FIT ({host_gib:.0f} GiB)"


def local_host_gib() -> float | None:
    """This machine's physical memory (None where the platform does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(cfg, world: int, sp: int, stages: list[tuple[int, int, int]], gpu_gib: float,
               gpus_per_node: int, host_gib: float | None) -> None:
    """ConfigError naming the first curriculum stage (index, seq_len, rows per micro-batch) whose predicted
    peak does not fit the GPU, or whose offloaded activations do not fit the node's memory, with the
    switches that would make it fit; train.py calls this before anything starts (check_memory)."""
    from powerattn.training.config import ConfigError

    config, _ = _model_config(cfg)
    layout = _layout(cfg, world, sp)
    params = count_parameters(config)
    for index, seq_len, micro in stages:
        tokens = micro * seq_len // sp
        e = estimate(config, tokens, layout, params)
        gpu_short = verdict(e.peak, gpu_gib) == "DOES NOT FIT"
        if not gpu_short and host_fits(e.host, gpus_per_node, host_gib):
            continue
        where = (f"~{e.peak / GiB:.0f} GiB per GPU, the GPU has {gpu_gib:.0f}" if gpu_short else
                 f"{e.host / GiB:.0f} GiB of CPU memory per GPU x {gpus_per_node}, the node has {host_gib:.0f}")
        fixes = [what for what, alt in ((w, estimate(c, tokens, lay, params)) for w, c, lay in
                                          _alternatives(config, layout))
                 if verdict(alt.peak, gpu_gib) == "fits" and host_fits(alt.host, gpus_per_node, host_gib)]
        raise ConfigError(
            f"memory: curriculum stage {index} (seq_len {seq_len}, {tokens} tokens per GPU) needs {where} "
            f"(python -m powerattn.memory with these overrides shows the terms); "
            + (f"{fixes[0]} would fit, or " if fixes else "")
            + "set check_memory=false to start anyway")


# ---- CLI: compose the run's config as train.py would, then one line per curriculum stage ---------------


def _compose(overrides: list[str], config_dir: Path):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        return compose("train", overrides=overrides)


def _model_config(cfg):
    """The LlamaConfig train.py would build: model.path's config.json if it exists, else model.arch."""
    from powerattn.model import load_config
    from powerattn.training.config import arch_config

    m = cfg.model
    over = dict(activation_checkpointing=m.activation_checkpointing, loss_chunk_size=m.loss_chunk_size,
                tiled_mlp=m.tiled_mlp, offload_activations=m.offload_activations)
    if m.path and (Path(m.path) / "config.json").is_file():
        return load_config(m.path, **over), f"{m.path}/config.json"
    if m.arch is None:
        raise SystemExit(f"error: model.path {m.path!r} has no config.json and model.arch is null")
    vocab = m.arch.get("vocab_size") or 32000
    return arch_config(m.arch, vocab_size=vocab, **over), "model.arch" + ("" if m.arch.get("vocab_size") else
                                                                        " (vocab_size 32000 assumed)")


def _layout(cfg, world: int, sp: int) -> Layout:
    """The run's Layout (precision auto: bf16, what train.py picks on GPUs)."""
    return Layout.from_deepspeed(cfg.deepspeed, world, sp, "bf16" if cfg.precision == "auto" else cfg.precision)


def _gib(x: float) -> str:
    return f"{x / GiB:6.1f}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Predicted per-GPU memory of a train.py run (see module docstring).")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, as for train.py (+experiment=..., key=value)")
    p.add_argument("--gpus", type=int, default=8, help="GPUs per node (default 8)")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpu-mem", type=float, default=None,
                   help="GiB per GPU (default: this machine's GPU, else 139.8, an H200)")
    p.add_argument("--host-mem", type=float, default=None,
                   help="GiB of CPU memory per node (default: this machine's)")
    p.add_argument("--lengths", type=int, nargs="*", default=[],
                   help="also these sequence lengths, one row per micro-batch")
    p.add_argument("--config-dir", type=Path, default=Path(__file__).resolve().parents[1] / "configs")
    args = p.parse_intermixed_args(argv)  # overrides before, between or after the options
    # Experiments may size Ulysses from the launcher's variables; answer for the layout asked about.
    os.environ.setdefault("LOCAL_WORLD_SIZE", str(args.gpus))
    os.environ.setdefault("WORLD_SIZE", str(args.gpus * args.nodes))

    from powerattn.training.config import ConfigError, load_config
    from powerattn.training.curriculum import batch_shape, plan_curriculum

    try:
        cfg = load_config(_compose(args.overrides, args.config_dir))
        world, sp = args.gpus * args.nodes, cfg.parallel.sequence_parallel_size
        if world % sp:
            raise ConfigError(f"parallel.sequence_parallel_size={sp} does not divide {world} GPUs")
        plan = plan_curriculum(cfg.curriculum.stages, cfg.batch, world // sp, sp)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    config, source = _model_config(cfg)
    layout = _layout(cfg, world, sp)
    precision = layout.precision
    gpu = args.gpu_mem or local_gpu_gib() or 139.8
    host_gib = args.host_mem or local_host_gib()
    params = count_parameters(config)
    base = estimate(config, 1, layout, params)
    ckpt = len(config.checkpointed_layers())
    print(f"model: {source}: {params[0] / 1e9:.2f}B parameters, {config.num_hidden_layers} layers, hidden "
          f"{config.hidden_size}, MLP {config.intermediate_size}, vocab {config.vocab_size}")
    print(f"layout: {world} GPUs ({args.nodes} node(s)), ZeRO-{layout.zero}"
          f"{' + optimizer on CPU' if layout.offload_optimizer else ''}"
          f"{' + weights on CPU' if layout.offload_param else ''}, Ulysses SP={sp}, {precision}; activation "
          f"checkpointing {ckpt}/{config.num_hidden_layers} layers"
          f"{', inputs offloaded' if config.offload_activations else ''}"
          f"{f', MLP tiles of {config.tiled_mlp} tokens' if config.tiled_mlp else ''}; GPU {gpu:.1f} GiB")
    print(f"per GPU: weights{_gib(base.weights)}  gradients{_gib(base.grads)}  optimizer{_gib(base.optimizer)}"
          f"  gathered (ZeRO-3){_gib(base.gathered)} GiB")
    rows = [(f"stage {s.index}", s.seq_len, s.micro_batch_size) for s in plan.stages]
    for length in args.lengths:
        try:
            micro, _ = batch_shape(length, length * (world // sp), length // sp, world // sp, sp)
        except ConfigError as e:
            sys.exit(f"error: --lengths {length}: {e}")
        rows.append(("extra", length, micro))
    print(f"{'':9}{'seq_len':>8}{'tok/GPU':>9}{'ckpts':>7}{'layer':>7}{'loss':>7}{'peak':>7}  GiB at      verdict")
    for label, seq_len, micro in rows:
        tokens = micro * seq_len // sp
        e = estimate(config, tokens, layout, params)
        host = host_verdict(e.host, args.gpus, host_gib)
        print(f"{label:<9}{seq_len:>8}{tokens:>9}{_gib(e.checkpoints):>7}{_gib(e.layer):>7}{_gib(e.loss):>7}"
              f"{_gib(e.peak):>7}      {e.peak_at:<9}{verdict(e.peak, gpu)}{host}")
    worst = max(rows, key=lambda r: r[1] * r[2])
    tokens = worst[2] * worst[1] // sp
    e = estimate(config, tokens, layout, params)
    if verdict(e.peak, gpu) != "fits":
        print(f"to save memory at {worst[1]} (peak {e.peak / GiB:.1f} GiB):")
        for what, alt_config, alt_layout in _alternatives(config, layout):
            alt = estimate(alt_config, tokens, alt_layout, params)
            print(f"  {what:<46} {alt.peak / GiB:6.1f} GiB  {verdict(alt.peak, gpu)}")


def _alternatives(config, layout: Layout):
    import dataclasses

    if not config.offload_activations and config.checkpointed_layers():
        yield "model.offload_activations=true", dataclasses.replace(config, offload_activations=True), layout
    if not config.tiled_mlp:
        yield "model.tiled_mlp=8192", dataclasses.replace(config, tiled_mlp=8192), layout
    if layout.zero == 3 and not layout.offload_optimizer:
        yield "deepspeed=zero3_offload_optimizer", config, dataclasses.replace(layout, offload_optimizer=True)
    if not config.offload_activations and not config.tiled_mlp and config.checkpointed_layers():
        both = dataclasses.replace(config, offload_activations=True, tiled_mlp=8192)
        yield "offload_activations + tiled_mlp=8192", both, layout
        if layout.zero == 3 and not layout.offload_optimizer:
            yield "... + zero3_offload_optimizer", both, dataclasses.replace(layout, offload_optimizer=True)


def local_gpu_gib() -> float | None:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_properties(0).total_memory / GiB
    except Exception:  # no driver, no device: fall back to the default
        return None
    return None


if __name__ == "__main__":
    main()
