"""Passkey retrieval over a grid of context lengths x needle depths, scored by exact match of the digits.

Each (length, depth, sample) cell is one prompt of exactly `length` tokens (data.passkey rendered by
TaskSpec.to_tokens) with its own deterministic key; the model answers greedily through `generate`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn
from tqdm.auto import tqdm

from powerattn.data.synthetic import passkey
from powerattn.data.tokenizer import Tokenizer
from powerattn.evaluation.generation import greedy_continuations

_DIGITS = re.compile(r"\d+")


def passkey_match(prediction: str, answer: str) -> bool:
    """Exact match: the first run of digits in `prediction` is `answer` (no extra or missing digits)."""
    m = _DIGITS.search(prediction)
    return m is not None and m.group() == answer


def cell_seed(seed: int, *parts) -> int:
    """A task seed for one grid cell, stable across runs and Python versions."""
    digest = hashlib.sha256(repr((seed, *parts)).encode()).hexdigest()
    return int(digest[:8], 16)


def resolve_depths(depths: int | Sequence[float]) -> list[float]:
    """A list of depths in [0, 1]; an int n means n evenly spaced depths from 0 to 1."""
    if isinstance(depths, int) and not isinstance(depths, bool):
        if depths < 1:
            raise ValueError(f"depths: need at least one depth, got {depths}")
        return [0.5] if depths == 1 else [round(i / (depths - 1), 4) for i in range(depths)]
    out = [float(d) for d in depths]
    bad = [d for d in out if not 0.0 <= d <= 1.0]
    if not out or bad:
        raise ValueError(f"depths must be in [0, 1] (and at least one), got {list(depths)}")
    return out


def check_lengths(lengths: Sequence[int], name: str = "lengths") -> list[int]:
    out = [int(n) for n in lengths]
    if not out or any(n < 1 for n in out):
        raise ValueError(f"{name} must be positive token counts (at least one), got {list(lengths)}")
    return out


@dataclass
class PasskeyGrid:
    """Per-prompt records and accuracy[length_index][depth_index] (mean over samples)."""

    lengths: list[int]
    depths: list[float]
    samples: int
    records: list[dict] = field(default_factory=list)

    def accuracy(self) -> list[list[float]]:
        cells = {(r["length"], r["depth"]): [] for r in self.records}
        for r in self.records:
            cells[(r["length"], r["depth"])].append(float(r["correct"]))
        return [[_mean(cells.get((n, d), [])) for d in self.depths] for n in self.lengths]

    def by_length(self) -> list[float]:
        return [_mean([float(r["correct"]) for r in self.records if r["length"] == n]) for n in self.lengths]

    def by_depth(self) -> list[float]:
        return [_mean([float(r["correct"]) for r in self.records if r["depth"] == d]) for d in self.depths]

    def mean(self) -> float:
        return _mean([float(r["correct"]) for r in self.records])


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def passkey_grid(model: nn.Module, tokenizer: Tokenizer, lengths: Sequence[int],
                 depths: int | Sequence[float], samples: int, seed: int = 0, digits: int = 5,
                 batch_size: int = 1, progress: bool = True) -> PasskeyGrid:
    """Run every (length, depth, sample) prompt; prompts are built one length at a time (host memory)."""
    lengths, depths = check_lengths(lengths), resolve_depths(depths)
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    # Fail on a too-short length now, not after the longer lengths have run.
    passkey(cell_seed(seed, 0), depth=0.0, digits=digits).to_tokens(tokenizer, min(lengths))
    grid = PasskeyGrid(lengths, depths, samples)
    total = len(lengths) * len(depths) * samples
    bar = tqdm(total=total, desc="passkey", unit="prompt", disable=not progress)
    try:
        for n in lengths:
            bar.set_postfix(length=n)
            cells = [(d, s, cell_seed(seed, n, d, s)) for d in depths for s in range(samples)]
            prompts = [passkey(k, depth=d, digits=digits).to_tokens(tokenizer, n) for d, _, k in cells]
            budgets = [len(tokenizer.encode(p.answer, bos=False, eos=False)) + 3 for p in prompts]
            new = greedy_continuations(model, [p.input_ids for p in prompts], budgets, batch_size, bar)
            for (d, s, k), p, ids in zip(cells, prompts, new):
                prediction = tokenizer.decode(ids)
                grid.records.append({
                    "length": n, "depth": d, "sample": s, "seed": k, "answer": p.answer,
                    "prediction": prediction, "correct": passkey_match(prediction, p.answer),
                    "needle_position": p.needle_positions[0],
                })
    finally:
        bar.close()
    return grid


def quick_passkey(model: nn.Module, tokenizer: Tokenizer, lengths: list[int], depths: list[float],
                  samples: int, seed: int = 0, batch_size: int = 8, progress: bool = False) -> float:
    """Mean exact-match passkey accuracy over lengths x depths x samples (a cheap end-of-training check).

    Leaves the model in the train/eval mode it was in. Under ZeRO-3 every rank must call it (all ranks
    decode the same number of steps).
    """
    return passkey_grid(model, tokenizer, lengths, depths, samples, seed, batch_size=batch_size,
                        progress=progress).mean()
