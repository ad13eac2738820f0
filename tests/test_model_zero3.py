"""ZeRO-3 on CPU (gloo, 2 processes): partitioned loading equals a plain load (logits, loss, gradients
with activation checkpointing), save gathers one parameter at a time, init under zero.Init.

Run by pytest, which launches this same file under torchrun as the worker.
"""

import os
import socket
import subprocess
import sys

import pytest
import torch

WORKERS = 2
DS_CONFIG = {
    "train_micro_batch_size_per_gpu": 1,
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "zero_allow_untested_optimizer": True,
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_zero3_load_train_save(tmp_path):
    pytest.importorskip("deepspeed")
    transformers = pytest.importorskip("transformers")
    # Odd sizes: partitions split rows mid-way and the odd-length MLP biases need padding.
    cfg = transformers.LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=95, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True, mlp_bias=True,
    )
    hf = transformers.LlamaForCausalLM(cfg).float()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.2)
    hf.save_pretrained(tmp_path / "hf")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORKERS}",
           f"--master_port={_free_port()}", __file__, str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    assert proc.stdout.count("zero3 worker ok") == WORKERS


def _worker(root: str) -> None:
    import deepspeed
    import torch.distributed as dist

    import powerattn
    from powerattn.model import LlamaForCausalLM, from_pretrained

    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    src, out = os.path.join(root, "hf"), os.path.join(root, "saved")
    pat = powerattn.make_pattern("power", block_size=16, window=2)
    torch.manual_seed(0)
    ids = torch.randint(0, 97, (1, 70))

    ref = from_pretrained(src, pattern=pat, activation_checkpointing=True)
    ref.train()
    ref_logits = ref(ids).detach()
    ref_loss = ref(ids, labels=ids)
    ref_loss.backward()

    model = from_pretrained(src, pattern=pat, deepspeed_config=DS_CONFIG, activation_checkpointing=True)
    p = model.model.layers[0].mlp.gate_proj.weight
    assert p.ds_tensor.numel() == -(-p.ds_numel // WORKERS), "each rank holds only its partition"
    engine, *_ = deepspeed.initialize(model=model, config=DS_CONFIG,
                                      optimizer=torch.optim.SGD(model.parameters(), lr=0.0))
    engine.train()
    loss = engine(ids, labels=ids)

    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    engine.backward(loss)
    for name, param in engine.module.named_parameters():
        grad = deepspeed.utils.safe_get_full_grad(param)
        torch.testing.assert_close(grad, dict(ref.named_parameters())[name].grad, atol=1e-5, rtol=1e-4,
                                   msg=name)
        torch.testing.assert_close(grad, dict(ref.named_parameters())[name].grad, atol=1e-5, rtol=1e-4,
                                   msg=name)
    engine.step()
    engine.eval()
    with torch.no_grad():
        torch.testing.assert_close(engine(ids), ref_logits, atol=1e-5, rtol=1e-5)

    engine.module.save_pretrained(out, max_shard_size="30KB")  # every rank calls; rank 0 writes
    again = from_pretrained(out)
    assert again.pattern == pat
    with torch.no_grad():
        torch.testing.assert_close(again(ids), ref_logits, atol=1e-5, rtol=1e-5)

    with deepspeed.zero.Init(config_dict_or_path=DS_CONFIG):  # the random init must reach the partitions
        fresh = LlamaForCausalLM(again.config)
    emb = fresh.model.embed_tokens.weight
    with deepspeed.zero.GatheredParameters([emb]):
        assert 0.01 < emb.std().item() < 0.03, emb.std().item()
    dist.barrier()
    print(f"zero3 worker ok (rank {rank})", flush=True)


if __name__ == "__main__":
    _worker(sys.argv[1])
