"""model.fused_ops: the eager fallback off CUDA, the errors, and Liger-Kernel's kernels against the eager ops.

On CPU, Liger's RoPE, SwiGLU and fused linear + cross-entropy run in Triton's interpreter at small fp32
shapes (its RMSNorm calls a libdevice function the interpreter lacks). The `gpu` tests compare every op,
then a whole model (forward, summed loss, target count, every gradient) in bf16, each path against a
float32 eager reference, so the fused path must be as accurate as the eager one.
"""

import os

import pytest
import torch
import torch.nn.functional as F

from powerattn.model import (
    LlamaConfig,
    LlamaForCausalLM,
    chunked_cross_entropy,
    find_documents,
    fused,
    next_token_targets,
)
from powerattn.model.config import CheckpointError
from powerattn.model.rope import RotaryEmbedding, apply_rope
from powerattn.targets import IGNORE_INDEX

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1" and not torch.cuda.is_available()
needs_liger = pytest.mark.skipif(not fused.liger_available(), reason="needs liger-kernel")
in_interpreter = pytest.mark.skipif(not INTERPRETER, reason="Liger's kernels on CPU tensors need TRITON_INTERPRET=1")


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def tiny_config(**kw):
    base = dict(vocab_size=211, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)
    return LlamaConfig(**{**base, **kw})


