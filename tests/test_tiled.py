"""Memory switches give the same training: model.tiled_mlp (MLP in recomputed token tiles) and
model.offload_activations (checkpointed layers' inputs in CPU memory) leave the loss and every gradient
as they are, alone, together, under activation checkpointing, with packed documents, and through
train.py under ZeRO-3 + Ulysses SP=2 on 2 processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import powerattn.model.llama as llama
from powerattn import make_pattern
from powerattn.model import CheckpointError, LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[1]
SHAPE = dict(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2)


def _loss_and_grads(ids, cu_seqlens=None, **switches):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPE, **switches), make_pattern("power", block_size=16)).train()
    loss = model(ids, labels=ids, cu_seqlens=cu_seqlens)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def _assert_same(a, b, rtol=1e-5):
    assert torch.allclose(a[0], b[0], rtol=1e-6, atol=0)
    for name, g in a[1].items():
        err = (g - b[1][name]).abs().max() / b[1][name].abs().max()
        assert err < rtol, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("switches", [
    dict(tiled_mlp=33),                                               # 200 tokens: 6 full tiles and a partial one
    dict(tiled_mlp=64, activation_checkpointing=True),
    dict(activation_checkpointing=True, offload_activations=True),
    dict(activation_checkpointing=[0, 2], offload_activations=True, tiled_mlp=50),
])
def test_switches_keep_loss_and_gradients(switches):
    ids = torch.randint(0, 300, (2, 100), generator=torch.Generator().manual_seed(1))
    _assert_same(_loss_and_grads(ids, **switches), _loss_and_grads(ids))


def test_packed_documents_tiled_and_offloaded():
    ids = torch.randint(0, 300, (1, 150), generator=torch.Generator().manual_seed(2))
    cu = torch.tensor([0, 40, 41, 150], dtype=torch.int32)
    switched = dict(tiled_mlp=32, activation_checkpointing=True, offload_activations=True)
    _assert_same(_loss_and_grads(ids, cu, **switched), _loss_and_grads(ids, cu))


def test_offload_moves_exactly_the_checkpointed_layer_inputs(monkeypatch):
    saved = []

    def probe(pin_memory):  # stands in for torch.autograd.graph.save_on_cpu: records what it would move
        return torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t)

    monkeypatch.setattr(llama, "save_on_cpu", probe)
    ids = torch.randint(0, 300, (2, 100))
    _loss_and_grads(ids, activation_checkpointing=[0, 2], offload_activations=True)
    assert saved == [(2, 100, 64)] * 2  # one hidden-state tensor per checkpointed layer, nothing else


def test_tiled_inference_matches():
    torch.manual_seed(0)
    plain = LlamaForCausalLM(LlamaConfig(**SHAPE)).eval()
    tiled = LlamaForCausalLM(LlamaConfig(**SHAPE, tiled_mlp=17)).eval()
    tiled.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 300, (2, 60))
    with torch.no_grad():
        assert torch.allclose(tiled(ids), plain(ids), atol=1e-5)
        assert torch.equal(tiled.generate(ids[:, :20], 5), plain.generate(ids[:, :20], 5))


def test_bad_switches_are_refused():
    with pytest.raises(CheckpointError, match="offload_activations .* needs activation_checkpointing"):
        LlamaConfig(**SHAPE, offload_activations=True)
    with pytest.raises(CheckpointError, match="tiled_mlp must be a token count"):
        LlamaConfig(**SHAPE, tiled_mlp=-1)
    proc = subprocess.run([sys.executable, "train.py", "model.offload_activations=true", "logger=none"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "model.offload_activations" in proc.stderr


@pytest.mark.slow
def test_train_py_zero3_sp2_same_losses_with_both_switches(tmp_path):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    common = ["logger=none", "progress=false", "final_eval.enabled=false", "checkpoint.final=false",
              "deepspeed=zero3", "parallel.sequence_parallel_size=2", "model.activation_checkpointing=true",
              "model.arch.hidden_size=64", "model.arch.intermediate_size=128", "model.arch.num_hidden_layers=2",
              "model.arch.num_attention_heads=2", "model.arch.num_key_value_heads=2", "pattern.block_size=16",
              "curriculum.stages.0.seq_len=256", "curriculum.stages.0.steps=3", "curriculum.stages.1.seq_len=512",
              "curriculum.stages.1.steps=1", "batch.tokens_per_step=1024", "batch.micro_batch_tokens=256"]
    losses = {}
    for name, extra in [("plain", []), ("switched", ["model.tiled_mlp=48", "model.offload_activations=true"])]:
        out = tmp_path / name
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py",
               *common, *extra, f"output_dir={out}"]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        losses[name] = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses["plain"]) == 4
    assert losses["switched"] == pytest.approx(losses["plain"], rel=1e-5)


@pytest.mark.slow
def test_resume_with_both_switches_continues_the_same_curve(tmp_path):
    """A checkpoint written with offload + tiled MLP on resumes to the uninterrupted run's losses, bitwise."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    common = [sys.executable, "train.py", "logger=none", "progress=false", "final_eval.enabled=false",
              "model.activation_checkpointing=true", "model.tiled_mlp=48", "model.offload_activations=true",
              "model.arch.hidden_size=64", "model.arch.intermediate_size=128", "model.arch.num_hidden_layers=2",
              "model.arch.num_attention_heads=2", "model.arch.num_key_value_heads=2", "pattern.block_size=16",
              "curriculum.stages.0.seq_len=256", "curriculum.stages.0.steps=2", "curriculum.stages.1.seq_len=512",
              "curriculum.stages.1.steps=2", "batch.tokens_per_step=1024", "batch.micro_batch_tokens=512",
              "checkpoint.every=2"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    for cmd in ([*common, f"output_dir={whole}"],
                [*common, f"resume={whole}/checkpoints/step_000002", f"output_dir={resumed}"]):
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    def steps(out):
        return [(r["step"], r["loss"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]

    assert steps(resumed) == steps(whole)[2:] and len(steps(whole)) == 4
