"""attn_implementation="powerattn" in transformers itself: the checkpoint's pattern and full-attention layers,
logits equal to our model's, generation with transformers' DynamicCache, padding, and clear refusals."""

import json
from pathlib import Path

import pytest
import torch

import powerattn
from powerattn.model import LlamaConfig, LlamaForCausalLM, from_pretrained

transformers = pytest.importorskip("transformers")
hf = pytest.importorskip("powerattn.hf")

V = 96
PATTERN = powerattn.make_pattern("power", block_size=8, window=2, sink=1)  # sparse beyond 3 blocks = 24 tokens


def tiny_checkpoint(path, vocab_size: int = V, model_type: str = "llama", pattern=PATTERN, schedule=(1,),
                    tokenizer_dir=None, device: str = "cpu") -> str:
    """A 3-layer model saved by powerattn (layer 1 full attention), weights large enough for attention to matter."""
    cfg = LlamaConfig(model_type=model_type, vocab_size=vocab_size, hidden_size=64, intermediate_size=96,
                      num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=1024, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg, pattern, list(schedule))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    model.save_pretrained(str(path), tokenizer_dir=tokenizer_dir)
    return str(path)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("hf") / "llama")


def load(path, attn="powerattn", **kw):
    return transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn, **kw).eval()


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_logits_equal_ours_and_differ_from_sdpa(tmp_path, ckpt, model_type):
    path = ckpt if model_type == "llama" else tiny_checkpoint(tmp_path / model_type, model_type=model_type)
    ours, theirs, dense = from_pretrained(path), load(path), load(path, "sdpa")
    assert hf.layer_patterns(theirs.config) == tuple(ours.layer_patterns)  # layer 1 stays full
    assert [p.name for p in ours.layer_patterns] == ["power", "full", "power"]
    ids = torch.randint(0, V, (2, 77))
    with torch.no_grad():
        want, got, sdpa = ours(ids), theirs(ids).logits, dense(ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (got - sdpa).abs().max() > 0.05  # the pattern is really sparse at 77 tokens
    with torch.no_grad():  # within the window the pattern is dense: sdpa agrees
        torch.testing.assert_close(theirs(ids[:, :24]).logits, dense(ids[:, :24]).logits, atol=1e-4, rtol=1e-4)


def test_generate_with_transformers_cache_matches_ours(ckpt):
    ours, theirs = from_pretrained(ckpt), load(ckpt)
    ids = torch.randint(3, V, (2, 50))
    out = theirs.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                          return_dict_in_generate=True, output_logits=True, pad_token_id=0, eos_token_id=None)
    assert torch.equal(out.sequences, ours.generate(ids, max_new_tokens=12))
    # Each decoded step's logits (one query against the DynamicCache) equal a full forward's row.
    with torch.no_grad():
        full = ours(out.sequences)
    torch.testing.assert_close(torch.stack(out.logits, 1), full[:, 49:-1], atol=1e-4, rtol=1e-4)

    # Left padding (batched prompts of several lengths): the pattern starts at each row's first token.
    prompts = [ids[0], ids[1, 9:]]
    padded = torch.stack([ids[0], torch.cat([torch.zeros(9, dtype=ids.dtype), ids[1, 9:]])])
    mask = (torch.arange(50) >= torch.tensor([[0], [9]])).long()
    got = theirs.generate(padded, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                          eos_token_id=None)
    want = ours.generate(prompts, max_new_tokens=12)
    assert [g[-12:].tolist() for g in got] == [w[-12:].tolist() for w in want]


