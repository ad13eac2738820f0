"""The training job's configuration: a dataclass schema of `configs/train.yaml` and its groups.

`load_config` merges the composed Hydra config into `TrainConfig` as an OmegaConf structured config and
checks every value (`validate`) before anything expensive happens: an unknown key, a wrong type or a bad
value raises `ConfigError` naming the full key (`curriculum.stages[1].seq_len`), with a suggestion for
near-miss typos.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from typing import Any

from powerattn.data.config import DataConfig, SourceConfig

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
SAVE_DTYPES = ("float32", "bfloat16", "float16")
LR_SCHEDULES = ("cosine", "linear", "constant")
VERIFY_LEVELS = ("hash", "size", "none")  # powerattn.manifest.LEVELS
# DeepSpeed keys that train.py derives from other sections; setting them by hand could contradict.
DERIVED_DEEPSPEED_KEYS = {
    "train_batch_size": "batch.tokens_per_step", "train_micro_batch_size_per_gpu": "batch.micro_batch_tokens",
    "gradient_accumulation_steps": "batch.tokens_per_step", "gradient_clipping": "optim.grad_clip",
    "bf16": "precision", "fp16": "precision", "optimizer": "optim", "scheduler": "optim",
}


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key."""


@dataclass
class ModelConfig:
    """Which model to train: an HF folder (`path`) and/or an architecture (`arch`, config.json names).

    path None builds `arch` from scratch (random init). With both, the folder's config.json must
    agree with `arch` on the architecture (catches a path pointing at the wrong model).
    max_position_embeddings / rope_theta / rope_scaling extend the context once, at load
    (see powerattn.model.extend_context); curriculum stages may raise rope_theta again.
    """

    path: str | None = None
    arch: dict[str, Any] | None = None
    attention_backend: str = "auto"         # auto | triton | flex | torch | sdpa (pattern=full only)
    activation_checkpointing: Any = False   # True (every layer) or a list of layer indices
    loss_chunk_size: int = 2048             # tokens per lm_head + cross-entropy chunk
    tiled_mlp: int = 0                      # tokens per MLP tile, recomputed in backward (0: untiled)
    offload_activations: bool = False       # checkpointed layers' inputs wait in CPU memory
    fused_ops: str = "auto"                 # auto | liger | none: Liger-Kernel's RMSNorm/RoPE/SwiGLU/loss
    max_position_embeddings: int | None = None
    rope_theta: float | None = None
    rope_scaling: Any = None                # None keeps the model's; "default", a type name, or a dict


@dataclass
class StageConfig:
    """One curriculum stage: `steps` (or `tokens`) optimizer steps on rows of `seq_len` tokens."""

    seq_len: int = 0
    steps: int | None = None
    tokens: int | None = None               # alternative to steps: steps = ceil(tokens / tokens_per_step)
    tokens_per_step: int | None = None      # None: batch.tokens_per_step
    rope_theta: float | None = None         # raise the RoPE base when this stage starts (ABF)


@dataclass
class CurriculumConfig:
    stages: list[StageConfig] = field(default_factory=list)


@dataclass
class BatchConfig:
    """Batch sizes in tokens; rows per micro-batch and gradient accumulation are derived per stage."""

    tokens_per_step: int = 16384            # global tokens per optimizer step
    micro_batch_tokens: int = 4096          # tokens one GPU holds per forward/backward (memory bound)


@dataclass
class ParallelConfig:
    sequence_parallel_size: int = 1         # DeepSpeed-Ulysses group size (consecutive ranks)


@dataclass
class OptimConfig:
    """AdamW with linear warmup then a cosine / linear decay to min_lr_ratio * lr, or constant."""

    lr: float = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0                  # 0 disables clipping
    warmup_steps: int = 0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1


