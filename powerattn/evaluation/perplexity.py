"""Perplexity on a held-out local corpus, per context length and per position bucket within the context.

Rows of `length` tokens come from `data.iter_packed` (documents back to back, one pass in corpus
order). mode="documents": attention and positions restart at every document (cu_seqlens), and a
token's bucket is its position inside its document. mode="concat": each row is one continuous
sequence (attention crosses documents, positions 0..length-1), as PG19-style evaluations do with
long books. Either way no target crosses a document boundary, and logits are formed in chunks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from powerattn.data.config import SourceConfig, SyntheticConfig
from powerattn.data.default import default_corpus
from powerattn.data.packing import flatten_batch, iter_packed
from powerattn.data.sources import tokenize_source
from powerattn.data.store import TokenStore
from powerattn.data.tokenizer import Tokenizer
from powerattn.evaluation.generation import eval_mode, model_device, unwrap
from powerattn.evaluation.passkey import check_lengths
from powerattn.model.context import find_documents
from powerattn.model.loss import chunked_nll
from powerattn.targets import IGNORE_INDEX, next_token_targets

MODES = ("documents", "concat")
# The held-out default: the embedded generator with another seed than training's (0), longer documents.
HELDOUT = SyntheticConfig(num_docs=64, min_sentences=200, max_sentences=4000, task_fraction=0.5, seed=1)


def heldout_stores(tokenizer: Tokenizer, data: str | None, cache_dir: str | Path,
                   text_field: str = "text") -> list[TokenStore]:
    """Token stores of `data` (any local source path data.SourceConfig accepts), or the held-out synthetic
    corpus when None; tokenised with the checkpoint's tokenizer and cached under cache_dir."""
    if data is None:
        path, name = str(default_corpus(cache_dir, HELDOUT)), "heldout_synthetic"
    else:
        path, name = str(data), None
    sources = tokenize_source(SourceConfig(path=path, name=name), tokenizer, cache_dir, text_field)
    stores = [s.store for s in sources if s.store.num_tokens > 0]
    if not stores:
        raise ValueError(f"ppl: the corpus {path!r} holds no tokens")
    return stores


def _rows(stores: list[TokenStore], length: int, batch_size: int, pad_id: int, reset: bool, max_rows: int):
    """Packed batches of `length`-token rows over the stores in order, `max_rows` rows in all."""
    left = max_rows
    for store in stores:
        for batch in iter_packed(store, length, batch_size, pad_id, reset_position_ids=reset):
            if left <= 0:
                return
            if batch["input_ids"].shape[0] > left:
                batch = _first_rows(batch, left, length)
            left -= batch["input_ids"].shape[0]
            yield batch


def _first_rows(batch: dict, rows: int, length: int) -> dict:
    out = {k: batch[k][:rows] for k in ("input_ids", "labels", "position_ids")}
    cu = batch["cu_seqlens"]
    out["cu_seqlens"] = cu[cu <= rows * length]  # row edges are always boundaries
    out["max_seqlen"] = batch["max_seqlen"]
    return out


@torch.no_grad()
def _batch_nll(model: nn.Module, batch: dict, mode: str, device: torch.device) -> tuple[Tensor, Tensor]:
    """(nll [tokens], position of the predicting token [tokens]), ignored targets dropped."""
    if mode == "documents":
        flat = flatten_batch(batch)
        ids, cu = flat["input_ids"].to(device), flat["cu_seqlens"]
        hidden = model.model(ids, find_documents(ids, cu_seqlens=cu, max_seqlen=int(flat["max_seqlen"])))
        targets = next_token_targets(flat["labels"].to(device), cu_seqlens=cu)
        positions = flat["position_ids"]
    else:
        ids = batch["input_ids"].to(device)
        hidden = model.model(ids)
        targets = next_token_targets(batch["labels"].to(device))
        positions = batch["position_ids"]
    targets, positions = targets.reshape(-1), positions.reshape(-1).to(device)
    nll, _ = chunked_nll(hidden.reshape(-1, hidden.shape[-1]), model.lm_head.weight, targets,
                         model.config.loss_chunk_size)
    keep = targets != IGNORE_INDEX
    return nll[keep], positions[keep]


def run_perplexity(model: nn.Module, tokenizer: Tokenizer, lengths: Sequence[int], stores: list[TokenStore],
                   tokens_per_length: int, buckets: int = 8, mode: str = "documents", batch_size: int = 1,
                   progress: bool = True) -> dict:
    """Loss and perplexity per context length, and per equal-width position bucket of each length."""
    lengths = check_lengths(lengths)
    if mode not in MODES:
        raise ValueError(f"ppl: mode must be one of {MODES}, got {mode!r}")
    if buckets < 1 or tokens_per_length < 1 or batch_size < 1:
        raise ValueError(f"ppl: buckets ({buckets}), tokens_per_length ({tokens_per_length}) and batch_size "
                         f"({batch_size}) must be >= 1")
    model = unwrap(model)
    device = model_device(model)
    corpus_tokens = sum(s.num_tokens for s in stores)
    plan = {n: min(-(-tokens_per_length // n), -(-corpus_tokens // n)) for n in lengths}
    bar = tqdm(total=sum(n * r for n, r in plan.items()), desc="ppl", unit="tok", unit_scale=True,
               disable=not progress)
    per_length = []
    try:
        with eval_mode(model):
            for n in lengths:
                bar.set_postfix(length=n)
                total = torch.zeros(buckets, dtype=torch.float64, device=device)
                count = torch.zeros(buckets, dtype=torch.float64, device=device)
                for batch in _rows(stores, n, batch_size, tokenizer.pad_id, mode == "documents", plan[n]):
                    nll, pos = _batch_nll(model, batch, mode, device)
                    b = (pos * buckets // n).clamp(max=buckets - 1)
                    total.index_add_(0, b, nll.double())
                    count.index_add_(0, b, torch.ones_like(nll, dtype=torch.float64))
                    bar.update(batch["input_ids"].numel())
                per_length.append(_summary(n, total.cpu().tolist(), count.cpu().tolist(), buckets))
    finally:
        bar.close()
    return {"mode": mode, "buckets": buckets, "tokens_per_length": tokens_per_length,
            "corpus": [{"path": str(s.path), "name": s.name, "docs": s.num_docs, "tokens": s.num_tokens}
                       for s in stores],
            "lengths": lengths, "per_length": per_length}


def _summary(n: int, total: list[float], count: list[float], buckets: int) -> dict:
    def stats(t: float, c: float) -> dict:
        loss = t / c if c else float("nan")
        return {"tokens": int(c), "loss": loss, "ppl": math.exp(loss) if c else float("nan")}

    edges = [round(i * n / buckets) for i in range(buckets + 1)]
    return {"length": n, **stats(sum(total), sum(count)),
            "buckets": [{"start": a, "end": b, **stats(t, c)}
                        for a, b, t, c in zip(edges, edges[1:], total, count)]}
