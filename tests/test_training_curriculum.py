"""Curriculum stages: batch shapes derived per stage (tokens per step constant, micro-batches within
memory), stage lookup, RoPE per stage, and errors that say what to change."""

import pytest

from powerattn.training.config import BatchConfig, ConfigError, StageConfig
from powerattn.training.curriculum import batch_shape, plan_curriculum


def _plan(stages, tokens_per_step=65536, micro_batch_tokens=16384, dp=2, sp=1):
    return plan_curriculum([StageConfig(**s) for s in stages], BatchConfig(tokens_per_step, micro_batch_tokens), dp, sp)


def test_rows_per_micro_batch_shrink_as_rows_grow_at_constant_tokens():
    plan = _plan([{"seq_len": n, "steps": 10} for n in (2048, 4096, 8192, 16384)], tokens_per_step=131072)
    shapes = [(s.micro_batch_size, s.grad_accum) for s in plan.stages]
    assert shapes == [(8, 4), (4, 4), (2, 4), (1, 4)]
    for s in plan.stages:
        assert 2 * s.micro_batch_size * s.grad_accum * s.seq_len == s.tokens_per_step == 131072
        assert s.micro_batch_size * s.seq_len <= 16384
    short = _plan([{"seq_len": 1024, "steps": 1}], tokens_per_step=8192)  # the whole step fits one micro-batch
    assert (short.stages[0].micro_batch_size, short.stages[0].grad_accum) == (4, 1)


def test_sequence_parallel_splits_each_row_over_the_group():
    # 131072-token rows over 8 GPUs: 16384 tokens per GPU, one row per micro-batch.
    micro, accum = batch_shape(131072, 1048576, 16384, dp_size=1, sp_size=8)
    assert (micro, accum) == (1, 8)
    assert batch_shape(32768, 1048576, 16384, dp_size=1, sp_size=8) == (4, 8)


def test_micro_batch_rows_divide_the_rows_of_a_step():
    # 6 rows per step and room for 4 per micro-batch: 3 rows x 2 accumulation steps, never 4 + 2.
    assert batch_shape(1024, 6 * 1024, 4096, dp_size=1, sp_size=1) == (3, 2)


def test_steps_from_tokens_and_stage_lookup():
    plan = _plan([{"seq_len": 4096, "tokens": 65536 * 3 + 1}, {"seq_len": 8192, "steps": 2, "rope_theta": 1e6},
                  {"seq_len": 8192, "steps": 1}])
    assert [(s.start_step, s.steps) for s in plan.stages] == [(0, 4), (4, 2), (6, 1)]
    assert plan.total_steps == 7
    assert [plan.stage_at(i).index for i in range(9)] == [0, 0, 0, 0, 1, 1, 2, 2, 2]
    assert plan.rope_theta_at(plan.stages[0]) is None
    assert plan.rope_theta_at(plan.stages[2]) == 1e6  # a RoPE base stays in force in later stages
    assert "tokens/step" in plan.describe()


def test_a_stage_may_set_its_own_tokens_per_step():
    plan = _plan([{"seq_len": 4096, "steps": 1}, {"seq_len": 4096, "steps": 1, "tokens_per_step": 131072}])
    assert [s.tokens_per_step for s in plan.stages] == [65536, 131072]


def test_impossible_shapes_say_what_to_change():
    with pytest.raises(ConfigError, match=r"stages\[1\].*batch\.tokens_per_step=65536.*use e\.g\. 49152 or 98304"):
        _plan([{"seq_len": 4096, "steps": 1}, {"seq_len": 24576, "steps": 1}], micro_batch_tokens=32768)
    with pytest.raises(ConfigError, match=r"stages\[0\].*more than batch\.micro_batch_tokens=16384"):
        _plan([{"seq_len": 32768, "steps": 1}], dp=1)
    with pytest.raises(ConfigError, match=r"stages\[0\]\.tokens_per_step=1000"):
        _plan([{"seq_len": 4096, "steps": 1, "tokens_per_step": 1000}])
