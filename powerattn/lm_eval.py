"""lm-evaluation-harness on powerattn checkpoints, run with their own sparsity pattern.

    python -m powerattn.lm_eval --model hf \\
        --model_args pretrained=CKPT,attn_implementation=powerattn,dtype=bfloat16 --tasks TASKS --batch_size 8

Everything after the module name is lm_eval's own command line (see `lm-eval --help`); this entry point
only registers attn_implementation="powerattn" with transformers first (`import powerattn.hf`), then
hands over to lm_eval's CLI. lm-eval is an optional extra: `pip install -e ".[eval]"`.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    """Register the attention, then run lm_eval's CLI on argv (default: this process's arguments)."""
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError as e:
        sys.exit(f"python -m powerattn.lm_eval needs lm-eval ({e}); install it with pip install 'lm-eval>=0.4' "
                 "or pip install -e '.[eval]'")
    import powerattn.hf  # noqa: F401  (registers attn_implementation="powerattn")

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
