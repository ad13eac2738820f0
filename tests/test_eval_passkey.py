"""Passkey scoring (exact match on the digits) and quick_passkey, with an oracle and a random tiny model."""

import re

import pytest
import torch
from torch import nn

from powerattn import make_pattern
from powerattn.data import default_tokenizer
from powerattn.evaluation import passkey_grid, passkey_match, quick_passkey
from powerattn.evaluation.generation import length_batches
from powerattn.evaluation.passkey import resolve_depths
from powerattn.model import LlamaConfig, LlamaForCausalLM


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return default_tokenizer(tmp_path_factory.getbasetemp() / "data_cache")


class Oracle(nn.Module):
    """Answers with the pass key it finds in the prompt (or a fixed wrong key)."""

    def __init__(self, tokenizer, wrong: str | None = None):
        super().__init__()
        self.tok, self.wrong = tokenizer, wrong
        self.w = nn.Parameter(torch.zeros(1))

    def generate(self, input_ids, max_new_tokens):
        rows = []
        for row in input_ids.tolist():
            key = self.wrong or re.search(r"The pass key is (\d+)", self.tok.decode(row)).group(1)
            new = self.tok.encode(f" {key}. The", bos=False, eos=False)[:max_new_tokens]
            new += [self.tok.eos_id] * (max_new_tokens - len(new))
            rows.append(row + new)
        return torch.tensor(rows)


@pytest.mark.parametrize("prediction,answer,ok", [
    (" 12345", "12345", True),
    ("12345. Remember it.", "12345", True),
    (" 123456", "12345", False),     # an extra digit is not a match
    (" 1234", "12345", False),
    (" the key 12345", "12345", True),
    (" 54321 12345", "12345", False),  # only the first number counts
    ("", "12345", False),
    (" twelve", "12345", False),
])
def test_passkey_match_is_exact_on_digits(prediction, answer, ok):
    assert passkey_match(prediction, answer) is ok


def test_resolve_depths():
    assert resolve_depths(5) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert resolve_depths(1) == [0.5]
    with pytest.raises(ValueError, match="depths"):
        resolve_depths([0.5, 1.5])


def test_length_batches_group_equal_lengths():
    batches = length_batches([4, 8, 4, 8, 4], batch_size=2)
    assert batches == [[1, 3], [0, 2], [4]]


def test_quick_passkey_oracle_scores_one_and_wrong_scores_zero(tokenizer):
    assert quick_passkey(Oracle(tokenizer), tokenizer, [200, 300], [0.0, 0.5, 1.0], samples=2) == 1.0
    assert quick_passkey(Oracle(tokenizer, wrong="99999"), tokenizer, [200], [0.5], samples=3) == 0.0


def test_quick_passkey_on_a_tiny_model_keeps_train_mode(tokenizer):
    cfg = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                      max_position_embeddings=1024)
    model = LlamaForCausalLM(cfg, make_pattern("power", block_size=32)).train()
    acc = quick_passkey(model, tokenizer, [160, 200], [0.0, 1.0], samples=2, batch_size=3)
    assert 0.0 <= acc <= 1.0 and model.training


def test_passkey_grid_records_and_errors(tokenizer):
    grid = passkey_grid(Oracle(tokenizer), tokenizer, [200, 260], 3, samples=2, progress=False)
    assert len(grid.records) == 2 * 3 * 2
    assert grid.accuracy() == [[1.0] * 3] * 2
    keys = {r["answer"] for r in grid.records}
    assert len(keys) > 6  # every cell has its own key
    r = grid.records[0]
    assert set(r) >= {"length", "depth", "sample", "answer", "prediction", "correct", "needle_position"}
    with pytest.raises(ValueError, match="too short"):
        passkey_grid(Oracle(tokenizer), tokenizer, [20, 300], 2, samples=1, progress=False)
