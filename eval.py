"""Evaluate an HF-format checkpoint on one long-context task and write results.json + a PNG.

    python eval.py checkpoint=DIR task=passkey       # passkey | ruler | ppl | receptive_field
    python eval.py checkpoint=DIR task=passkey pattern=full task.lengths=[4096,8192]

Config: configs/eval.yaml and configs/task/; outputs go to `output_dir`; see docs/evaluation.md.
"""

import logging

import hydra
from omegaconf import DictConfig


@hydra.main(config_path="configs", config_name="eval", version_base=None)
def main(cfg: DictConfig) -> None:
    from powerattn.evaluation.runner import run

    logging.getLogger("powerattn").setLevel(logging.INFO)
    print(run(cfg))


if __name__ == "__main__":
    main()
