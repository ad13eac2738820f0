"""Batched greedy answers to token prompts, through the model's pattern-aware KV-cache `generate`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The LlamaForCausalLM inside a DeepSpeed engine / DDP wrapper (or the model itself)."""
    while not hasattr(model, "generate") and hasattr(model, "module"):
        model = model.module
    if not hasattr(model, "generate"):
        raise TypeError(f"evaluation needs a model with .generate (LlamaForCausalLM), "
                        f"got {type(model).__name__}")
    return model


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """model.eval() for the block, then the previous train/eval mode again."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of equal prompt length (longest first: memory errors show early)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    by_len: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        by_len.setdefault(n, []).append(i)
    return [idx[a:a + batch_size] for n in sorted(by_len, reverse=True)
            for idx in [by_len[n]] for a in range(0, len(idx), batch_size)]


@torch.no_grad()
def greedy_continuations(model: nn.Module, prompts: Sequence[Sequence[int]],
                         max_new_tokens: int | Sequence[int], batch_size: int = 1,
                         progress=None) -> list[list[int]]:
    """The greedy continuation (new token ids only) of each prompt, `batch_size` equal-length prompts a call.

    max_new_tokens: one value, or one per prompt (a batch decodes its largest and each row is cut to its
    own). No EOS stopping, so every call runs the same number of steps (safe under ZeRO-3).
    `progress`: an object with .update(n) (a tqdm bar), advanced by each batch's size.
    """
    model = unwrap(model)
    device = model_device(model)
    n_new = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(n_new) != len(prompts) or min(n_new, default=1) < 1:
        raise ValueError("max_new_tokens must be >= 1, one value or one per prompt")
    out: list[list[int]] = [[] for _ in prompts]
    with eval_mode(model):
        for batch in length_batches([len(p) for p in prompts], batch_size):
            ids = torch.tensor([list(prompts[i]) for i in batch], dtype=torch.long, device=device)
            steps = max(n_new[i] for i in batch)
            new = model.generate(ids, max_new_tokens=steps)[:, ids.shape[1]:].tolist()
            for i, row in zip(batch, new):
                out[i] = row[: n_new[i]]
            if progress is not None:
                progress.update(len(batch))
    return out
