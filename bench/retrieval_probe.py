"""CPU diagnostics behind docs/study.md's account of why a recipe does (not) learn retrieval.

    python bench/retrieval_probe.py answerable +experiment=pattern_study   # per curriculum stage: share of
                                                      # passkey questions whose needle is in the same segment
    python bench/retrieval_probe.py needle-distances +experiment=pattern_study model.path=BASE  # passkey
                                                      # needles far from their question in the corpus
    python bench/retrieval_probe.py answer-nll CKPT --length 512 --prompts 30  # teacher-forced NLL of the
                                                      # passkey answer tokens (chance ~1.9 nats) + exact match
    python bench/retrieval_probe.py copying CKPT      # does the model copy? NLL of a sequence's first and
                                                      # second occurrence: filler sentences over gaps of
                                                      # 0-1000 tokens, random token sequences
    python bench/retrieval_probe.py induction-ab --steps 300  # a 2-layer model learning to copy random
                                                      # tokens: ours against transformers' LLaMA, same data
    python bench/retrieval_probe.py relay-ab --steps 800  # full vs power learning passkey from scratch on
                                                      # 256-token documents; exact answers split by
                                                      # whether the needle is one power hop away
    python bench/retrieval_probe.py relay-ab --steps 6000 --models power --eval-every 1000  # power alone,
                                                      # longer, scored as it goes

`answerable` reads the loader's own batches (40 batches of 64K tokens a stage), so packing, splitting
of long documents and the mixture are exactly what training sees.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# bench/ (this script's folder, first on the path) holds kernels.py, which would shadow the HF hub's `kernels`
# package that transformers (>= 5.2x) imports when it is installed.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def _index(seq: list[int], pat: list[int]) -> int:
    """The first index of `pat` in `seq` (ValueError if absent)."""
    i = seq.index(pat[0])
    while seq[i:i + len(pat)] != pat:
        i = seq.index(pat[0], i + 1)
    return i


def _find(seq, pat: list[int]) -> bool:
    n = len(pat)
    return any(list(seq[i:i + n]) == pat for i in range(len(seq) - n + 1))


def answerable(overrides: list[str], batches: int = 40, tokens: int = 65536) -> None:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from powerattn.data import build_loader

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


def needle_distances(overrides: list[str], thresholds: tuple[int, ...] = (6500, 7300, 7900)) -> dict:
    """Over the corpus a run trains on (its embedded synthetic documents, its tokenizer): how many passkey
    documents put their needle more than each threshold of tokens before the document's end (the
    question and answer). The longest distances of a row are the rarest when needle depths are uniform."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from powerattn.data import load_tokenizer
    from powerattn.data.config import as_data_config
    from powerattn.data.default import synthetic_documents

    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parent.parent / "configs"),
                               version_base="1.3"):
        cfg = as_data_config(OmegaConf.to_container(compose(config_name="train", overrides=overrides).data,
                                                    resolve=True))
    tok = load_tokenizer(cfg)
    (needle,) = tok.encode_pieces(["The pass key is"])
    docs = tokens = 0
    farther = dict.fromkeys(thresholds, 0)
    for task, text in synthetic_documents(cfg.synthetic):
        ids = tok.encode(text, bos=False)
        tokens += len(ids)
        if task != "passkey":
            continue
        docs += 1
        at = _index(ids, needle)  # the needle's sentence, which comes before the question's
        for t in thresholds:
            farther[t] += len(ids) - at > t
    print(f"{cfg.synthetic.num_docs} documents, {tokens / 1e6:.1f}M tokens; {docs} passkey documents, with the "
          "needle more than " + ", ".join(f"{t} tokens before the end: {n}" for t, n in farther.items()))
    return {"documents": cfg.synthetic.num_docs, "tokens": tokens, "passkey": docs, "farther": farther}


def answer_nll(checkpoint: str, length: int, prompts: int) -> None:
    import torch

    from powerattn.data.synthetic import passkey
    from powerattn.data.tokenizer import Tokenizer
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


def _nll(model, ids: list[int]):
    import torch

    x = torch.tensor([ids])
    with torch.no_grad():
        logp = model(x)[0, :-1].float().log_softmax(-1)
    return -logp.gather(1, x[0, 1:, None])[:, 0]


