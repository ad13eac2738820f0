"""Tokenizers (sentencepiece and HF tokenizer.json) and the trainer: round trips, BOS/EOS, hashing, errors."""

import json
import re

import pytest

from powerattn.data.filler import Filler
from powerattn.data.tokenizer import Tokenizer, encode_documents, train_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = [Filler(i).text(50) for i in range(40)] + ["VAR ABCDE = 12345. The pass key is 67890."]
    return train_tokenizer(texts, 400, tmp_path_factory.mktemp("tok") / "tokenizer.model")


def test_llama_layout_and_round_trip(tok):
    assert (tok.backend.sp.unk_id(), tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.pad_id == tok.eos_id  # no pad piece: padding reuses EOS (never labelled)
    text = "The quiet river  sang.\nThe pass key is 90210.\n\nVAR QWXYZ = VAR ABCDE ~ ü"
    ids = tok.encode(text, bos=False)
    assert tok.decode(ids) == text  # identity normalisation + byte fallback: exact
    digits = tok.encode("90210", bos=False)
    assert len([i for i in digits if tok.backend.sp.id_to_piece(i).strip("▁")]) == 5  # digits split


def test_document_wrapping(tok):
    doc = tok.encode_document("A river sang.")
    assert doc[0] == tok.bos_id and doc[-1] == tok.eos_id
    assert tok.encode("A river sang.") == doc[:-1]  # add_bos by default, no EOS
    assert tok.encode_batch(["A river sang.", "x"], eos=True)[0] == doc
    assert tok.decode(doc) == "A river sang."


def test_from_pretrained_folder_reads_tokenizer_config(tok, tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(open(tok.path, "rb").read())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))
    t2 = Tokenizer.from_pretrained(tmp_path)
    assert not t2.add_bos and t2.encode_document("x")[0] != t2.bos_id
    assert t2.hash != tok.hash  # same model, different document convention: different cache key
    assert Tokenizer(tok.path).hash == tok.hash


def test_vocab_too_large_falls_back(tmp_path):
    t = train_tokenizer(["tiny corpus of words"] * 5, 5000, tmp_path / "t.model")
    assert 0 < t.vocab_size < 5000


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model"):
        Tokenizer(tmp_path / "nope.model")
    with pytest.raises(FileNotFoundError, match="tokenizer.model, an HF tokenizer.json"):
        Tokenizer(tmp_path)
    with pytest.raises(ValueError, match="vocab_size=100 is too small"):
        train_tokenizer(["some words"], 100, tmp_path / "t.model")
    with pytest.raises(ValueError, match="no non-empty text"):
        train_tokenizer(["", "\n"], 100, tmp_path / "t.model")


# ---- HF tokenizer.json (Llama-3, Qwen2) ---------------------------------------------------------------

LLAMA3 = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}
QWEN2 = {"bos_token": None, "eos_token": {"content": "<|endoftext|>", "special": True}, "add_bos_token": False}


def hf_folder(folder, config):
    """A byte-level BPE tokenizer.json (as Llama-3 and Qwen2 ship) plus the given tokenizer_config.json."""
    from tokenizers import Tokenizer as FastTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    fast = FastTokenizer(models.BPE())
    fast.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    fast.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|endoftext|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    fast.train_from_iterator([Filler(i).text(20) for i in range(20)], trainer)
    folder.mkdir(parents=True, exist_ok=True)
    fast.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_hf_llama3_style_folder(tmp_path):
    t = Tokenizer.from_pretrained(hf_folder(tmp_path / "m", LLAMA3))
    assert t.path.endswith("tokenizer.json") and t.vocab_size > 300
    fast = t.backend.tok
    assert (t.bos_id, t.eos_id) == (fast.token_to_id("<|begin_of_text|>"), fast.token_to_id("<|end_of_text|>"))
    assert t.add_bos and t.pad_id == t.eos_id
    text = "The quiet river  sang.\nThe pass key is 90210. ü"
    doc = t.encode_document(text)
    assert doc[0] == t.bos_id and doc[-1] == t.eos_id and t.eos_id not in doc[1:-1]
    assert t.decode(doc) == text  # byte-level BPE: exact round trip
    assert encode_documents([text], t.path, t.bos_id, t.eos_id) == [doc]  # the datasets.map worker path


def test_hf_qwen2_style_has_no_bos(tmp_path):
    t = Tokenizer.from_pretrained(hf_folder(tmp_path / "m", QWEN2))
    assert t.bos_id == -1 and not t.add_bos
    doc = t.encode_document("A river sang.")
    assert doc[-1] == t.eos_id == t.backend.tok.token_to_id("<|endoftext|>")
    assert t.decode(doc) == "A river sang."
    assert encode_documents(["A river sang."], t.path, -1, t.eos_id) == [doc]


def test_hf_hash_save_and_folder_preference(tok, tmp_path):
    a = Tokenizer.from_pretrained(hf_folder(tmp_path / "a", LLAMA3))
    b = Tokenizer.from_pretrained(hf_folder(tmp_path / "b", {**LLAMA3, "eos_token": "<|endoftext|>"}))
    assert a.hash != b.hash  # same tokenizer.json, another EOS: another tokenisation
    (tmp_path / "saved").mkdir()
    a.save(tmp_path / "saved")
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    assert Tokenizer.from_pretrained(tmp_path / "saved").hash == a.hash
    (tmp_path / "sp").mkdir()
    tok.save(tmp_path / "sp")
    assert Tokenizer(tmp_path / "sp").hash == tok.hash
    (tmp_path / "a" / "tokenizer.model").write_bytes(open(tok.path, "rb").read())
    assert Tokenizer(tmp_path / "a").path.endswith("tokenizer.model")  # sentencepiece first, as HF does


def test_hf_errors_name_the_problem(tmp_path):
    folder = hf_folder(tmp_path / "m", {})
    with pytest.raises(ValueError, match="no EOS token"):
        Tokenizer.from_pretrained(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    with pytest.raises(ValueError, match="eos_token '</s>', which tokenizer.json lacks"):
        Tokenizer.from_pretrained(folder)


def test_hf_tokenizer_through_the_source_pipeline(tmp_path):
    from powerattn.data.config import SourceConfig
    from powerattn.data.sources import tokenize_source

    t = Tokenizer.from_pretrained(hf_folder(tmp_path / "m", LLAMA3))
    texts = [Filler(i).text(1 + i % 5) for i in range(30)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": x}) + "\n" for x in texts))
    for num_proc in (1, 2):  # in-process and datasets.map worker processes
        (src,) = tokenize_source(SourceConfig(path=str(tmp_path / "d.jsonl")), t, tmp_path / f"c{num_proc}",
                                 num_proc=num_proc)
        assert [src.store.doc(i).tolist() for i in range(src.store.num_docs)] == [t.encode_document(x) for x in texts]


@pytest.mark.parametrize("style", ["sentencepiece", "tokenizer.json"])
def test_eval_prompts_read_as_spaced_text(style, tok, tmp_path):
    # Prompts are assembled from separately encoded sentences; with either tokenizer kind they must
    # decode to text whose sentences are separated by spaces, as the model saw in training.
    from powerattn.data.synthetic import passkey

    t = tok if style == "sentencepiece" else Tokenizer.from_pretrained(hf_folder(tmp_path / "m", LLAMA3))
    prompt = passkey(3, depth=0.5).to_tokens(t, 300)
    assert len(prompt.input_ids) == 300
    assert re.search(r"\.[A-Z]", prompt.prompt) is None, prompt.prompt[:300]
    assert f"The pass key is {prompt.answer}." in prompt.prompt
