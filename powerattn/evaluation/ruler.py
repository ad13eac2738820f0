"""RULER-style synthetic tasks (multi-key NIAH, variable tracking) at several context lengths.

Each sample is `data.make_task(name, seed, **params)` rendered to exactly `length` tokens and scored
with RULER's string_match_all (`TaskSpec.score`: the fraction of answer items in the prediction).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import nn
from tqdm.auto import tqdm

from powerattn.data.synthetic import TASKS, make_task
from powerattn.data.tokenizer import Tokenizer
from powerattn.evaluation.generation import greedy_continuations
from powerattn.evaluation.passkey import cell_seed, check_lengths

DEFAULT_TASKS = {"niah_multikey": {"num_keys": 4, "num_queries": 1}, "variable_tracking": {"num_chains": 1,
                                                                                            "num_hops": 4}}


def check_tasks(tasks: Mapping[str, Mapping] | None) -> dict[str, dict]:
    """{task name: make_task kwargs}; unknown names or parameters fail here, before any model call."""
    tasks = DEFAULT_TASKS if tasks is None else tasks
    out = {str(name): dict(params or {}) for name, params in tasks.items()}
    if not out:
        raise ValueError("ruler: no tasks given")
    for name, params in out.items():
        if name not in TASKS:
            raise ValueError(f"ruler: unknown task {name!r}; choose from {sorted(TASKS)}")
        try:
            make_task(name, 0, **params)
        except TypeError as e:
            raise ValueError(f"ruler: bad parameters {params} for task {name!r}: {e}") from None
    return out


def run_ruler(model: nn.Module, tokenizer: Tokenizer, lengths: Sequence[int], samples: int,
              tasks: Mapping[str, Mapping] | None = None, seed: int = 0, batch_size: int = 1,
              progress: bool = True) -> dict:
    """Scores per task and length; `average[i]` is the mean over tasks at lengths[i] (RULER's average)."""
    lengths, tasks = check_lengths(lengths), check_tasks(tasks)
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    for name, params in tasks.items():  # too-short lengths fail now, not after hours of longer ones
        make_task(name, cell_seed(seed, name), **params).to_tokens(tokenizer, min(lengths))
    records = []
    bar = tqdm(total=len(lengths) * len(tasks) * samples, desc="ruler", unit="prompt", disable=not progress)
    try:
        for n in lengths:
            for name, params in tasks.items():
                bar.set_postfix(length=n, task=name)
                specs = [make_task(name, cell_seed(seed, name, n, s), **params) for s in range(samples)]
                prompts = [spec.to_tokens(tokenizer, n) for spec in specs]
                budgets = [len(tokenizer.encode(p.answer, bos=False, eos=False)) + 8 for p in prompts]
                new = greedy_continuations(model, [p.input_ids for p in prompts], budgets, batch_size, bar)
                for s, (spec, ids) in enumerate(zip(specs, new)):
                    prediction = tokenizer.decode(ids)
                    records.append({"task": name, "length": n, "sample": s, "seed": spec.seed,
                                    "answer": spec.answer, "prediction": prediction,
                                    "score": spec.score(prediction)})
    finally:
        bar.close()
    scores = {name: [_mean([r["score"] for r in records if r["task"] == name and r["length"] == n])
                     for n in lengths] for name in tasks}
    average = [_mean([scores[name][i] for name in tasks]) for i in range(len(lengths))]
    return {"lengths": lengths, "samples": samples, "tasks": tasks, "scores": scores, "average": average,
            "records": records}


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")