def copying(checkpoint: str, gaps: tuple[int, ...] = (0, 40, 100, 200, 500, 1000), samples: int = 4) -> None:
    import random

    import torch

    from powerattn.data.filler import Filler
    from powerattn.data.synthetic import repeat_text
    from powerattn.data.tokenizer import Tokenizer
    from powerattn.model import from_pretrained

    model = from_pretrained(checkpoint, dtype=torch.float32).eval()
    tok = Tokenizer.from_pretrained(checkpoint)
    head = [tok.bos_id] if tok.add_bos else []
    hay = tok.encode(Filler(3).text(400), bos=False)
    for gap in gaps:  # a 24-token filler sentence, then `gap` filler tokens, then the sentence again
        first = second = 0.0
        for s in range(samples):
            sent = tok.encode(Filler(100 + s).text(2), bos=False)[:24]
            ids = head + hay[:64] + sent + hay[64:64 + gap] + sent
            nll = _nll(model, ids)
            at = len(head) + 64  # nll[i] scores token i + 1; skip each copy's first 3 tokens
            first += nll[at + 2:at + len(sent) - 1].mean().item() / samples
            second += nll[len(ids) - len(sent) + 2:].mean().item() / samples
        print(f"filler sentence, gap {gap:4d} tokens: {first:.2f} nats/token the first time, {second:.2f} the second")
    text = repeat_text(12345, 30)  # the study's own copy documents: a 30-word list written twice
    half = tok.encode(text[:len(text) // 2], bos=False)
    nll = _nll(model, head + half + tok.encode(text[len(text) // 2:], bos=False))
    print(f"random word list written twice: {nll[len(head):len(head) + len(half) - 1].mean():.2f} nats/token "
          f"the first time, {nll[len(head) + len(half) + 1:].mean():.2f} the second")
    r = random.Random(0)
    seq = [r.randrange(tok.vocab_size // 4, tok.vocab_size) for _ in range(50)]
    nll = _nll(model, head + seq + seq)
    print(f"50 random tokens written twice: {nll[len(head):len(head) + 49].mean():.2f} nats/token the first "
          f"time, {nll[-49:].mean():.2f} the second")


def induction_ab(steps: int, vocab: int = 256, width: int = 128, half: int = 64, batch: int = 32) -> None:
    """Both models from the same seed on the same batches; a model that copies drives the second half to ~0."""
    import torch
    import transformers

    from powerattn.model import LlamaConfig, LlamaForCausalLM

    shape = dict(vocab_size=vocab, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4 * half,
                 tie_word_embeddings=True)
    torch.manual_seed(0)
    ours = LlamaForCausalLM(LlamaConfig(**shape))
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape))
    runs = {"ours": (ours, lambda x: ours(x)), "transformers": (hf, lambda x: hf(x).logits)}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.01) for k, (m, _) in runs.items()}
    data = torch.Generator().manual_seed(1)
    for step in range(1, steps + 1):
        seq = torch.randint(0, vocab, (batch, half), generator=data)
        x = torch.cat([seq, seq], 1)
        line = []
        for name, (_, forward) in runs.items():
            logp = forward(x)[:, :-1].log_softmax(-1)
            nll = -logp.gather(2, x[:, 1:, None])[..., 0]
            nll.mean().backward()
            opts[name].step()
            opts[name].zero_grad()
            line.append(f"{name} {nll[:, :half - 1].mean():.2f} / {nll[:, half:].mean():.2f}")
        if step % 50 == 0:
            print(f"step {step}: first / second half NLL: " + ", ".join(line), flush=True)


def relay_ab(steps: int, docs: int = 30000, length: int = 256, block: int = 16, batch: int = 32,
             heldout: int = 600, models: tuple[str, ...] = ("full", "power"), eval_every: int = 0) -> dict:
    """Full attention vs power (blocks of 16, window 2: one hop reaches block distances 0, 1, 2, 4, 8 and
    the sink) from the same init on the same batches of short passkey documents (one per row, <= 256
    tokens); exact teacher-forced answers on held-out documents, split by whether the needle is one power
    hop from the answer's block. Power needs relays for the rest; full reaches every needle directly.
    `models` trains a subset (each model's run is the same alone as beside the other); `eval_every`
    scores the held-out documents every that many steps too, to follow when (and whether) relays form."""
    import random
    import tempfile
    import time

    import torch

    from powerattn import make_pattern
    from powerattn.data.synthetic import training_document
    from powerattn.data.tokenizer import train_tokenizer
    from powerattn.model import LlamaConfig, LlamaForCausalLM

    unknown = set(models) - {"full", "power"}
    if unknown or not models:
        raise ValueError(f"relay-ab: models must be some of full, power; got {list(models)}")
    texts = [training_document("passkey", s, random.Random(s).randint(4, 18)) for s in range(docs)]
    with tempfile.TemporaryDirectory() as tmp:
        tok = train_tokenizer(texts[:3000], 512, Path(tmp) / "tok.model")

    def encode(ts):
        rows = [[tok.bos_id] + tok.encode(t, bos=False) for t in ts]
        return [r for r in rows if len(r) <= length]

    train = encode(texts)
    held = encode(training_document("passkey", s, random.Random(s).randint(4, 18))
                  for s in range(10**6, 10**6 + heldout))
    shape = dict(vocab_size=tok.vocab_size, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=length,
                 tie_word_embeddings=True)
    power = make_pattern("power", block_size=block, window=2, sink=1)
    nets = {}
    for name, pattern in (("full", None), ("power", power)):
        if name in models:
            torch.manual_seed(0)
            nets[name] = LlamaForCausalLM(LlamaConfig(**shape), pattern=pattern, backend="torch")
    opts = {k: torch.optim.AdamW(m.parameters(), lr=2e-3, weight_decay=0.01) for k, m in nets.items()}
    layout = power.block_layout(length // block)

    def score() -> dict:
        out = {name: {"one_hop": [0, 0], "relay": [0, 0]} for name in nets}
        with torch.no_grad():
            for r in held:
                key = r[-5:]
                at = next(i for i in range(len(r) - 5) if r[i:i + 5] == key)  # the needle's copy of the key
                qb = (len(r) - 6) // block
                group = "one_hop" if any(layout[qb, kb] for kb in {at // block, (at + 4) // block}) else "relay"
                for name, m in nets.items():
                    out[name][group][0] += m(torch.tensor([r]))[0, len(r) - 6:len(r) - 1].argmax(-1).tolist() == key
                    out[name][group][1] += 1
        return out

    rng, start, curve = random.Random(1), time.time(), []
    for step in range(1, steps + 1):
        rows = rng.sample(train, min(batch, len(train)))
        n = max(map(len, rows))
        x = torch.tensor([r + [0] * (n - len(r)) for r in rows])
        scored = torch.tensor([[1.0] * (len(r) - 1) + [0.0] * (n - len(r)) for r in rows])
        answer = torch.zeros_like(scored)
        for i, r in enumerate(rows):
            answer[i, len(r) - 6:len(r) - 1] = 1  # the five digits that end every document
        answer_nll = {}
        for name, m in nets.items():
            nll = -m(x)[:, :-1].log_softmax(-1).gather(2, x[:, 1:, None])[..., 0]
            ((nll * scored).sum() / scored.sum()).backward()
            opts[name].step()
            opts[name].zero_grad()
            answer_nll[name] = ((nll * answer).sum() / answer.sum()).item()
        line = [f"{name} {v:.2f}" for name, v in answer_nll.items()]
        if step % 100 == 0 or step == steps:
            print(f"step {step} ({time.time() - start:.0f} s): answer NLL " + ", ".join(line), flush=True)
        if (eval_every and step % eval_every == 0) or step == steps:
            scores = score()
            curve.append({"step": step, **scores})
            for name, groups in scores.items():
                print(f"step {step}: {name}: exact answers, needle one power hop away {groups['one_hop'][0]}/"
                      f"{groups['one_hop'][1]}, needing a relay {groups['relay'][0]}/{groups['relay'][1]}",
                      flush=True)
    return {"final": scores, "curve": curve, "answer_nll": answer_nll}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("answerable")
    a.add_argument("overrides", nargs="*", help="train.py overrides, e.g. +experiment=pattern_study")
    d = sub.add_parser("needle-distances")
    d.add_argument("overrides", nargs="*", help="train.py overrides, e.g. +experiment=pattern_study model.path=BASE")
    n = sub.add_parser("answer-nll")
    n.add_argument("checkpoint")
    n.add_argument("--length", type=int, default=512)
    n.add_argument("--prompts", type=int, default=30)
    c = sub.add_parser("copying")
    c.add_argument("checkpoint")
    i = sub.add_parser("induction-ab")
    i.add_argument("--steps", type=int, default=300)
    r = sub.add_parser("relay-ab")
    r.add_argument("--steps", type=int, default=800)
    r.add_argument("--models", default="full,power", help="comma-separated: full, power or both")
    r.add_argument("--eval-every", type=int, default=0, help="also score the held-out documents every N steps")
    args = p.parse_args(argv)
    if args.cmd == "answerable":
        answerable(args.overrides)
    elif args.cmd == "needle-distances":
        needle_distances(args.overrides)
    elif args.cmd == "answer-nll":
        answer_nll(args.checkpoint, args.length, args.prompts)
    elif args.cmd == "copying":
        copying(args.checkpoint)
    elif args.cmd == "relay-ab":
        relay_ab(args.steps, models=tuple(args.models.split(",")), eval_every=args.eval_every)
    else:
        induction_ab(args.steps)


if __name__ == "__main__":
    main()
