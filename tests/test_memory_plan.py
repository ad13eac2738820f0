"""powerattn.memory: the per-token terms are what the model's code saves for backward (measured with saved-tensor
hooks on CPU), the prediction matches the peaks measured on H200s within the documented errors, the memory
switches and ZeRO stages move it the right way, and the CLI answers for a composed experiment."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from powerattn.memory import GiB, Layout, estimate, verdict
from powerattn.model import LlamaConfig
from powerattn.model.llama import MLP, RMSNorm

ROOT = Path(__file__).resolve().parents[1]
LLAMA3_8B = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=8, activation_checkpointing=True,
                        loss_chunk_size=4096)
LLAMA32_1B = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                         activation_checkpointing=True, loss_chunk_size=4096)
# (model, tokens per GPU, GPUs = Ulysses SP, measured peak GiB): train.py on H200s, ZeRO-3, power, bf16,
# random init, activation checkpointing (docs/training.md#memory-planning).
MEASURED = [
    (LLAMA3_8B, 32768, 2, 78.0), (LLAMA3_8B, 65536, 2, 95.0),
    (LLAMA32_1B, 131072, 1, 44.9), (LLAMA32_1B, 262144, 1, 70.7), (LLAMA32_1B, 524288, 1, 122.4),
    (LLAMA32_1B, 65536, 2, 25.4),
]


def _saved_bytes_per_token(module, x):
    """Bytes of the tensors `module` saves for backward, its input and parameters excluded, per token."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    for t in [x, *module.parameters()]:
        storages.pop(t.untyped_storage().data_ptr(), None)
    return sum(storages.values()) / x.shape[:-1].numel()


def test_per_token_terms_are_what_the_code_saves():
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    x = torch.randn(2, 50, 64, dtype=torch.bfloat16, requires_grad=True)
    h, i = config.hidden_size, config.intermediate_size
    # RMSNorm: an fp32 copy (4H), the normalised bf16 (2H), 1/rms (4 bytes); its output (2H) is saved by the
    # projection after it: 8H in the estimate.
    assert _saved_bytes_per_token(RMSNorm(h, 1e-6).to(torch.bfloat16), x) == 6 * h + 4
    assert _saved_bytes_per_token(MLP(config).to(torch.bfloat16), x) == 8 * i  # gate, up, SiLU, product
    tiled = dataclasses.replace(config, tiled_mlp=16)
    assert _saved_bytes_per_token(MLP(tiled).to(torch.bfloat16), x) == 0  # only the tile inputs: views of x


@pytest.mark.parametrize("config, tokens, gpus, measured", MEASURED)
def test_prediction_matches_the_measured_peaks(config, tokens, gpus, measured):
    predicted = estimate(config, tokens, Layout(world=gpus, sp=gpus, zero=3)).peak / GiB
    assert abs(predicted - measured) / measured < 0.05, f"predicted {predicted:.1f} GiB, measured {measured}"


def test_8b_at_256k_on_two_h200s_is_not_called_safe_and_the_switches_make_it_fit():
    layout = Layout(world=2, sp=2, zero=3)
    e = estimate(LLAMA3_8B, 131072, layout)  # measured: out of memory with 124 GiB allocated + 12 reserved
    assert e.peak / GiB > 124 and verdict(e.peak, 139.8) != "fits"
    both = dataclasses.replace(LLAMA3_8B, offload_activations=True, tiled_mlp=8192)
    assert verdict(estimate(both, 131072, layout).peak, 139.8) == "fits"


def test_switches_and_stages_move_memory_the_right_way():
    tokens, layout = 65536, Layout(world=2, sp=2, zero=3)
    base = estimate(LLAMA3_8B, tokens, layout)
    offloaded = estimate(dataclasses.replace(LLAMA3_8B, offload_activations=True), tokens, layout)
    assert base.checkpoints - offloaded.checkpoints == offloaded.host == tokens * 2 * 4096 * 32
    tiled = estimate(dataclasses.replace(LLAMA3_8B, tiled_mlp=4096), tokens, layout)
    assert tiled.layer < base.layer and tiled.checkpoints == base.checkpoints
    opt_cpu = estimate(LLAMA3_8B, tokens, dataclasses.replace(layout, offload_optimizer=True))
    assert opt_cpu.optimizer == 0 and opt_cpu.host > 0 and opt_cpu.peak < base.peak
    peaks = [estimate(LLAMA3_8B, tokens, Layout(world=8, sp=8, zero=z)).peak for z in (0, 1, 2, 3)]
    assert peaks == sorted(peaks, reverse=True)
    assert estimate(LLAMA3_8B, tokens, Layout(world=1, sp=1, zero=3)).gathered == 0  # one rank gathers nothing
    plain = dataclasses.replace(LLAMA3_8B, activation_checkpointing=False)
    assert estimate(plain, tokens, layout).peak > 3 * base.peak


