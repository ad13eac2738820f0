"""Greedy generation with a pattern-aware KV cache: a prefill, then one token a step, each new token
reading only the key blocks of its pattern row."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from powerattn.model.context import Documents, find_documents
from powerattn.model.kv_cache import KVCache


@torch.no_grad()
def generate(model, input_ids: Tensor | list[Tensor], max_new_tokens: int,
             eos_token_id: int | list[int] | None = None) -> Tensor | list[Tensor]:
    """Greedy decoding of `model` (a LlamaForCausalLM) with a KV cache.

    input_ids: [b, s] prompts of one length -> [b, s + max_new_tokens]; or a list of 1-D prompts
    of any lengths -> a list of 1-D (prompt + new tokens). With eos_token_id a row stops at EOS
    (a tensor result is padded with it) and decoding ends once every row has stopped. Under
    ZeRO-3 every rank must run the same number of steps: leave eos_token_id None there.
    Dynamic-NTK RoPE uses one base for the whole call, that of prompt + max_new_tokens.
    """
    ragged = isinstance(input_ids, (list, tuple))
    prompts = [p.reshape(-1) for p in input_ids] if ragged else None
    if not ragged and (input_ids.dim() != 2 or input_ids.shape[1] == 0):
        raise ValueError(f"generate: input_ids must be [batch, seqlen >= 1]: {tuple(input_ids.shape)}")
    lengths = [len(p) for p in prompts] if ragged else [input_ids.shape[1]] * input_ids.shape[0]
    if not lengths or min(lengths) == 0:
        raise ValueError("generate: every prompt needs at least one token")
    if max_new_tokens < 1:
        return input_ids
    decoder, head = model.model, model.lm_head
    cache = KVCache(model.config.num_hidden_layers, len(lengths), max(lengths) + max_new_tokens)
    if ragged:  # one packed row, one document (and cache row) a prompt
        cu = [0]
        for n in lengths:
            cu.append(cu[-1] + n)
        ids = torch.cat(prompts)[None]
        hidden = decoder(ids, find_documents(ids, cu_seqlens=torch.tensor(cu, dtype=torch.int32)), cache)
        last = hidden[0, torch.tensor(cu[1:], device=hidden.device) - 1]
    else:
        last = decoder(input_ids, Documents(), cache)[:, -1]
    eos = None if eos_token_id is None else torch.tensor(eos_token_id, device=last.device).reshape(-1)
    finished = torch.zeros(len(lengths), dtype=torch.bool, device=last.device)
    out = []
    for step in range(max_new_tokens):
        token = head(last).float().argmax(-1)
        if eos is not None:
            token = torch.where(finished, eos[0], token)
            finished |= torch.isin(token, eos)
        out.append(token)
        if step == max_new_tokens - 1 or (eos is not None and bool(finished.all())):
            break
        last = decoder(token[:, None], Documents(), cache)[:, -1]
    new = torch.stack(out, dim=1)
    if eos is not None and len(out) < max_new_tokens:
        new = F.pad(new, (0, max_new_tokens - len(out)), value=int(eos[0]))
    if not ragged:
        return torch.cat([input_ids, new.to(input_ids.dtype)], dim=1)
    results = []
    for p, row in zip(prompts, new):
        if eos is not None and bool(torch.isin(row, eos).any()):
            row = row[: int(torch.isin(row, eos).nonzero()[0]) + 1]
        results.append(torch.cat([p, row.to(p.dtype)]))
    return results
