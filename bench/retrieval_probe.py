"""Two CPU diagnostics behind docs/study.md's account of why a recipe does (not) learn retrieval.

    python bench/retrieval_probe.py answerable +experiment=pattern_study   # per curriculum stage: share of
                                                      # passkey questions whose needle is in the same segment
    python bench/retrieval_probe.py answer-nll CKPT --length 512 --prompts 30  # teacher-forced NLL of the
                                                      # passkey answer tokens (chance ~1.9 nats) + exact match

`answerable` reads the loader's own batches (40 batches of 64K tokens a stage), so packing, splitting
of long documents and the mixture are exactly what training sees.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _find(seq, pat: list[int]) -> bool:
    n = len(pat)
    return any(list(seq[i:i + n]) == pat for i in range(len(seq) - n + 1))


def answerable(overrides: list[str], batches: int = 40, tokens: int = 65536) -> None:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from data import build_loader

    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parent.parent / "configs"),
                               version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    loader, tok = build_loader(OmegaConf.to_container(cfg.data, resolve=True), batch_size=1)
    question, needle = tok.encode_pieces(["What is the pass key?", "Remember it."])
    for stage in cfg.curriculum.stages:
        loader.set_seq_len(stage.seq_len, max(1, tokens // stage.seq_len))
        asked = found = 0
        for _ in range(batches):
            b = next(loader)
            ids, cu = b["input_ids"].reshape(-1).tolist(), b["cu_seqlens"].tolist()
            for a, e in zip(cu, cu[1:]):
                if _find(ids[a:e], question):
                    asked += 1
                    found += _find(ids[a:e], needle)
        print(f"seq_len {stage.seq_len}: {asked} passkey questions, {found} with their needle in the same "
              f"segment ({100 * found / max(asked, 1):.0f}%)")


def answer_nll(checkpoint: str, length: int, prompts: int) -> None:
    import torch

    from data.synthetic import passkey
    from data.tokenizer import Tokenizer
    from powerattn.model import from_pretrained

    model = from_pretrained(checkpoint, dtype=torch.float32).eval()
    tok = Tokenizer.from_pretrained(checkpoint)
    nll, exact = [], 0
    for i in range(prompts):
        spec = passkey(1000 + i, depth=(i + 0.5) / prompts)
        prompt = spec.to_tokens(tok, length).input_ids
        answer = tok.encode_pieces([spec.answer])[0]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + answer]))
        logp = logits[0, len(prompt) - 1:-1].log_softmax(-1)
        nll.append(-logp.gather(1, torch.tensor(answer)[:, None]).mean().item())
        exact += logp.argmax(-1).tolist() == answer
    print(f"{checkpoint}: {length} tokens, answer NLL {sum(nll) / prompts:.3f} nats/token, "
          f"teacher-forced exact {exact}/{prompts}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("answerable")
    a.add_argument("overrides", nargs="*", help="train.py overrides, e.g. +experiment=pattern_study")
    n = sub.add_parser("answer-nll")
    n.add_argument("checkpoint")
    n.add_argument("--length", type=int, default=512)
    n.add_argument("--prompts", type=int, default=30)
    args = p.parse_args(argv)
    if args.cmd == "answerable":
        answerable(args.overrides)
    else:
        answer_nll(args.checkpoint, args.length, args.prompts)


if __name__ == "__main__":
    main()