def test_cli_for_a_composed_experiment():
    proc = subprocess.run([sys.executable, "-m", "powerattn.memory", "+experiment=llama3_8b_128k", "--gpus", "2",
                           "--lengths", "262144", "524288"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "8.03B parameters" in out and "Ulysses SP=2" in out and "stage 2    131072" in out
    assert "DOES NOT FIT" in out and "model.offload_activations=true" in out
    proc = subprocess.run([sys.executable, "-m", "powerattn.memory", "+experiment=llama3_8b_128k", "--gpus", "3"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "sequence_parallel_size" in proc.stderr


# The same, with model.fused_ops=auto (Liger-Kernel's RMSNorm, SwiGLU and fused linear + cross-entropy save less
# than the eager ops the terms count): two H200s, ZeRO-3, SP=2, power (docs/bench/gpu_8b_h200x2.json,
# frontier_8b_h200x2.json). The prediction stays above the measurement and within 15 %.
OFFLOAD = dataclasses.replace(LLAMA3_8B, offload_activations=True)
SWITCHED = dataclasses.replace(LLAMA3_8B, offload_activations=True, tiled_mlp=8192)
MEASURED_FUSED = [
    (LLAMA3_8B, 32768, 75.5), (LLAMA3_8B, 65536, 89.0), (OFFLOAD, 65536, 74.1),
    (SWITCHED, 65536, 68.8), (SWITCHED, 131072, 73.6), (SWITCHED, 262144, 83.3),
]


@pytest.mark.parametrize("config, tokens, measured", MEASURED_FUSED)
def test_prediction_bounds_the_measured_peaks_with_fused_ops(config, tokens, measured):
    predicted = estimate(config, tokens, Layout(world=2, sp=2, zero=3)).peak / GiB
    assert 0 <= (predicted - measured) / measured < 0.15, f"predicted {predicted:.1f} GiB, measured {measured}"


def _stages(*overrides):
    from hydra import compose, initialize_config_dir

    from powerattn.training.config import load_config
    from powerattn.training.curriculum import plan_curriculum
    from powerattn.training.distributed import Layout as Processes

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = load_config(compose("train", overrides=["+experiment=llama3_8b_128k", "model.path=null",
                                                       "parallel.sequence_parallel_size=2", *overrides]))
    layout = Processes(rank=0, world_size=2, sp_size=2)
    return cfg, layout, plan_curriculum(cfg.curriculum.stages, cfg.batch, layout.dp_size, layout.sp_size)


ONE_STAGE = ["curriculum.stages=[{seq_len:262144,steps:2}]", "batch.tokens_per_step=262144",
             "batch.micro_batch_tokens=131072"]


def test_train_refuses_before_starting_a_stage_that_will_not_fit(monkeypatch):
    from powerattn import memory
    from powerattn.training.config import ConfigError
    from powerattn.training.run import check_memory

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(memory, "local_host_gib", lambda: 251.0)  # the measured node's RAM, not this machine's
    cfg, layout, curriculum = _stages()
    check_memory(cfg, layout, curriculum, gpu_gib=139.8)  # the recipe's 128K stages fit (measured: 89 GiB)
    cfg, layout, curriculum = _stages(*ONE_STAGE)
    with pytest.raises(ConfigError) as e:  # 256K without switches, on an 80 GiB GPU (an H200 is only "tight")
        check_memory(cfg, layout, curriculum, gpu_gib=80.0)
    assert str(e.value).startswith("memory: curriculum stage 0 (seq_len 262144, 131072 tokens per GPU) needs ~128 "
                                   "GiB per GPU, the GPU has 80") and "set check_memory=false" in str(e.value)
    cfg, layout, curriculum = _stages(*ONE_STAGE, "model.offload_activations=true", "model.tiled_mlp=8192")
    check_memory(cfg, layout, curriculum, gpu_gib=139.8)
    cfg, layout, curriculum = _stages("curriculum.stages=[{seq_len:1048576,steps:1}]", "batch.tokens_per_step=1048576",
                                      "batch.micro_batch_tokens=524288", "model.offload_activations=true",
                                      "model.tiled_mlp=8192")
    with pytest.raises(ConfigError, match=r"needs 128 GiB of CPU memory per GPU x 2, the node has 251"):
        check_memory(cfg, layout, curriculum, gpu_gib=139.8)  # 1M: the GPUs hold it, the node's RAM does not
    check_memory(cfg, layout, curriculum, gpu_gib=None)  # no GPU (this machine): nothing to check


def test_cli_says_when_the_offload_does_not_fit_the_node():
    proc = subprocess.run([sys.executable, "-m", "powerattn.memory", "+experiment=llama3_8b_128k", "--gpus", "2",
                           "--host-mem", "251", "model.offload_activations=true", "model.tiled_mlp=8192",
                           "--lengths", "524288", "1048576"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = {line.split()[1]: line for line in proc.stdout.splitlines() if line.startswith("extra")}
    assert lines["524288"].endswith("fits; host 64 GiB")
    assert "host 128 GiB x 2 GPUs: HOST MEMORY DOES NOT FIT (251 GiB)" in lines["1048576"]
