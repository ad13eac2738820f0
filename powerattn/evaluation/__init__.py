"""Evaluation of long-context checkpoints: passkey grid, RULER-style tasks, perplexity, receptive field.

    from powerattn.evaluation import quick_passkey
    acc = quick_passkey(model, tokenizer, lengths=[1024, 2048], depths=[0.0, 0.5, 1.0], samples=2)

`python eval.py checkpoint=DIR task=passkey` runs the full tasks and writes results.json + a PNG.
"""

from powerattn.evaluation.generation import greedy_continuations
from powerattn.evaluation.passkey import PasskeyGrid, passkey_grid, passkey_match, quick_passkey

__all__ = ["PasskeyGrid", "greedy_continuations", "passkey_grid", "passkey_match", "quick_passkey"]
