"""The model's own behaviour: sparse attention vs the dense oracle, per-layer schedule, chunked loss,
packed documents, activation checkpointing, KV-cache decoding, training with every pattern, FLOPs."""

import copy

import pytest
import torch
import torch.nn.functional as F

import powerattn
from powerattn.model import (
    KVCache,
    LlamaConfig,
    LlamaForCausalLM,
    flops_per_token,
    next_token_targets,
    resolve_attention_schedule,
)
from powerattn.model import llama as llama_module
from powerattn.reference import dense_reference

V = 96


def tiny(**overrides) -> LlamaConfig:
    kw = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.15)
    kw.update(overrides)
    return LlamaConfig(**kw)


def sparse_power():
    # Small blocks and window so the pattern really skips blocks at test lengths.
    return powerattn.make_pattern("power", block_size=16, window=2, sink=1)


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_sparse_model_equals_dense_reference_attention(monkeypatch):
    model = LlamaForCausalLM(tiny(), sparse_power())
    ids = torch.randint(0, V, (2, 128))
    cu = torch.tensor([0, 50, 128], dtype=torch.int32)
    sparse, packed = model(ids), model(ids[:1], cu_seqlens=cu)

    def oracle(q, k, v, pattern, cu_seqlens=None, **kw):
        return dense_reference(q, k, v, pattern, cu_seqlens)

    monkeypatch.setattr(llama_module, "sparse_attention", oracle)
    torch.testing.assert_close(sparse, model(ids), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed, model(ids[:1], cu_seqlens=cu), atol=1e-5, rtol=1e-5)
    model.configure_attention(None)  # full attention must differ, or sparsity was never exercised
    assert (model(ids) - sparse).abs().max() > 1e-2


def test_attention_schedule():
    assert resolve_attention_schedule(None, 4) == ()
    assert resolve_attention_schedule("full", 3) == (0, 1, 2)
    assert resolve_attention_schedule("hybrid:2/7", 28) == (2, 6, 9, 13, 16, 20, 23, 27)
    assert resolve_attention_schedule("hybrid:1/4", 6) == (3,)
    assert resolve_attention_schedule([5, 0], 6) == (0, 5)
    for bad in ("hybrid:3/2", "hybrid:2", "every:2/7", [0, 9], [1, 1], [True]):
        with pytest.raises(ValueError, match="attention_schedule"):
            resolve_attention_schedule(bad, 6)
    model = LlamaForCausalLM(tiny(num_hidden_layers=4), sparse_power(), attention_schedule=[1, 3])
    assert [p.name for p in model.layer_patterns] == ["power", "full", "power", "full"]
    assert all(p.block_size == 16 for p in model.layer_patterns)


def test_hydra_containers_are_accepted():
    omegaconf = pytest.importorskip("omegaconf")
    c = omegaconf.OmegaConf.create({"layers": [1, 3], "rope": {"rope_type": "linear", "factor": 2.0}})
    assert resolve_attention_schedule(c.layers, 4) == (1, 3)
    cfg = tiny(num_hidden_layers=4, activation_checkpointing=c.layers, rope_scaling=c.rope)
    assert cfg.checkpointed_layers() == {1, 3} and cfg.rope_scaling == {"rope_type": "linear", "factor": 2.0}


def test_chunked_loss_equals_plain_loss_and_gradients():
    model = LlamaForCausalLM(tiny(loss_chunk_size=7), sparse_power())
    plain = copy.deepcopy(model)
    ids = torch.randint(0, V, (2, 45))
    labels = ids.clone()
    labels[0, :10] = -100
    labels[1, 30] = -100
    loss = model(ids, labels=labels)
    loss.backward()
    logits = plain(ids)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100)
    ref.backward()
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-6)
    g, g_ref = grads(model), grads(plain)
    assert g.keys() == g_ref.keys() and "lm_head.weight" in g
    for name in g:
        torch.testing.assert_close(g[name], g_ref[name], atol=1e-6, rtol=1e-5, msg=name)