def test_padding_honoured_or_refused(ckpt):
    ours, theirs = from_pretrained(ckpt), load(ckpt)
    ids = torch.randint(3, V, (2, 60))
    mask = torch.ones_like(ids)
    mask[1, 41:] = 0  # right padding: row 1 holds 41 tokens
    with torch.no_grad():
        got = theirs(ids, attention_mask=mask).logits
        torch.testing.assert_close(got[0], ours(ids[:1])[0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got[1, :41], ours(ids[1:, :41])[0], atol=1e-4, rtol=1e-4)
        holed = torch.ones_like(ids)
        holed[0, 10:12] = 0
        with pytest.raises(hf.PowerAttnError, match="row 0 has padding between real tokens"):
            theirs(ids, attention_mask=holed)
        with pytest.raises(hf.PowerAttnError, match="custom Tensor attention mask of shape"):
            theirs(ids, attention_mask=torch.ones(2, 1, 60, 60, dtype=torch.bool))


def test_packed_documents_and_gradients(ckpt):
    ours, theirs = from_pretrained(ckpt), load(ckpt).train()  # training mode: dropout is 0
    ids = torch.randint(3, V, (1, 70))
    pos = torch.cat([torch.arange(30), torch.arange(40)])[None]  # two packed documents: the pattern restarts

    def doc_loss(logits):  # next-token loss inside each document
        per_token = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="none")
        return torch.cat([per_token[:29], per_token[30:]]).mean()

    got, want = theirs(ids, position_ids=pos).logits, ours(ids, position_ids=pos)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    doc_loss(got).backward()
    doc_loss(want).backward()
    for name in ("q_proj", "k_proj", "v_proj"):
        torch.testing.assert_close(getattr(theirs.model.layers[0].self_attn, name).weight.grad,
                                   getattr(ours.model.layers[0].self_attn, name).weight.grad, atol=1e-5, rtol=1e-4)
    with pytest.raises(hf.PowerAttnError, match="use batch 1"):
        theirs(ids.expand(2, -1), position_ids=pos.expand(2, -1))


def test_configure_runs_a_base_model_sparse_and_errors(tmp_path):
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    base = transformers.LlamaForCausalLM(cfg)
    base.save_pretrained(tmp_path / "base")
    plain = load(tmp_path / "base")
    ids = torch.randint(0, V, (1, 40))
    with pytest.raises(hf.PowerAttnError, match="needs the 'powerattn' entry"):
        plain(ids)
    hf.configure(plain, PATTERN, "hybrid:1/2")
    plain.save_pretrained(tmp_path / "configured")
    reloaded = load(tmp_path / "configured")
    assert reloaded.config.powerattn["full_attention_layers"] == [1]
    ours = from_pretrained(tmp_path / "base", pattern=PATTERN, attention_schedule="hybrid:1/2")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, ours(ids), atol=1e-4, rtol=1e-4)

    # Our Mistral checkpoints say sliding_window: null (transformers' MistralConfig would assume 4096 tokens);
    # a config that does ask for a window is refused with the way out.
    mistral = tiny_checkpoint(tmp_path / "mistral", model_type="mistral")
    assert json.loads((Path(mistral) / "config.json").read_text())["sliding_window"] is None
    with torch.no_grad():
        got = load(mistral)(ids).logits
    torch.testing.assert_close(got, from_pretrained(mistral)(ids), atol=1e-4, rtol=1e-4)
    with pytest.raises(hf.PowerAttnError, match="sliding_window=None"):
        load(mistral, sliding_window=4096)(ids)


@pytest.mark.gpu
def test_gpu_bf16_triton_matches_ours(tmp_path):
    pattern = powerattn.make_pattern("power", block_size=64, window=2, sink=1)
    path = tiny_checkpoint(tmp_path / "gpu", vocab_size=512, pattern=pattern, schedule=(1,))
    ours = from_pretrained(path, dtype=torch.bfloat16, device="cuda")
    theirs = load(path, dtype=torch.bfloat16).cuda()
    dense = load(path, "sdpa", dtype=torch.bfloat16).cuda()
    ids = torch.randint(3, 512, (2, 1500), device="cuda")
    with torch.no_grad():
        want, got, sdpa = ours(ids).float(), theirs(ids).logits.float(), dense(ids).logits.float()
    scale = want.abs().max()
    assert (got - want).abs().max() <= 0.02 * scale, (got - want).abs().max()
    assert (got - sdpa).abs().max() > 0.1 * scale
    out = theirs.generate(ids[:, :1000], attention_mask=torch.ones_like(ids[:, :1000]), max_new_tokens=8,
                          do_sample=False, return_dict_in_generate=True, output_logits=True, pad_token_id=0,
                          eos_token_id=None)
    with torch.no_grad():
        full = ours(out.sequences).float()
    step = torch.stack(out.logits, 1).float()
    assert (step - full[:, 999:-1]).abs().max() <= 0.02 * scale
