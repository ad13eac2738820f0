"""A NaN loss on one rank under 2-process ZeRO-2 (gloo): the micro-batch is skipped on every rank in the
same step, counted, a step without any finite micro-batch makes no update anywhere, the replicas stay
identical (no desync), and NonFiniteGuard stops both ranks after max_nonfinite_in_row steps in a row.

Run by pytest, which launches this same file under torchrun as the worker (the real engine and
train_step; the NaN is injected into the model's output on the chosen rank and micro-batch).
"""

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKERS = 2
# step -> {rank: micro-batches whose loss is made NaN on that rank}; 2 micro-batches per step
POISON = {1: {1: [0]}, 3: {0: [1]}, 4: {1: [0], 0: [1]}, 5: {1: [1]}}
LIMIT = 3  # max_nonfinite_in_row: steps 3, 4, 5 are bad in a row


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_nan_on_one_rank_is_skipped_on_every_rank(tmp_path):
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORKERS}",
           f"--master_port={_free_port()}", __file__, str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    texts = [(tmp_path / f"rank{r}.json").read_text() for r in range(WORKERS)]
    assert texts[0] == texts[1]  # the same decisions, losses and weights on both ranks, every step
    logs = [json.loads(t) for t in texts]
    steps = logs[0]["steps"]
    assert [s["nonfinite"] for s in steps] == [1, 0, 1, 2, 1]
    assert [s["applied"] for s in steps] == [True, True, True, False, True]
    assert [s["in_row"] for s in steps] == [1, 0, 1, 2, 3]
    assert math.isnan(steps[3]["loss"]) and all(math.isfinite(s["loss"]) for i, s in enumerate(steps) if i != 3)
    assert steps[3]["weights"] == steps[2]["weights"] and steps[2]["weights"] != steps[1]["weights"]
    assert steps[4]["lr"] != steps[3]["lr"]  # the skipped step still moved the LR schedule
    assert logs[0]["stopped"].startswith("the loss was not finite in 3 consecutive steps (the last: step 5)")


def _worker(out: Path) -> None:
    import torch.distributed as dist

    from powerattn.data import collate
    from powerattn.model import LlamaConfig, LlamaForCausalLM
    from powerattn.training import (
        NonFiniteGuard,
        NonFiniteLossError,
        Stage,
        TrainConfig,
        build_engine,
        deepspeed_config,
        init_distributed,
        train_step,
    )

    d = init_distributed(1)
    cfg = TrainConfig()
    cfg.deepspeed = {"zero_optimization": {"stage": 2}}
    cfg.optim.warmup_steps = 2
    stage = Stage(0, seq_len=32, start_step=0, steps=10, micro_batch_size=1, grad_accum=2,
                  tokens_per_step=2 * 32 * WORKERS, rope_theta=None)
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, max_position_embeddings=64))
    engine = build_engine(lm, cfg, deepspeed_config(cfg, stage, "fp32"), d, total_steps=10)

    def batches():
        g = torch.Generator().manual_seed(100 + d.rank)  # each rank its own data
        while True:
            yield collate([[torch.randint(3, 64, (n,), generator=g).numpy() for n in (20, 12)]], 32, pad_id=0)

    step, micro = [0], [0]
    forward = engine.module.forward

    def poisoned(batch):
        loss = forward(batch)
        hit = micro[0] in POISON.get(step[0], {}).get(d.rank, [])
        micro[0] += 1
        return loss * float("nan") if hit else loss

    engine.module.forward = poisoned
    guard, records, stopped = NonFiniteGuard(LIMIT), [], None
    loader = batches()
    for step[0] in range(1, 7):
        micro[0] = 0
        result = train_step(engine, loader, stage, d, flops_of=lambda b: 0.0)
        weights = sum(float(p.detach().double().sum()) for p in lm.parameters())
        try:
            guard.update(result, step[0])
        except NonFiniteLossError as e:
            stopped = str(e)
        records.append({"nonfinite": result.nonfinite, "applied": result.applied, "loss": result.loss,
                        "lr": result.lr, "weights": weights, "in_row": guard.in_row})
        if stopped:
            break
    (out / f"rank{d.rank}.json").write_text(json.dumps({"steps": records, "stopped": stopped}))
    dist.barrier()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