def packed_batch(s, vocab, device):
    """One row of three documents with some labels ignored: targets stop at each document's end."""
    ids = torch.randint(0, vocab, (1, s), device=device)
    labels = ids.clone()
    labels[0, 5:9] = IGNORE_INDEX
    cu = torch.tensor([0, s // 3, s // 3 + 7, s], dtype=torch.int32)
    docs = find_documents(ids, cu_seqlens=cu)
    return ids, next_token_targets(labels, docs.cu_seqlens), docs


# -- selection ------------------------------------------------------------------------------------------------


def test_auto_runs_the_eager_ops_on_cpu(monkeypatch):
    def liger_called():
        raise AssertionError("auto imported Liger for CPU tensors")

    monkeypatch.setattr(fused, "_liger", liger_called)
    cfg = tiny_config()
    assert cfg.fused_ops == "auto"
    auto, eager = LlamaForCausalLM(cfg), LlamaForCausalLM(tiny_config(fused_ops="none"))
    eager.load_state_dict(auto.state_dict())
    ids, targets, docs = packed_batch(48, cfg.vocab_size, "cpu")
    a, e = auto.loss(ids, targets, docs), eager.loss(ids, targets, docs)
    a.loss_sum.backward()
    e.loss_sum.backward()
    assert torch.equal(a.loss_sum, e.loss_sum) and torch.equal(a.num_targets, e.num_targets)
    for (name, p), q in zip(auto.named_parameters(), eager.parameters()):
        assert torch.equal(p.grad, q.grad), name


def test_liger_off_cuda_is_a_clear_error():
    model = LlamaForCausalLM(tiny_config(fused_ops="liger"))
    with pytest.raises(ValueError, match=r"fused_ops='liger'.*CUDA.*cpu"):
        model(torch.randint(0, 211, (1, 8)))


def test_unknown_fused_ops_names_the_value():
    with pytest.raises(CheckpointError, match="'ligre'"):
        tiny_config(fused_ops="ligre")
    with pytest.raises(ValueError, match="'ligre'"):
        fused.enabled("ligre", torch.zeros(1))


def test_fused_ops_is_not_written_to_config_json():
    assert "fused_ops" not in tiny_config(fused_ops="none").to_hf_dict()


# -- Liger's kernels in Triton's interpreter (CPU, fp32) -------------------------------------------------------


@pytest.fixture
def liger_on_cpu(monkeypatch):
    """The Liger path of every op, for CPU tensors (enabled() refuses them, rightly, outside this test)."""
    monkeypatch.setattr(fused, "enabled", lambda fused_ops, x: True)


@pytest.fixture
def float_scalars(monkeypatch):
    """Triton's interpreter (3.9) passes Python float arguments through as they are, where compiled kernels get
    float32 scalars; Liger's SwiGLU calls .to() on one. Convert them as the compiler does."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    if not hasattr(interpreter, "_implicit_cvt"):
        pytest.skip("this Triton's interpreter converts arguments elsewhere")
    convert = interpreter._implicit_cvt

    def with_floats(arg):
        if isinstance(arg, float):
            return tl.tensor(interpreter.TensorHandle(np.array([arg], dtype=np.float32), tl.float32), tl.float32)
        return convert(arg)

    monkeypatch.setattr(interpreter, "_implicit_cvt", with_floats)


@needs_liger
@in_interpreter
@pytest.mark.parametrize("batch_cos", [False, True])
def test_liger_rope_matches_eager(liger_on_cpu, batch_cos):
    cfg = tiny_config(head_dim=16, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    b, s = 2, 24
    positions = torch.randint(0, 200, (b, s)) if batch_cos else None
    cos, sin = RotaryEmbedding(cfg)(positions, s, torch.device("cpu"))
    q = torch.randn(b, s, 4, 16, requires_grad=True)
    k = torch.randn(b, s, 2, 16, requires_grad=True)
    rq, rk = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    # Liger rotates its inputs in place: give it copies that are leaves of their own.
    q2, k2 = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    fq, fk = fused.rope(q2 * 1, k2 * 1, cos, sin, "liger")
    torch.testing.assert_close(fq, rq, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fk, rk, atol=1e-5, rtol=1e-5)
    gq, gk = torch.randn_like(rq), torch.randn_like(rk)
    torch.autograd.backward((rq, rk), (gq, gk))
    torch.autograd.backward((fq, fk), (gq, gk))
    torch.testing.assert_close(q2.grad, q.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k2.grad, k.grad, atol=1e-5, rtol=1e-5)


@needs_liger
@in_interpreter
def test_liger_swiglu_matches_eager(liger_on_cpu, float_scalars):
    gate, up = torch.randn(2, 5, 48, requires_grad=True), torch.randn(2, 5, 48, requires_grad=True)
    ref = F.silu(gate) * up
    g2, u2 = gate.detach().clone().requires_grad_(), up.detach().clone().requires_grad_()
    out = fused.silu_mul(g2 * 1, u2 * 1, "liger")  # Liger overwrites its inputs with their gradients
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    grad = torch.randn_like(ref)
    ref.backward(grad)
    out.backward(grad)
    torch.testing.assert_close(g2.grad, gate.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(u2.grad, up.grad, atol=1e-6, rtol=1e-5)


@needs_liger
@in_interpreter
@pytest.mark.parametrize("scale", [1.0, 0.37])
def test_liger_linear_cross_entropy_matches_chunked(liger_on_cpu, scale):
    """Summed loss and target count with ignored targets and document ends; gradients also under a scaled
    loss (what dividing by a global token count does)."""
    vocab, h = 211, 64
    ids, targets, _ = packed_batch(40, vocab, "cpu")
    hidden = torch.randn(1, 40, h, requires_grad=True)
    weight = (0.1 * torch.randn(vocab, h)).requires_grad_()
    ref = chunked_cross_entropy(hidden, weight, targets, 16)
    h2, w2 = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    out = fused.linear_cross_entropy(h2, w2, targets, 16, "liger")
    assert out.num_targets.item() == ref.num_targets.item() == int((targets != IGNORE_INDEX).sum())
    assert out.loss_sum.dtype == torch.float32
    torch.testing.assert_close(out.loss_sum, ref.loss_sum, atol=1e-4, rtol=1e-5)
    (scale * ref.loss_sum).backward()
    (scale * out.loss_sum).backward()
    torch.testing.assert_close(h2.grad, hidden.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(w2.grad, weight.grad, atol=1e-5, rtol=1e-4)


# -- GPU: every op, then a whole model, in bf16 against a float32 eager reference ------------------------------


def _close_as_eager(fused_bf16, eager_bf16, ref_fp32, name, slack=2.0, floor=2e-3):
    """The fused bf16 result is as near the fp32 reference as the eager bf16 one (within slack x, or floor)."""
    e_fused, e_eager = rel_err(fused_bf16, ref_fp32), rel_err(eager_bf16, ref_fp32)
    assert e_fused <= max(slack * e_eager, floor), f"{name}: fused {e_fused:.2e} vs eager {e_eager:.2e}"


@pytest.mark.gpu
@needs_liger
def test_gpu_ops_match_eager_in_bf16():
    dev = "cuda"
    cfg = tiny_config(head_dim=64, hidden_size=256, num_attention_heads=8)
    cos, sin = RotaryEmbedding(cfg)(None, 300, torch.device(dev))
    x = torch.randn(2, 300, 256, device=dev)
    w = 1 + 0.1 * torch.randn(256, device=dev)
    q, k = torch.randn(2, 300, 8, 64, device=dev), torch.randn(2, 300, 2, 64, device=dev)
    gate, up = torch.randn(2, 300, 704, device=dev), torch.randn(2, 300, 704, device=dev)
    ops = {
        "rms_norm": (lambda t, ops: (fused.rms_norm(t[0], t[1], 1e-5, ops),), (x, w)),
        "rope": (lambda t, ops: fused.rope(t[0] * 1, t[1] * 1, cos, sin, ops), (q, k)),
        "silu_mul": (lambda t, ops: (fused.silu_mul(t[0] * 1, t[1] * 1, ops),), (gate, up)),
    }
    for name, (fn, inputs) in ops.items():
        results = []
        for ops_, dtype in (("none", torch.float32), ("none", torch.bfloat16), ("liger", torch.bfloat16)):
            leaves = [t.detach().to(dtype).clone().requires_grad_() for t in inputs]
            outs = fn(leaves, ops_)
            seeded = torch.Generator(dev).manual_seed(1)
            grads = [torch.randn(o.shape, device=dev, generator=seeded).to(o.dtype) for o in outs]
            torch.autograd.backward(outs, grads)
            results.append([o.float() for o in outs] + [t.grad.float() for t in leaves])
        ref, eager, liger = results
        for i, (f, e, r) in enumerate(zip(liger, eager, ref)):
            _close_as_eager(f, e, r, f"{name}[{i}]")


@pytest.mark.gpu
@needs_liger
@pytest.mark.parametrize("tied", [True, False])
def test_gpu_model_fused_matches_eager_in_bf16(tied):
    """Logits, summed loss, target count (packed documents, ignored labels) and every gradient, activation
    checkpointing on (the in-place kernels run again in the recompute)."""
    dev = "cuda"
    cfg = dict(vocab_size=1000, hidden_size=256, intermediate_size=704, num_hidden_layers=2, num_attention_heads=8,
               num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=tied,
               activation_checkpointing=True)
    torch.manual_seed(0)
    ref = LlamaForCausalLM(LlamaConfig(**cfg, fused_ops="none")).to(dev).train()
    ids, targets, docs = packed_batch(700, 1000, dev)
    runs = []
    for ops_, dtype in (("none", torch.float32), ("none", torch.bfloat16), ("liger", torch.bfloat16)):
        # Attention through SDPA in all three (one call per document), so only the fused ops differ.
        model = LlamaForCausalLM(LlamaConfig(**cfg, fused_ops=ops_), None, None, "sdpa", init_weights=False).to(dev)
        model.load_state_dict(ref.state_dict())
        model.to(dtype).train()
        out = model.loss(ids, targets, docs)
        (out.loss_sum / 1000).backward()
        with torch.no_grad():
            logits = model(ids, cu_seqlens=docs.cu_seqlens.cpu()).float()
        grads = {n: p.grad.float() for n, p in model.named_parameters()}
        runs.append((out, logits, grads))
    (r_out, r_logits, r_grads), (e_out, e_logits, e_grads), (f_out, f_logits, f_grads) = runs
    assert f_out.num_targets.item() == e_out.num_targets.item() == int((targets != IGNORE_INDEX).sum())
    assert f_out.loss_sum.dtype == torch.float32
    _close_as_eager(f_out.loss_sum[None], e_out.loss_sum[None], r_out.loss_sum[None], "loss_sum", floor=1e-3)
    _close_as_eager(f_logits, e_logits, r_logits, "logits")
    assert f_grads.keys() == r_grads.keys()
    for name in r_grads:
        _close_as_eager(f_grads[name], e_grads[name], r_grads[name], name)