def test_tied_embeddings_get_both_gradients():
    model = LlamaForCausalLM(tiny(tie_word_embeddings=True, loss_chunk_size=16))
    plain = copy.deepcopy(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.randint(0, V, (1, 40))
    model(ids, labels=ids).backward()
    F.cross_entropy(plain(ids)[0, :-1], ids[0, 1:]).backward()
    torch.testing.assert_close(model.lm_head.weight.grad, plain.lm_head.weight.grad, atol=1e-6, rtol=1e-5)


def test_packed_documents_are_independent():
    """Packed loss == token-weighted mean of per-document losses: attention, positions and targets restart."""
    model = LlamaForCausalLM(tiny(), sparse_power())
    docs = [torch.randint(0, V, (n,)) for n in (37, 20, 51)]
    packed = torch.cat(docs)[None]
    cu = torch.tensor([0, 37, 57, 108], dtype=torch.int32)
    loss = model(packed, labels=packed, cu_seqlens=cu)
    total = sum(model(d[None], labels=d[None]) * (len(d) - 1) for d in docs)
    torch.testing.assert_close(loss, total / sum(len(d) - 1 for d in docs), atol=1e-5, rtol=1e-5)
    # Restarting position_ids alone mark the same documents.
    pos = torch.cat([torch.arange(len(d)) for d in docs])[None]
    torch.testing.assert_close(model(packed, labels=packed, position_ids=pos), loss, atol=1e-6, rtol=1e-6)
    logits = model(packed, cu_seqlens=cu)
    torch.testing.assert_close(logits[0, 37:57], model(docs[1][None])[0], atol=1e-5, rtol=1e-5)


def test_next_token_targets():
    labels = torch.arange(10)[None]
    t = next_token_targets(labels, cu_seqlens=torch.tensor([0, 4, 10], dtype=torch.int32))
    assert t.tolist() == [[1, 2, 3, -100, 5, 6, 7, 8, 9, -100]]
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 0, 1, 2]])
    assert next_token_targets(labels, position_ids=pos).tolist() == [[1, 2, -100, 4, 5, 6, -100, 8, 9, -100]]


def test_all_ignored_loss_is_zero_not_nan():
    model = LlamaForCausalLM(tiny())
    loss = model(torch.randint(0, V, (1, 8)), labels=torch.full((1, 8), -100))
    assert loss.item() == 0.0
    loss.backward()


