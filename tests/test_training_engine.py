"""One optimizer step (with a stand-in engine recording what DeepSpeed would be asked to do), the derived
DeepSpeed config, the LR schedule and optimizer groups, FLOP counting, and the model checks."""

import math

import pytest
import torch

from powerattn.data import collate
from powerattn.model import LlamaConfig, LlamaForCausalLM, flops_per_token
from powerattn.patterns import make_pattern
from powerattn.training.config import ConfigError, OptimConfig, TrainConfig
from powerattn.training.curriculum import Stage, plan_curriculum
from powerattn.training.distributed import Dist
from powerattn.training.engine import (
    NonFiniteGuard,
    NonFiniteLossError,
    StepResult,
    deepspeed_config,
    train_step,
)
from powerattn.training.metrics import FlopCounter, peak_flops
from powerattn.training.microbatch import make_microbatch
from powerattn.training.modeling import apply_stage_context, check_model
from powerattn.training.optim import LRSchedule, param_groups

CPU = Dist(0, 1, 0, torch.device("cpu"))


class Scheduler:
    steps = 0

    def step(self):
        self.steps += 1


class FakeEngine:
    """Returns 2.0 per target token (NaN for the forward calls listed in `bad`) and records each call."""

    def __init__(self, bad=()):
        self.bad, self.forwards, self.log, self.steps = set(bad), 0, [], 0
        self.lr_scheduler = Scheduler()

    def get_lr(self):
        return [0.5]

    def set_gradient_accumulation_boundary(self, value):
        self.log.append(("boundary", value))

    def __call__(self, batch):
        i, self.forwards = self.forwards, self.forwards + 1
        self.log.append(("forward", i))
        value = math.nan if i in self.bad else 2.0 * batch.num_targets
        return torch.tensor(value, requires_grad=True)

    def backward(self, loss, scale_wrt_gas=True):
        assert not scale_wrt_gas
        self.log.append(("backward", float(loss.detach())))

    def zero_optimization(self):
        return True

    def step(self):
        self.steps += 1

    def get_global_grad_norm(self):
        return 3.0


def _loader(n):
    rows = [[torch.arange(3, 3 + k).numpy(), torch.arange(5, 5 + 16 - k).numpy()] for k in range(4, 4 + n)]
    return iter([collate([r], 16, pad_id=0) for r in rows])


STAGE = Stage(index=0, seq_len=16, start_step=0, steps=1, micro_batch_size=1, grad_accum=3, tokens_per_step=48,
              rope_theta=None)


def test_a_step_is_the_token_mean_over_all_micro_batches():
    engine = FakeEngine()
    out = train_step(engine, _loader(3), STAGE, CPU, flops_of=lambda b: 10.0)
    backward = [v for k, v in engine.log if k == "backward"]
    assert len(backward) == 3 and engine.steps == 1
    assert sum(backward) == pytest.approx(2.0)  # sum of token losses / tokens of the step
    assert [v for k, v in engine.log if k == "boundary"] == [False, False, True]
    assert out == StepResult(loss=2.0, nonfinite=0, applied=True, lr=0.5, grad_norm=3.0, flops=30.0, tokens=48,
                             seconds=out.seconds)


def test_a_non_finite_micro_batch_is_left_out():
    engine = FakeEngine(bad={1})
    out = train_step(engine, _loader(3), STAGE, CPU, flops_of=lambda b: 0.0)
    assert [k for k, _ in engine.log if k == "backward"] == ["backward"] * 2
    assert out.applied and out.nonfinite == 1 and out.loss == 2.0


def test_a_step_without_finite_micro_batches_is_skipped_but_the_lr_schedule_moves():
    engine = FakeEngine(bad={0, 1, 2})
    out = train_step(engine, _loader(3), STAGE, CPU, flops_of=lambda b: 0.0)
    assert not out.applied and math.isnan(out.loss) and out.nonfinite == 3
    assert engine.steps == 0 and engine.lr_scheduler.steps == 1
    assert not [k for k, _ in engine.log if k == "backward"]


def test_a_bad_last_micro_batch_still_closes_the_accumulation():
    engine = FakeEngine(bad={2})
    out = train_step(engine, _loader(3), STAGE, CPU, flops_of=lambda b: 0.0)
    # forward 3 is the neutral micro-batch: zero-weighted, so the boundary's reduction adds nothing.
    assert engine.log[-2:] == [("forward", 3), ("backward", 0.0)]
    assert out.applied and engine.steps == 1