@dataclass
class CheckpointConfig:
    every: int = 0                          # optimizer steps between checkpoints; 0: only at the end
    final: bool = True                      # checkpoint after the last step (false: benchmarks)
    keep_last: int = 2                      # complete checkpoints kept (older ones are deleted)
    save_dtype: str | None = None           # dtype of model/*.safetensors; None: the training dtype
    max_shard_size: str = "5GB"
    verify: str = "hash"                    # resuming checks the manifest: hash (every byte) | size | none
    weights_only: bool = True               # read DeepSpeed's pickles with torch.load(weights_only=True)


@dataclass
class LoggerConfig:
    backend: str = "none"                   # wandb | none (metrics.jsonl and the console always)
    project: str = "powerattn"
    entity: str | None = None
    mode: str = "auto"                      # auto (online only with credentials) | online | offline
    group: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class FinalEvalConfig:
    """Quick passkey check after the last step (powerattn.evaluation.quick_passkey)."""

    enabled: bool = True
    lengths: list[int] = field(default_factory=lambda: [512, 1024])
    depths: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0])
    samples: int = 2


@dataclass
class TrainConfig:
    run_name: str = "tiny"
    output_dir: str = "outputs/tiny"
    seed: int = 0
    precision: str = "auto"                 # auto: bf16 on CUDA, fp32 on CPU
    resume: str = "auto"                    # auto: from output_dir's latest checkpoint | none | a step dir
    resume_optimizer: bool = True           # false: only the checkpoint's model/ weights, a fresh optimizer
    check_only: bool = False                # run the checks that need no processes or weights, then exit
    check_memory: bool = True               # on GPUs: refuse a curriculum stage predicted not to fit (powerattn.memory)
    max_nonfinite_in_row: int = 5           # stop after this many consecutive steps with a non-finite loss
    progress: bool = True                   # tqdm bar on rank 0 in a terminal (else one line per step)
    peak_tflops: float | None = None        # per-GPU peak for MFU; None: looked up from the GPU name
    model: ModelConfig = field(default_factory=ModelConfig)
    pattern: dict[str, Any] = field(default_factory=lambda: {"name": "power"})
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    data: DataConfig = field(default_factory=DataConfig)
    deepspeed: dict[str, Any] = field(default_factory=dict)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    final_eval: FinalEvalConfig = field(default_factory=FinalEvalConfig)


# --- the composed config as a TrainConfig: OmegaConf merges it into the schema -------------------


def load_config(cfg) -> TrainConfig:
    """Validated TrainConfig from the composed Hydra config (or a mapping); raises ConfigError.

    OmegaConf merges it into the TrainConfig structured config, so it rejects unknown keys and wrong
    types with the full key path; `validate` then checks ranges and cross-field rules.
    """
    from omegaconf import OmegaConf, open_dict
    from omegaconf.errors import OmegaConfBaseException

    try:
        raw = OmegaConf.create(cfg)
        with open_dict(raw):
            raw.pop("hydra", None)
        # Elements of lists of dataclasses lose their index in OmegaConf's error path: merge them one by one.
        for path, cls in (("curriculum.stages", StageConfig), ("data.sources", SourceConfig)):
            for i, item in enumerate(OmegaConf.select(raw, path) or []):
                _typed(cls, item, f"{path}[{i}]")
        out = _typed(TrainConfig, raw, "")
    except OmegaConfBaseException as e:  # e.g. an interpolation pointing nowhere (${oc.env:UNSET})
        raise ConfigError(f"config: {str(e).splitlines()[0]}") from None
    if out.model.path is not None and out.data.tokenizer is None:
        # Continuing a model means keeping its tokenizer; the synthetic default would fit a new one of
        # the same size, which the vocabulary check cannot tell apart.
        out.data.tokenizer = out.model.path
    validate(out)
    return out


