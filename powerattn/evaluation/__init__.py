"""Evaluation of long-context checkpoints: passkey grid, RULER-style tasks, perplexity, receptive field.

    from powerattn.evaluation import quick_passkey
    acc = quick_passkey(model, tokenizer, lengths=[1024, 2048], depths=[0.0, 0.5, 1.0], samples=2)

`python eval.py checkpoint=DIR task=passkey` runs a full task and writes results.json + a PNG
(`powerattn.evaluation.runner.run`); docs/evaluation.md describes the tasks and the output schema.
"""

from powerattn.evaluation.coverage import layered_coverage, run_receptive_field
from powerattn.evaluation.generation import greedy_continuations
from powerattn.evaluation.passkey import PasskeyGrid, passkey_grid, passkey_match, quick_passkey
from powerattn.evaluation.perplexity import heldout_stores, run_perplexity
from powerattn.evaluation.ruler import run_ruler

__all__ = [
    "PasskeyGrid",
    "greedy_continuations",
    "heldout_stores",
    "layered_coverage",
    "passkey_grid",
    "passkey_match",
    "quick_passkey",
    "run_perplexity",
    "run_receptive_field",
    "run_ruler",
]