def test_activation_checkpointing_gives_same_gradients():
    model = LlamaForCausalLM(tiny(num_hidden_layers=3), sparse_power())
    ckpt = copy.deepcopy(model)
    ckpt.config.activation_checkpointing = [0, 2]
    assert ckpt.config.checkpointed_layers() == {0, 2}
    ids = torch.randint(0, V, (2, 40))
    model.train(), ckpt.train()
    model(ids, labels=ids).backward()
    ckpt(ids, labels=ids).backward()
    g, g_ck = grads(model), grads(ckpt)
    for name in g:
        torch.testing.assert_close(g[name], g_ck[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("pattern", [sparse_power(), powerattn.make_pattern("full", block_size=16)],
                         ids=["power", "full"])
def test_kv_cache_decoding_equals_full_recompute(pattern):
    torch.manual_seed(1)
    model = LlamaForCausalLM(tiny(), pattern).eval()
    seq = torch.randint(0, V, (2, 83))
    prompt = 29  # decoding then crosses several 16-token block boundaries
    full = model(seq)
    cache = KVCache(model.config.num_hidden_layers, 2, 90)
    got = [model(seq[:, :prompt], kv_cache=cache)]
    t = prompt
    while t < seq.shape[1]:
        step = 1 if t < 70 else 3  # single tokens, then chunks of 3 queries
        got.append(model(seq[:, t:t + step], kv_cache=cache))
        t += step
    assert cache.lengths == [83, 83]
    torch.testing.assert_close(torch.cat(got, dim=1), full, atol=1e-5, rtol=1e-5)


def test_generate_matches_greedy_recompute_and_ragged_prompts():
    model = LlamaForCausalLM(tiny(), sparse_power()).eval()
    prompts = torch.randint(0, V, (2, 21))
    out = model.generate(prompts, max_new_tokens=20)
    seq = prompts
    for _ in range(20):  # greedy without a cache: recompute everything each step
        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)
    ragged = [prompts[0, :9], prompts[1]]
    outs = model.generate(ragged, max_new_tokens=20)
    for p, o in zip(ragged, outs):
        assert torch.equal(o, model.generate(p[None], max_new_tokens=20)[0])
    eos = int(out[0, 21])  # the first generated token of row 0 stops that row at once
    stopped = model.generate(prompts, max_new_tokens=20, eos_token_id=eos)
    assert stopped.shape == out.shape and (stopped[0, 21:] == eos).all()


def test_dense_model_through_sdpa_matches_the_portable_backend():
    """backend="sdpa" (what auto picks for dense layers on CUDA): loss and gradients over packed documents,
    and generation (decoding falls back to the pattern kernels), as with the block-gather backend."""
    torch.manual_seed(2)
    model = LlamaForCausalLM(tiny(), None, backend="torch")
    sdpa = copy.deepcopy(model)
    sdpa.configure_attention(None, backend="sdpa")
    ids = torch.randint(0, V, (1, 70))
    cu = torch.tensor([0, 30, 70], dtype=torch.int32)
    losses = [m(ids, labels=ids, cu_seqlens=cu) for m in (model, sdpa)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[1], losses[0], atol=1e-6, rtol=1e-6)
    g, g_sdpa = grads(model), grads(sdpa)
    for name in g:
        torch.testing.assert_close(g_sdpa[name], g[name], atol=1e-6, rtol=1e-5, msg=name)
    assert torch.equal(sdpa.eval().generate(ids[:, :10], 6), model.eval().generate(ids[:, :10], 6))


@pytest.mark.parametrize("name", powerattn.pattern_names())
def test_loss_goes_down_with_every_pattern(name):
    model = LlamaForCausalLM(tiny(initializer_range=0.02), powerattn.make_pattern(name, block_size=16))
    model.train()
    ids = torch.randint(0, V, (2, 64))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = model(ids, labels=ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses


def test_bfloat16_forward_backward():
    model = LlamaForCausalLM(tiny(loss_chunk_size=16), sparse_power()).to(torch.bfloat16)
    ids = torch.randint(0, V, (1, 40))
    loss = model(ids, labels=ids)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert model.lm_head.weight.grad.dtype == torch.bfloat16


def test_flops_per_token():
    cfg = tiny()
    full = powerattn.make_pattern("full", block_size=16)
    h, i, hd, L = 64, 96, 16, 2
    dense = 2 * (L * (h * 4 * hd + 2 * h * 2 * hd + 4 * hd * h + 3 * h * i) + h * V)
    s = 128
    attn = L * 4 * 4 * hd * (s + 1) / 2
    assert flops_per_token(cfg, s, full, training=False) == pytest.approx(dense + attn)
    assert flops_per_token(cfg, s, full) == pytest.approx(3 * (dense + attn))
    model = LlamaForCausalLM(cfg, sparse_power(), attention_schedule=[1])
    d = sparse_power().density(s)
    expect = dense + 4 * 4 * hd * (s + 1) / 2 * (1 + d)
    assert d < 0.9 and flops_per_token(cfg, s, model.layer_patterns, training=False) == pytest.approx(expect)


def test_input_errors():
    model = LlamaForCausalLM(tiny())
    ids = torch.randint(0, V, (2, 8))
    with pytest.raises(ValueError, match="batch 1"):
        model(ids, cu_seqlens=torch.tensor([0, 8], dtype=torch.int32))
    with pytest.raises(ValueError, match="ascend from 0 to seqlen=8"):
        model(ids[:1], cu_seqlens=torch.tensor([0, 5], dtype=torch.int32))
    with pytest.raises(ValueError, match="labels"):
        model(ids, labels=ids[:, :4])
    with pytest.raises(ValueError, match="input_ids"):
        model(ids.float())
    with pytest.raises(ValueError, match="unknown backend"):
        model.configure_attention(None, backend="cuda")
