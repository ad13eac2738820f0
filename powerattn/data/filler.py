"""Filler text: random grammatical sentences from a small built-in vocabulary and grammar.

The haystack of the synthetic tasks and the bulk of the embedded default corpus. Written for this
project (no corpus is copied); it never produces digits or all-capital words, so needles
(pass keys, magic numbers, `VAR` names) are the only such strings in a haystack.
"""

from __future__ import annotations

import random

ADJECTIVES = (
    "quiet old bright small green silver heavy gentle distant narrow warm cold tall soft golden "
    "patient hidden broken careful ancient curious steady pale restless hollow busy wooden"
).split()
NOUNS = (
    "river lantern valley bird hill garden farmer window bridge forest traveler mountain village "
    "letter storm boat market teacher candle road meadow painter harbor clock orchard tower "
    "shepherd wagon kitchen library stone island"
).split()
PLACES = "valley harbor forest market village meadow library orchard kitchen station castle field".split()
VERBS_T = (
    "carried watched found followed painted repaired crossed remembered opened visited lifted "
    "described guarded noticed borrowed"
).split()
VERBS_I = "slept waited wandered sang rested vanished returned trembled laughed listened".split()
ADVERBS = "slowly quietly happily again early late carefully softly suddenly patiently".split()
PREPS = "across near behind beside toward under above beyond through into".split()
NAMES = "Mara Tobin Elsa Oren Lina Pavel Ruth Ivo Nadia Felix".split()
TIMES = "morning evening winter spring autumn night afternoon".split()


def _np(r: random.Random, article: str | None = None) -> str:
    art = article or r.choice(("the", "a", "every", "one"))
    words = f"{r.choice(ADJECTIVES)} {r.choice(NOUNS)}" if r.random() < 0.5 else r.choice(NOUNS)
    if art == "a" and words[0] in "aeiou":
        art = "an"
    return f"{art} {words}"


def _templates(r: random.Random) -> str:
    k = r.randrange(7)
    if k == 0:
        return f"{_np(r, 'the')} {r.choice(VERBS_T)} {_np(r)} {r.choice(PREPS)} the {r.choice(PLACES)}"
    if k == 1:
        return f"{_np(r)} {r.choice(VERBS_I)} {r.choice(ADVERBS)}"
    if k == 2:
        return f"{r.choice(NAMES)} {r.choice(VERBS_T)} {_np(r)} in the {r.choice(TIMES)}"
    if k == 3:
        return f"when {_np(r, 'the')} {r.choice(VERBS_I)}, {_np(r)} {r.choice(VERBS_T)} {_np(r)}"
    if k == 4:
        return f"{_np(r, 'the')} {r.choice(PREPS)} the {r.choice(PLACES)} was {r.choice(ADJECTIVES)}"
    if k == 5:
        who = f"{r.choice(NAMES)} and {r.choice(NAMES)}"
        return f"{who} {r.choice(VERBS_I)} {r.choice(PREPS)} the {r.choice(PLACES)}"
    return f"in the {r.choice(TIMES)} {_np(r, 'the')} {r.choice(VERBS_I)} {r.choice(ADVERBS)}"


class Filler:
    """Deterministic stream of sentences: Filler(seed).sentences(n) is the same list for the same seed."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def sentence(self) -> str:
        s = _templates(self.rng)
        return s[0].upper() + s[1:] + "."

    def sentences(self, n: int) -> list[str]:
        return [self.sentence() for _ in range(n)]

    def text(self, n: int) -> str:
        return " ".join(self.sentences(n))
