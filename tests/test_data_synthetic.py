"""Synthetic tasks: deterministic by seed, answers recoverable from the text, exact token lengths."""

import re

import pytest

from powerattn.data.config import SyntheticConfig
from powerattn.data.filler import Filler
from powerattn.data.synthetic import (
    TASKS,
    make_task,
    niah_multikey,
    passkey,
    recall_text,
    repeat_text,
    training_document,
    variable_tracking,
)
from powerattn.data.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = [Filler(i).text(40) for i in range(30)]
    texts += [make_task(name, s).to_text(5).text for name in TASKS for s in range(10)]
    return train_tokenizer(texts, 700, tmp_path_factory.mktemp("tok") / "tokenizer.model")


def _passkey_of(text):
    keys = set(re.findall(r"The pass key is (\d+)\. Remember it\. (\d+) is the pass key\.", text))
    assert len(keys) == 1
    (a, b), = keys
    assert a == b
    return a


def _niah_answer(text):
    pairs = dict(re.findall(r"One of the special magic numbers for ([a-z]+-[a-z]+) is: (\d+)\.", text))
    asked = re.search(r"magic numbers? for ([a-z, -]+) mentioned in the provided text (?:is|are)$", text)
    return ", ".join(pairs[k] for k in asked.group(1).split(", "))


def _vt_answer(text):
    value = re.search(r"Find all variables that are assigned the value (\d+)", text).group(1)
    names, changed = set(), True
    assigns = re.findall(r"VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d+)\.", text)
    while changed:  # follow the chain as a reader would: multi-hop
        changed = False
        for dst, src in assigns:
            if dst not in names and (src == value or src.removeprefix("VAR ") in names):
                names.add(dst)
                changed = True
    return names


def test_deterministic_by_seed():
    for name in TASKS:
        a, b, c = make_task(name, 3), make_task(name, 3), make_task(name, 4)
        assert a == b and a.to_text(30) == b.to_text(30)
        assert a.to_text(30).text != c.to_text(30).text
    assert Filler(5).sentences(20) == Filler(5).sentences(20)


def test_filler_has_no_needle_like_strings():
    text = Filler(0).text(2000)
    assert not re.search(r"\d", text)
    assert not re.search(r"\b[A-Z]{2,}\b", text)
    assert "pass key" not in text and "magic" not in text


@pytest.mark.parametrize("seed", range(5))
def test_answers_recoverable_from_text(seed):
    s = passkey(seed, depth=0.3).to_text(50)
    assert _passkey_of(s.prompt) == s.answer and s.text.endswith(f"The pass key is {s.answer}")
    spec = niah_multikey(seed, num_keys=5, num_queries=1 + seed % 3)
    s = spec.to_text(60)
    assert _niah_answer(s.prompt) == s.answer
    assert spec.score(s.answer) == 1.0 and spec.score("nothing") == 0.0
    spec = variable_tracking(seed, num_chains=2, num_hops=3)
    s = spec.to_text(60)
    assert _vt_answer(s.prompt) == set(s.answer.split()) and len(s.answer.split()) == 4


def test_passkey_depth_in_text():
    for depth in (0.0, 0.5, 1.0):
        prompt = passkey(1, depth=depth).to_text(100).prompt
        before = prompt[: prompt.index("The pass key is")].count(".") - 3  # minus the header's sentences
        assert abs(before - depth * 100) <= 1


@pytest.mark.parametrize("length", [300, 513, 1024])
def test_exact_token_length_prompts(tok, length):
    for name in TASKS:
        spec = make_task(name, length)
        p = spec.to_tokens(tok, length)
        assert len(p.input_ids) == length and p.input_ids[0] == tok.bos_id
        assert p.prompt == tok.decode(p.input_ids)
        assert p.prompt.endswith(spec.question)
        for needle, pos in zip(spec.needles, p.needle_positions):
            assert needle in p.prompt
            assert tok.decode(p.input_ids[pos : pos + len(tok.encode(needle, bos=False))]) == needle
        recovered = {"passkey": _passkey_of, "niah_multikey": _niah_answer}.get(name)
        if recovered:
            assert recovered(p.prompt) == p.answer
        else:
            assert _vt_answer(p.prompt) == set(p.answer.split())


def test_token_depth(tok):
    for depth in (0.0, 0.25, 0.75, 1.0):
        p = passkey(0, depth=depth).to_tokens(tok, 2000)
        assert abs(p.needle_positions[0] / 2000 - depth) < 0.05


def test_errors(tok):
    with pytest.raises(ValueError, match="too short"):
        passkey(0).to_tokens(tok, 20)
    with pytest.raises(ValueError, match="unknown synthetic task 'nope'"):
        make_task("nope", 0)
    with pytest.raises(ValueError, match="depth"):
        passkey(0, depth=1.5)
    with pytest.raises(ValueError, match="num_queries"):
        niah_multikey(0, num_keys=2, num_queries=3)


def test_recall_asks_every_fact_once_after_it_with_its_key():
    text = recall_text(7, 160)
    fact = r"The pass key of ([a-z]+-[a-z]+) is (\d{5})\. Remember it\. \2 is the pass key of \1\."
    facts = [(m.start(), m.group(1), m.group(2)) for m in re.finditer(fact, text)]
    asked = [(m.start(), m.group(1), m.group(2)) for m in
             re.finditer(r"What is the pass key of ([a-z]+-[a-z]+)\? The pass key of \1 is (\d{5})\.", text)]
    assert len(facts) == len(asked) == 160 // 8
    where = {name: (pos, key) for pos, name, key in facts}
    assert len(where) == len(facts)  # distinct names: a question has one answer
    for pos, name, key in asked:
        assert where[name][1] == key and where[name][0] < pos
    assert recall_text(7, 160) == text != recall_text(8, 160)
    assert training_document("recall", 7, 160) == text
    assert _passkey_of(training_document("passkey", 3, 20)) == passkey(3).answer


def test_repeat_writes_one_random_list_twice():
    for n, words in ((3, 8), (20, 20), (400, 32)):
        first, second = re.findall(r"[A-Z][^.]*\.", repeat_text(5, n))
        assert first == second and len(first.split()) == words and not re.search(r"\d", first)
    assert repeat_text(5, 40) == training_document("repeat", 5, 40) != repeat_text(6, 40)


def test_depth_power_moves_needles_towards_the_start_and_keeps_the_task():
    def needle_share(power: float) -> float:  # mean share of the document before the passkey needle
        shares = []
        for seed in range(40):
            text = training_document("passkey", seed, 60, power)
            assert _passkey_of(text) == passkey(seed).answer
            shares.append(text.index("The pass key is") / len(text))
        return sum(shares) / len(shares)

    uniform, skewed = needle_share(1.0), needle_share(3.0)
    assert training_document("passkey", 3, 20, 1.0) == training_document("passkey", 3, 20)
    assert 0.35 < uniform < 0.65 and skewed < 0.6 * uniform  # E[u**3] = 1/4 against E[u] = 1/2
    with pytest.raises(ValueError, match="depth_power must be > 0, got 0"):
        SyntheticConfig(depth_power=0)
