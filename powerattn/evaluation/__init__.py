"""Evaluation of long-context checkpoints: passkey grid, RULER-style tasks, perplexity, receptive field.

    from powerattn.evaluation import quick_passkey
    acc = quick_passkey(model, tokenizer, lengths=[1024, 2048], depths=[0.0, 0.5, 1.0], samples=2)

`python eval.py checkpoint=DIR task=passkey` runs a full task and writes results.json + a PNG
(`powerattn.evaluation.runner.run`); docs/evaluation.md describes the tasks and the output schema.
"""

from powerattn.lazy import lazy_exports

# Loaded on first use: `powerattn.evaluation.config` checks an eval config without importing torch.
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
__getattr__, __dir__ = lazy_exports(__name__, {
    "layered_coverage": "coverage", "run_receptive_field": "coverage", "greedy_continuations": "generation",
    "PasskeyGrid": "passkey", "passkey_grid": "passkey", "passkey_match": "passkey", "quick_passkey": "passkey",
    "heldout_stores": "perplexity", "run_perplexity": "perplexity", "run_ruler": "ruler",
})