def test_the_guard_stops_after_n_bad_steps_in_a_row():
    bad = StepResult(math.nan, 1, False, 0.1, None, 0.0, 1, 1.0)
    good = StepResult(1.0, 0, True, 0.1, None, 0.0, 1, 1.0)
    guard = NonFiniteGuard(limit=3)
    for r in (bad, bad, good, bad, bad):
        guard.update(r, step=1)
    assert guard.in_row == 2
    with pytest.raises(NonFiniteLossError, match="3 consecutive steps.*step 7.*optim.lr"):
        guard.update(bad, step=7)


def test_num_targets_skips_document_starts_and_padding():
    batch = collate([[torch.arange(5).numpy(), torch.arange(3).numpy()]], 10, pad_id=0)
    assert make_microbatch(batch).num_targets == 4 + 2  # two documents, first tokens unlabelled, two padding


def test_deepspeed_config_derives_batch_precision_and_clipping():
    cfg = TrainConfig()
    cfg.deepspeed = {"zero_optimization": {"stage": 3}}
    stage = Stage(0, 1024, 0, 1, micro_batch_size=2, grad_accum=4, tokens_per_step=8192, rope_theta=None)
    ds = deepspeed_config(cfg, stage, "bf16")
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 4
    assert ds["bf16"] == {"enabled": True} and ds["fp16"] == {"enabled": False}
    assert ds["gradient_clipping"] == cfg.optim.grad_clip and ds["zero_optimization"] == {"stage": 3}
    assert cfg.deepspeed == {"zero_optimization": {"stage": 3}}  # the config itself is not modified


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cos = LRSchedule(OptimConfig(warmup_steps=4, schedule="cosine", min_lr_ratio=0.1), total_steps=14)
    assert [cos(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert cos(4) == pytest.approx(1.0) and cos(9) == pytest.approx(0.55) and cos(14) == pytest.approx(0.1)
    lin = LRSchedule(OptimConfig(warmup_steps=0, schedule="linear", min_lr_ratio=0.0), total_steps=10)
    assert lin(5) == pytest.approx(0.5)
    assert LRSchedule(OptimConfig(warmup_steps=2, schedule="constant"), 10)(7) == 1.0


def test_norms_and_biases_get_no_weight_decay():
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, model_type="qwen2"))
    decay, no_decay = param_groups(model, 0.1)
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 3 + 3  # 3 norms + q/k/v biases


def test_flops_count_each_packed_document_at_its_own_length():
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4)
    pattern = make_pattern("power", block_size=16)
    count = FlopCounter(config, [pattern] * 2)
    one = {"cu_seqlens": torch.tensor([0, 4096], dtype=torch.int32)}
    packed = {"cu_seqlens": torch.tensor([0, 1024, 2048, 4096], dtype=torch.int32)}
    assert count(one) == pytest.approx(4096 * flops_per_token(config, 4096, pattern))
    assert count(packed) < count(one)  # shorter documents attend to fewer keys


def test_peak_flops_needs_a_gpu_or_an_override():
    assert peak_flops(torch.device("cpu")) is None
    assert peak_flops(torch.device("cpu"), 100.0) == 1e14


def test_model_checks_run_before_any_weights(tmp_path):
    cfg = TrainConfig()
    cfg.model.arch = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
                      "num_key_value_heads": 2, "vocab_size": None}
    assert check_model(cfg, vocab_size=100, sp_size=2).vocab_size == 100
    with pytest.raises(ConfigError, match="sequence_parallel_size=4 must divide.*key/value heads \\(2\\)"):
        check_model(cfg, vocab_size=100, sp_size=4)
    cfg.model.arch["vocab_size"] = 50
    with pytest.raises(ConfigError, match="tokenizer has 100 tokens"):
        check_model(cfg, vocab_size=100, sp_size=1)
    cfg.model.path = str(tmp_path)
    with pytest.raises(ConfigError, match="model.path.*no config.json"):
        check_model(cfg, vocab_size=10, sp_size=1)
    LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=4)).save_pretrained(str(tmp_path))
    with pytest.raises(ConfigError, match="num_key_value_heads: config.json 4 vs model.arch 2"):
        check_model(cfg, vocab_size=10, sp_size=1)


def test_stage_context_grows_the_length_and_sets_the_rope_base():
    from powerattn.training.config import BatchConfig, StageConfig

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=1024))
    stages = [StageConfig(seq_len=512, steps=1), StageConfig(seq_len=2048, steps=1, rope_theta=5e5),
              StageConfig(seq_len=1024, steps=1)]
    plan = plan_curriculum(stages, BatchConfig(4096, 4096), 1, 1)
    assert not apply_stage_context(model, plan, plan.stages[0])
    assert apply_stage_context(model, plan, plan.stages[1])
    assert (model.config.max_position_embeddings, model.config.rope_theta) == (2048, 5e5)
    assert not apply_stage_context(model, plan, plan.stages[2])  # later stages keep both