def _typed(cls, value, where: str):
    """OmegaConf.to_object of `value` merged into the structured config of `cls`; ConfigError names the key."""
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), value))
    except ConfigKeyError as e:
        key = ".".join(k for k in (where, str(e.full_key)) if k)
        known = [f.name for f in dataclasses.fields(e.object_type)] if dataclasses.is_dataclass(e.object_type) \
            else []
        close = difflib.get_close_matches(key.rsplit(".", 1)[-1], known, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        section = key.rsplit(".", 1)[0] if "." in key else "the top level"
        raise ConfigError(f"unknown config key '{key}'{hint}; {section} takes {known}") from None
    except OmegaConfBaseException as e:
        key = ".".join(k for k in (where, str(e.full_key)) if k) or "config"
        raise ConfigError(f"{key}: {str(e).splitlines()[0]}") from None
    except ValueError as e:  # a dataclass' own __post_init__ check
        raise ConfigError(f"{where or 'config'}: {e}") from None


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def validate(cfg: TrainConfig) -> None:
    """Value checks that need no files, processes or devices (those follow in the trainer)."""
    from powerattn.choices import BACKENDS
    from powerattn.model.config import FUSED_OPS, parse_size

    _check(cfg.precision in PRECISIONS, "precision", f"{cfg.precision!r} is not one of {PRECISIONS}")
    _check(bool(cfg.run_name) and "/" not in cfg.run_name, "run_name",
           f"{cfg.run_name!r} must be a plain name")
    _check(cfg.max_nonfinite_in_row >= 1, "max_nonfinite_in_row", "must be >= 1")
    _check(cfg.seed >= 0, "seed", f"must be >= 0, got {cfg.seed}")
    _check(bool(cfg.output_dir), "output_dir", "must not be empty")
    _check(bool(cfg.resume), "resume", "must be auto, none or a checkpoint folder")
    _check(cfg.peak_tflops is None or cfg.peak_tflops > 0, "peak_tflops", "must be > 0 or null")

    m = cfg.model
    _check(m.path is not None or m.arch is not None, "model", "set model.path (an HF folder) or model.arch")
    _check(m.attention_backend in BACKENDS, "model.attention_backend",
           f"{m.attention_backend!r} is not one of {BACKENDS}")
    _check(m.attention_backend != "sdpa" or cfg.pattern.get("name") == "full", "model.attention_backend",
           "sdpa runs dense attention only: use it with pattern=full (auto sends dense layers to SDPA on GPUs)")
    _check(m.fused_ops in FUSED_OPS, "model.fused_ops", f"{m.fused_ops!r} is not one of {FUSED_OPS}")
    _check(m.loss_chunk_size >= 1, "model.loss_chunk_size", "must be >= 1")
    _check(m.tiled_mlp >= 0, "model.tiled_mlp", "must be >= 0 (tokens per tile; 0: untiled)")
    _check(not m.offload_activations or bool(m.activation_checkpointing), "model.offload_activations",
           "offloads the inputs of checkpointed layers: set model.activation_checkpointing too")
    _check(m.max_position_embeddings is None or m.max_position_embeddings >= 1,
           "model.max_position_embeddings", "must be >= 1")
    _check(m.rope_theta is None or m.rope_theta > 0, "model.rope_theta", "must be > 0")
    num_layers = None
    if m.arch is not None:
        num_layers = arch_config(m.arch, vocab_size=m.arch.get("vocab_size") or 32000).num_hidden_layers
    validate_pattern(cfg.pattern, num_layers)

    stages = cfg.curriculum.stages
    _check(len(stages) > 0, "curriculum.stages", "needs at least one stage")
    sp = cfg.parallel.sequence_parallel_size
    _check(sp >= 1, "parallel.sequence_parallel_size", "must be >= 1")
    for i, s in enumerate(stages):
        key = f"curriculum.stages[{i}]"
        _check(s.seq_len >= 1, f"{key}.seq_len", f"must be >= 1, got {s.seq_len}")
        _check(s.seq_len % sp == 0, f"{key}.seq_len",
               f"{s.seq_len} must be divisible by parallel.sequence_parallel_size={sp}")
        _check((s.steps is None) != (s.tokens is None), key, "set exactly one of steps and tokens")
        _check((s.steps is None or s.steps >= 1) and (s.tokens is None or s.tokens >= 1), key,
               f"steps / tokens must be >= 1, got steps={s.steps}, tokens={s.tokens}")
        _check(s.tokens_per_step is None or s.tokens_per_step >= 1, f"{key}.tokens_per_step", "must be >= 1")
        _check(s.rope_theta is None or s.rope_theta > 0, f"{key}.rope_theta", "must be > 0")
    _check(cfg.data.seq_len == stages[0].seq_len, "data.seq_len",
           f"{cfg.data.seq_len} differs from curriculum.stages[0].seq_len={stages[0].seq_len}; the "
           "curriculum sets the sequence length (leave data.seq_len at its default interpolation)")
    validate_data(cfg.data)
    _check(cfg.batch.tokens_per_step >= 1, "batch.tokens_per_step", "must be >= 1")
    _check(cfg.batch.micro_batch_tokens >= 1, "batch.micro_batch_tokens", "must be >= 1")

    for key, source in DERIVED_DEEPSPEED_KEYS.items():
        _check(key not in cfg.deepspeed, f"deepspeed.{key}", f"is derived from {source}; set that instead")
    zero = cfg.deepspeed.get("zero_optimization") or {}
    stage = zero.get("stage", 0) if isinstance(zero, dict) else None
    _check(isinstance(stage, int) and not isinstance(stage, bool) and stage in (0, 1, 2, 3),
           "deepspeed.zero_optimization.stage",
           f"must be 0, 1, 2 or 3, got {zero.get('stage') if isinstance(zero, dict) else zero!r}")

    o = cfg.optim
    _check(o.lr > 0, "optim.lr", "must be > 0")
    _check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas",
           "must be two values in [0, 1)")
    _check(o.eps > 0 and o.weight_decay >= 0 and o.grad_clip >= 0, "optim",
           "eps must be > 0, weight_decay and grad_clip >= 0")
    _check(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
    _check(o.schedule in LR_SCHEDULES, "optim.schedule", f"{o.schedule!r} is not one of {LR_SCHEDULES}")
    _check(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]")

    c = cfg.checkpoint
    _check(c.every >= 0, "checkpoint.every", "must be >= 0 (0: only at the end)")
    _check(c.keep_last >= 1, "checkpoint.keep_last", "must be >= 1")
    _check(c.save_dtype is None or c.save_dtype in SAVE_DTYPES, "checkpoint.save_dtype",
           f"{c.save_dtype!r} is not one of {SAVE_DTYPES} or null")
    _check(c.verify in VERIFY_LEVELS, "checkpoint.verify", f"{c.verify!r} is not one of {VERIFY_LEVELS}")
    try:
        parse_size(c.max_shard_size)
    except ValueError as e:
        raise ConfigError(f"checkpoint.max_shard_size: {e}") from None

    lg = cfg.logger
    _check(lg.backend in ("wandb", "none"), "logger.backend", f"{lg.backend!r} is not 'wandb' or 'none'")
    _check(lg.mode in ("auto", "online", "offline"), "logger.mode",
           f"{lg.mode!r} is not auto, online or offline")
    fe = cfg.final_eval
    _check(all(n >= 16 for n in fe.lengths), "final_eval.lengths", "lengths must be >= 16 tokens")
    _check(all(0 <= d <= 1 for d in fe.depths), "final_eval.depths", "depths must lie in [0, 1]")
    _check(fe.samples >= 1, "final_eval.samples", "must be >= 1")


def validate_data(d: DataConfig) -> None:
    """The data section's values (its files are checked later, by train.py's check_inputs)."""
    _check(d.num_proc >= 1, "data.num_proc", f"must be >= 1, got {d.num_proc}")
    _check(d.seed >= 0, "data.seed", f"must be >= 0, got {d.seed}")
    _check(bool(d.text_field), "data.text_field", "must not be empty")
    _check(bool(d.cache_dir), "data.cache_dir", "must not be empty")
    for i, src in enumerate(d.sources):
        key = f"data.sources[{i}]"
        _check(bool(src.path), f"{key}.path", "must not be empty")
        _check(src.weight > 0, f"{key}.weight", f"must be > 0, got {src.weight}")
        _check(src.upsample_factor >= 1, f"{key}.upsample_factor", f"must be >= 1, got {src.upsample_factor}")
        _check(src.max_docs is None or src.max_docs >= 1, f"{key}.max_docs", "must be >= 1 or null")
        _check(src.upsample_min_tokens is None or src.upsample_min_tokens >= 1, f"{key}.upsample_min_tokens",
               "must be >= 1 or null")
    s = d.synthetic
    if not d.sources:
        _check(s.num_docs >= 1, "data.synthetic.num_docs", f"must be >= 1, got {s.num_docs}")
        _check(1 <= s.min_sentences <= s.max_sentences, "data.synthetic",
               f"needs 1 <= min_sentences <= max_sentences, got {s.min_sentences} and {s.max_sentences}")
        _check(0 <= s.task_fraction <= 1, "data.synthetic.task_fraction", "must lie in [0, 1]")
        from powerattn.data.synthetic import DOCUMENT_TASKS

        bad = [t for t in s.tasks if t not in DOCUMENT_TASKS]
        _check(bool(s.tasks) and not bad, "data.synthetic.tasks",
               f"must be a non-empty list of {list(DOCUMENT_TASKS)}, got {list(s.tasks)}")
        _check(s.vocab_size >= 260, "data.synthetic.vocab_size",
               f"must be >= 260 (256 byte pieces + special pieces + the corpus' characters), got {s.vocab_size}")
        _check(s.seed >= 0, "data.synthetic.seed", f"must be >= 0, got {s.seed}")


def validate_pattern(pattern: dict, num_layers: int | None) -> None:
    """`pattern` = {name, schedule, **params of make_pattern}; raises ConfigError naming the bad key."""
    from powerattn.model import resolve_attention_schedule
    from powerattn.patterns import pattern_from_dict

    try:
        pattern_from_dict(pattern)
        if num_layers is not None:
            resolve_attention_schedule(pattern.get("schedule"), num_layers)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"pattern: {e}") from None


