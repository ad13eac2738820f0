"""Evaluate an HF-format checkpoint on one long-context task and write results.json + a PNG.

    python eval.py checkpoint=DIR task=passkey       # passkey | ruler | ppl | receptive_field
    python eval.py checkpoint=DIR task=passkey pattern=full task.lengths=[4096,8192]

Config: configs/eval.yaml and configs/task/; outputs go to `output_dir`; see docs/evaluation.md.
A checkpoint written by train.py (`.../step_N/model`) is checked against its manifest first: file
sizes before anything else, every byte when the weights load; a damaged one is a one-line error.
"""

import logging
import os
import sys

import hydra
from omegaconf import DictConfig


@hydra.main(config_path="configs", config_name="eval", version_base=None)
def main(cfg: DictConfig) -> None:
    from powerattn.evaluation.config import check_eval_config

    try:  # before torch is imported: a bad key or value fails in well under a second
        check_eval_config(cfg)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    from powerattn.evaluation.runner import run
    from powerattn.manifest import ManifestError, verify_if_sealed
    from powerattn.model import CheckpointError

    logging.getLogger("powerattn").setLevel(logging.INFO)
    try:
        if isinstance(cfg.get("checkpoint"), str) and cfg.checkpoint != "???":
            verify_if_sealed(os.path.expanduser(cfg.checkpoint), "size")  # a truncated copy fails now
        print(run(cfg))
    except (CheckpointError, ManifestError) as e:  # damaged or mismatched weights: one line, no traceback
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
