"""Ulysses sequence parallelism (2 gloo processes): the loss and every gradient of SP=2 equal SP=1.

Run by pytest, which launches this same file under torchrun as the worker: packed rows of several
documents (batch of 2 rows), GQA, a sparse pattern, activation checkpointing on one layer.
"""

import os
import socket
import subprocess
import sys

import pytest
import torch

WORKERS = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ulysses_matches_unsharded_loss_and_gradients():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": root}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORKERS}",
           f"--master_port={_free_port()}", __file__]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    assert proc.stdout.count("ulysses worker ok") == WORKERS


def _batch(seq_len: int, vocab: int) -> dict:
    from powerattn.data import collate

    g = torch.Generator().manual_seed(1)
    rows = []
    for lengths in ([20, 30, 14], [64]):  # documents packed back to back; the second row is one document
        rows.append([torch.randint(3, vocab, (n,), generator=g).numpy() for n in lengths])
    return collate(rows, seq_len, pad_id=0)


def _worker() -> None:
    import copy

    import deepspeed
    import torch.distributed as dist
    from deepspeed.runtime.sequence_parallel import parallel_state_sp as mpu

    import powerattn
    from powerattn.data import flatten_batch
    from powerattn.model import LlamaConfig, LlamaForCausalLM
    from powerattn.training.microbatch import make_microbatch
    from powerattn.training.sequence_parallel import enable_ulysses, ulysses_disabled

    deepspeed.init_distributed(dist_backend="gloo")
    mpu.initialize_sequence_parallel(WORKERS)
    group, rank = mpu.get_sequence_parallel_group(), mpu.get_sequence_parallel_rank()
    config = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         activation_checkpointing=[1])
    torch.manual_seed(0)
    ref = LlamaForCausalLM(config, powerattn.make_pattern("power", block_size=8, window=2))
    model = copy.deepcopy(ref)
    batch = _batch(64, config.vocab_size)
    flat = flatten_batch(batch)

    ref.train()
    ref_loss = ref(flat["input_ids"], labels=flat["labels"], position_ids=flat["position_ids"],
                   cu_seqlens=flat["cu_seqlens"], max_seqlen=flat["max_seqlen"])
    ref_loss.backward()

    enable_ulysses(model, group)
    model.train()
    shard = make_microbatch(batch, rank, WORKERS)
    loss = model.loss(shard.input_ids, shard.targets, shard.documents).loss_sum / make_microbatch(batch).num_targets
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total, group=group)
    torch.testing.assert_close(total, ref_loss.detach(), atol=1e-6, rtol=1e-6)
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        grad = p.grad.clone()
        dist.all_reduce(grad, group=group)  # what DeepSpeed does within a sequence-parallel group
        torch.testing.assert_close(grad, q.grad, atol=1e-6, rtol=1e-5, msg=name)

    with torch.no_grad(), ulysses_disabled(model):  # whole sequences again, e.g. for evaluation
        torch.testing.assert_close(model(flat["input_ids"][:, :40]), ref(flat["input_ids"][:, :40]))
    dist.barrier()
    print(f"ulysses worker ok (rank {dist.get_rank()})", flush=True)


if __name__ == "__main__":
    _worker()