# LlamaConfig fields that are sizes (>= 1 when set) or positive reals.
_ARCH_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "max_position_embeddings", "loss_chunk_size")
_ARCH_POSITIVE = ("rope_theta", "rms_norm_eps")
_SIMPLE = (int, float, bool, str)


def arch_config(arch: dict, **overrides):
    """LlamaConfig from a `model.arch` mapping (config.json names); errors name model.arch.<field>."""
    from powerattn.model import LlamaConfig

    known = {f.name for f in dataclasses.fields(LlamaConfig)} - {"hf_extra"}
    bad = sorted(set(arch) - known)
    if bad:
        raise ConfigError(f"model.arch: unknown field(s) {bad}; LlamaConfig takes {sorted(known)}")
    hints = typing.get_type_hints(LlamaConfig)
    for key, value in arch.items():  # types first: LlamaConfig would fail on them with a bare TypeError
        inner = [a for a in typing.get_args(hints[key]) if a is not type(None)]
        tp = hints[key] if hints[key] in _SIMPLE else inner[0] if len(inner) == 1 else None
        if value is not None and tp in _SIMPLE:
            ok = isinstance(value, (int, float) if tp is float else tp) and (tp is bool or not isinstance(value, bool))
            _check(ok, f"model.arch.{key}", f"expected {tp.__name__}, got {value!r}")
        if value is not None and key in _ARCH_SIZES:
            _check(value >= 1, f"model.arch.{key}", f"must be >= 1, got {value}")
        if key in _ARCH_POSITIVE:
            _check(value is not None and value > 0, f"model.arch.{key}", f"must be > 0, got {value!r}")
    values = {**arch, **{k: v for k, v in overrides.items() if v is not None}}
    try:
        return LlamaConfig(**values)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"model.arch: {e}") from None
