"""Synthetic long-context tasks (paper Sec. 4.3 / App. C, RULER-style), deterministic by seed.

A task is a `TaskSpec`: needle sentences with depths (fraction of the haystack before each), a
question ending in the answer prefix, and the answer. The same spec renders two ways:
- `spec.to_text(num_sentences)` -> `Sample(prompt, answer, text)`: a training document, no tokenizer;
- `spec.to_tokens(tokenizer, length)` -> `TokenPrompt`: an eval prompt of exactly `length` tokens,
  built from separately encoded sentences so the length is exact and needles sit on sentence edges.
Tasks: `passkey`, `niah_multikey` (multi-key needle in a haystack), `variable_tracking`.
Training documents (`training_document`) are those tasks rendered as text, plus two for a copying
signal dense enough to learn from: `recall` (many keyed pass keys, each asked once later) and `repeat`
(a list of random words written twice).
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from powerattn.data.filler import ADJECTIVES, ADVERBS, NOUNS, PLACES, VERBS_I, VERBS_T, Filler

if TYPE_CHECKING:  # the config check imports this module and needs no sentencepiece
    from powerattn.data.tokenizer import Tokenizer


@dataclass(frozen=True)
class Sample:
    """A rendered task: `prompt` ends with the answer prefix; `text` = prompt + " " + answer."""

    task: str
    prompt: str
    answer: str

    @property
    def text(self) -> str:
        return f"{self.prompt} {self.answer}"


@dataclass(frozen=True)
class TokenPrompt:
    """An eval prompt of exact token length: feed `input_ids`, compare the continuation with `answer`."""

    task: str
    input_ids: list[int]
    prompt: str
    answer: str
    needle_positions: list[int]    # token index where each needle starts


@dataclass(frozen=True)
class TaskSpec:
    task: str
    seed: int
    needles: tuple[str, ...]
    depths: tuple[float, ...]      # in [0, 1]: share of the haystack placed before each needle
    question: str
    answer: str
    answer_items: tuple[str, ...]  # what `score` looks for in a prediction
    header: str = ""
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def _order(self) -> list[int]:
        # Stable sort: needles at equal depth keep their order (variable chains stay in order).
        return sorted(range(len(self.needles)), key=lambda i: self.depths[i])

    def to_text(self, num_sentences: int) -> Sample:
        """Render with `num_sentences` filler sentences (the training-document form)."""
        hay = Filler(self.seed * 7919 + 17).sentences(num_sentences)
        slots: dict[int, list[str]] = {}
        for i in self._order():
            slots.setdefault(round(self.depths[i] * num_sentences), []).append(self.needles[i])
        parts = [self.header] if self.header else []
        for k in range(num_sentences + 1):
            parts.extend(slots.get(k, []))
            if k < num_sentences:
                parts.append(hay[k])
        parts.append(self.question)
        return Sample(self.task, " ".join(parts), self.answer)

    def to_tokens(self, tokenizer: Tokenizer, length: int) -> TokenPrompt:
        """Render as exactly `length` token ids (BOS included when the tokenizer adds one)."""
        enc = lambda texts: tokenizer.encode_pieces(list(texts))  # sentences joined by spaces
        head = [tokenizer.bos_id] if tokenizer.add_bos else []
        head += tokenizer.encode(self.header, bos=False) if self.header else []
        needles, question = enc(self.needles), enc([self.question])[0]
        budget = length - len(head) - sum(map(len, needles)) - len(question)
        if budget < 0:
            raise ValueError(
                f"{self.task}: length {length} is too short; the task alone takes {length - budget} tokens"
            )
        filler, pieces, have = Filler(self.seed * 7919 + 17), [], 0
        while have < budget:
            for ids in enc(filler.sentences(64)):
                pieces.append(ids[: budget - have])
                have += len(pieces[-1])
                if have == budget:
                    break
        edges = [0]
        for p in pieces:
            edges.append(edges[-1] + len(p))
        slots: dict[int, list[int]] = {}
        for i in self._order():  # nearest sentence edge to the requested depth
            k = min(range(len(edges)), key=lambda j: abs(edges[j] - self.depths[i] * budget))
            slots.setdefault(k, []).append(i)
        ids, positions = list(head), [0] * len(needles)
        for k in range(len(pieces) + 1):
            for i in slots.get(k, []):
                positions[i] = len(ids)
                ids.extend(needles[i])
            if k < len(pieces):
                ids.extend(pieces[k])
        ids.extend(question)
        assert len(ids) == length, (len(ids), length)
        return TokenPrompt(self.task, ids, tokenizer.decode(ids), self.answer, positions)

    def score(self, prediction: str) -> float:
        """Fraction of the answer items present in `prediction` (RULER's string_match_all)."""
        return sum(item in prediction for item in self.answer_items) / len(self.answer_items)


_LIST_WORDS = sorted({*ADJECTIVES, *NOUNS, *VERBS_T, *VERBS_I, *ADVERBS, *PLACES})


def _digits(r: random.Random, n: int) -> str:
    return str(r.randrange(10 ** (n - 1), 10**n))


def passkey(seed: int, depth: float | None = None, digits: int = 5) -> TaskSpec:
    """Passkey retrieval: a `digits`-digit key at `depth` (random when None) in filler."""
    r = random.Random(f"passkey-{seed}")
    key = _digits(r, digits)
    depth = r.random() if depth is None else depth
    return TaskSpec(
        task="passkey", seed=seed,
        header="There is an important piece of information hidden inside a lot of irrelevant text. "
        "Find it and memorize it. I will quiz you about it.",
        needles=(f"The pass key is {key}. Remember it. {key} is the pass key.",),
        depths=(_check_depth(depth),),
        question="What is the pass key? The pass key is", answer=key, answer_items=(key,),
    )


_KEY_WORDS = (
    "amber brisk cobalt dusky eager fabled gritty humble ivory jolly keen lively mellow nimble "
    "opal plucky rustic sable tidy umber vivid witty zesty"
).split()
_KEY_NOUNS = (
    "otter falcon quill anchor badger comet ember fjord glacier heron iris juniper kettle lagoon "
    "marble nectar oyster pepper quartz raven saddle thistle"
).split()


def niah_multikey(seed: int, num_keys: int = 4, num_queries: int = 1, digits: int = 7) -> TaskSpec:
    """Multi-key needle in a haystack: `num_keys` key -> number needles; ask for `num_queries` of them."""
    if not 1 <= num_queries <= num_keys:
        raise ValueError(f"niah_multikey: need 1 <= num_queries ({num_queries}) <= num_keys ({num_keys})")
    r = random.Random(f"niah-{seed}")
    pairs = [f"{a}-{b}" for a in _KEY_WORDS for b in _KEY_NOUNS]
    keys = r.sample(pairs, num_keys)
    values = [_digits(r, digits) for _ in keys]
    asked = sorted(r.sample(range(num_keys), num_queries))
    qk = ", ".join(keys[i] for i in asked)
    answer = ", ".join(values[i] for i in asked)
    if num_queries == 1:
        q = (f"What is the special magic number for {qk} mentioned in the provided text? "
             f"The special magic number for {qk} mentioned in the provided text is")
    else:
        q = (f"What are all the special magic numbers for {qk} mentioned in the provided text? "
             f"The special magic numbers for {qk} mentioned in the provided text are")
    return TaskSpec(
        task="niah_multikey", seed=seed,
        header="Some special magic numbers are hidden within the following text. Make sure to memorize "
        "them. I will quiz you about the numbers afterwards.",
        needles=tuple(f"One of the special magic numbers for {k} is: {v}." for k, v in zip(keys, values)),
        depths=tuple(r.random() for _ in keys), question=q, answer=answer,
        answer_items=tuple(values[i] for i in asked), meta={"keys": keys, "values": values},
    )


def variable_tracking(seed: int, num_chains: int = 1, num_hops: int = 4, digits: int = 5) -> TaskSpec:
    """Variable tracking: chains `VAR A = 12345`, `VAR B = VAR A`, ...; name every variable of chain 0."""
    r = random.Random(f"vt-{seed}")
    names: set[str] = set()
    while len(names) < num_chains * (num_hops + 1):
        names.add("".join(r.choices(string.ascii_uppercase, k=5)))
    pool = sorted(names)
    r.shuffle(pool)
    values = set()
    while len(values) < num_chains:
        values.add(_digits(r, digits))
    needles, depths, chains = [], [], []
    for c, value in enumerate(sorted(values)):
        chain = pool[c * (num_hops + 1) : (c + 1) * (num_hops + 1)]
        chains.append((value, chain))
        steps = [f"VAR {chain[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(chain, chain[1:])]
        needles += steps
        depths += sorted(r.random() for _ in steps)  # each chain appears in assignment order
    value, chain = chains[0]
    q = (f"Question: Find all variables that are assigned the value {value} in the text above. "
         f"Answer: According to the chain(s) of variable assignment in the text above, {len(chain)} "
         f"variables are assigned the value {value}, they are:")
    return TaskSpec(
        task="variable_tracking", seed=seed,
        header="Memorize and track the chain(s) of variable assignment hidden in the following text.",
        needles=tuple(needles), depths=tuple(depths), question=q, answer=" ".join(chain),
        answer_items=tuple(chain), meta={"chains": chains},
    )


def _check_depth(depth: float) -> float:
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    return float(depth)


TASKS: dict[str, Callable[..., TaskSpec]] = {
    "passkey": passkey,
    "niah_multikey": niah_multikey,
    "variable_tracking": variable_tracking,
}


def make_task(name: str, seed: int, **kwargs: Any) -> TaskSpec:
    """Build task `name` (one of TASKS) for `seed`; kwargs go to the task function."""
    if name not in TASKS:
        raise ValueError(f"unknown synthetic task {name!r}; choose one of {sorted(TASKS)}")
    return TASKS[name](seed, **kwargs)


def recall_text(seed: int, num_sentences: int, sentences_per_fact: int = 8, digits: int = 5) -> str:
    """Multi-query associative recall (MQAR, Arora et al. 2023) in filler; a training document only.

    One fact `The pass key of amber-otter is 12345. ...` per `sentences_per_fact` filler sentences at
    random slots, each asked once at a random later slot and answered: `What is the pass key of
    amber-otter? The pass key of amber-otter is 12345.` The single-question tasks give five answer
    tokens per document, far too few for a small model to learn copying from (docs/study.md); here
    ~1 in 25 tokens is an answer, at distances from a sentence to the whole document.
    """
    r = random.Random(f"recall-{seed}")
    names = r.sample([f"{a}-{b}" for a in _KEY_WORDS for b in _KEY_NOUNS],
                     max(1, min(num_sentences // sentences_per_fact, len(_KEY_WORDS) * len(_KEY_NOUNS))))
    slots: dict[int, list[str]] = {}
    for name in names:
        key = _digits(r, digits)
        fact, asked = sorted((r.randint(0, num_sentences), r.randint(0, num_sentences)))
        slots.setdefault(fact, []).append(f"The pass key of {name} is {key}. Remember it. {key} is the pass "
                                          f"key of {name}.")
        slots.setdefault(asked, []).append(f"What is the pass key of {name}? The pass key of {name} is {key}.")
    hay = Filler(r.randrange(2**31)).sentences(num_sentences)
    parts = []
    for k in range(num_sentences + 1):
        parts.extend(slots.get(k, []))  # a fact and its question in one slot stay in that order
        if k < num_sentences:
            parts.append(hay[k])
    return " ".join(parts)


def repeat_text(seed: int, num_sentences: int) -> str:
    """One list of random words written twice (`num_sentences` words, 8 to 32): a training document only.

    A fresh word costs ~4.8 nats; its copy costs nearly nothing to a model that finds the word's one
    earlier occurrence and reads on from there, so these documents push hard towards induction heads,
    the mechanism every retrieval task here rests on; the recall and passkey documents then stretch it
    over distance. A single short list keeps that earlier occurrence nearly unique (at most 32 of ~120
    words, as in the probe that learned copying); with many lists (or grammatical sentences) per
    document every word recurs before its copy, looking it up predicts nothing, and no copying was
    learned in 80M-320M tokens (docs/study.md).
    """
    r = random.Random(f"repeat-{seed}")
    words = " ".join(r.choice(_LIST_WORDS) for _ in range(min(max(num_sentences, 8), 32)))
    words = words.capitalize() + "."
    return f"{words} {words}"


DOCUMENT_TASKS = (*sorted(TASKS), "recall", "repeat")


def training_document(task: str, seed: int, num_sentences: int, depth_power: float = 1.0) -> str:
    """The text of one training document of `task` (one of DOCUMENT_TASKS) with `num_sentences` filler.

    The needles' depths are raised to `depth_power`: 1 keeps them uniform; above 1 moves them towards the
    start, so more needles sit far from their question. With uniform depths in documents of log-uniform
    length, the longest distances of a row are the rarest in training (a few needles per 10K documents
    more than 7.9K tokens back in an 8K row) and are where a model trained at that row length fails first.
    """
    if task == "recall":
        return recall_text(seed, num_sentences)
    if task == "repeat":
        return repeat_text(seed, num_sentences)
    if depth_power <= 0:
        raise ValueError(f"depth_power must be > 0, got {depth_power}")
    spec = make_task(task, seed)
    if depth_power != 1.0:  # monotone, so chains keep their order
        spec = replace(spec, depths=tuple(d**depth_power for d in spec.depths))
    return spec.to_text(num_sentences).text
