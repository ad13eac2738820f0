"""Portable (torch) and FlexAttention backends against the float64 dense oracle."""

import pytest
import torch

import powerattn
from powerattn.reference import dense_reference

PATTERNS = {
    "power": dict(block_size=16, window=2, sink=1),
    "sliding_window": dict(block_size=16, window=3, sink=1),
    "stride_slash": dict(block_size=16, window=2, sink=1, stride=3),
    "dilated": dict(block_size=16, window=6),
    "longnet": dict(block_size=16, segment=2, levels=3),
    "full": dict(block_size=16),
}


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def inputs(b, s, h, hkv, d, dtype, device="cpu"):
    return [torch.randn(b, s, n, d, dtype=dtype, device=device) for n in (h, hkv, hkv)]


def check(backend, name, b, s, h, hkv, d, dtype, cu=None, grads=True, tol=1e-10, device="cpu", params=None):
    pat = powerattn.make_pattern(name, **(params or PATTERNS[name]))
    q, k, v = (t.requires_grad_(grads) for t in inputs(b, s, h, hkv, d, dtype, device))
    out = powerattn.sparse_attention(q, k, v, pat, cu_seqlens=cu, backend=backend)
    ref_in = [t.detach().double().requires_grad_(grads) for t in (q, k, v)]
    ref = dense_reference(*ref_in, pat, cu_seqlens=cu)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert rel_err(out, ref) < tol, f"forward {rel_err(out, ref)}"
    if grads:
        g = torch.randn_like(ref)
        out.backward(g.to(out.dtype))
        ref.backward(g)
        for nm, t, r in zip("qkv", (q, k, v), ref_in):
            assert rel_err(t.grad, r.grad) < tol, f"d{nm} {rel_err(t.grad, r.grad)}"


@pytest.mark.parametrize("name", sorted(PATTERNS))
@pytest.mark.parametrize("s", [16, 100, 161])
def test_torch_backend_gqa(name, s):
    check("torch", name, 2, s, 8, 2, 8, torch.float64)


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_torch_backend_varlen_three_documents(name):
    cu = torch.tensor([0, 37, 38, 131], dtype=torch.int32)
    check("torch", name, 1, 131, 4, 2, 8, torch.float64, cu=cu)


def test_torch_backend_float32():
    check("torch", "power", 1, 200, 4, 1, 16, torch.float32, tol=1e-5)


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_flex_backend_forward_cpu(name):
    # FlexAttention has no CPU backward in torch; its gradients are tested on the GPU below.
    check("flex", name, 2, 100, 8, 2, 16, torch.float32, grads=False, tol=1e-5)
    cu = torch.tensor([0, 37, 38, 100], dtype=torch.int32)
    check("flex", name, 1, 100, 4, 2, 16, torch.float32, cu=cu, grads=False, tol=1e-5)


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_flex_block_mask_equals_one_built_from_the_dense_rule(name):
    # Both directions matter: FlexAttention's backward walks the transposed (q_*) fields.
    from torch.nn.attention.flex_attention import create_block_mask

    from powerattn.ops import flex_block_mask

    pat = powerattn.make_pattern(name, **{**PATTERNS[name], "block_size": 128})
    ours = flex_block_mask(pat, 2048, "cpu")
    ref = create_block_mask(lambda b, h, q, k: pat.token_rule(q, k), None, None, 2048, 2048, device="cpu",
                            BLOCK_SIZE=128)
    for field in ("kv_num_blocks", "full_kv_num_blocks", "q_num_blocks", "full_q_num_blocks"):
        assert torch.equal(getattr(ours, field), getattr(ref, field)), field
    for count, index in (("kv_num_blocks", "kv_indices"), ("full_kv_num_blocks", "full_kv_indices"),
                         ("q_num_blocks", "q_indices"), ("full_q_num_blocks", "full_q_indices")):
        n, a, b = getattr(ref, count)[0, 0], getattr(ours, index)[0, 0], getattr(ref, index)[0, 0]
        for row in range(n.numel()):
            assert sorted(a[row, : n[row]].tolist()) == sorted(b[row, : n[row]].tolist()), (index, row)


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_flex_backend_gpu_with_gradients(name):
    # FlexAttention's GPU kernels need blocks that its own tiles (up to 128) divide.
    params = {**PATTERNS[name], "block_size": 128}
    check("flex", name, 1, 2000, 8, 2, 64, torch.float32, tol=2e-3, device="cuda", params=params)
    cu = torch.tensor([0, 600, 601, 2000], dtype=torch.int32, device="cuda")
    check("flex", name, 1, 2000, 8, 2, 64, torch.float32, cu=cu, tol=2e-3, device="cuda", params=params)


@pytest.mark.parametrize("s", [16, 100, 161])
def test_sdpa_backend_full_gqa(s):
    check("sdpa", "full", 2, s, 8, 2, 8, torch.float64)


def test_sdpa_backend_varlen_documents():
    # An empty and a one-token document among them: SDPA runs once per non-empty document.
    cu = torch.tensor([0, 37, 37, 38, 131], dtype=torch.int32)
    check("sdpa", "full", 1, 131, 4, 2, 8, torch.float64, cu=cu)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the Triton interpreter runs on CPU machines")
def test_sdpa_and_triton_agree_on_full():
    """The two dense paths a model chooses between, same inputs: output and every gradient (fp32)."""
    pytest.importorskip("triton")
    pat = powerattn.make_pattern("full", block_size=32)
    q, k, v = inputs(1, 100, 4, 2, 16, torch.float32)
    outs, grads = [], []
    g = torch.randn_like(q)
    for backend in ("sdpa", "triton"):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out = powerattn.sparse_attention(*leaves, pat, backend=backend)
        out.backward(g)
        outs.append(out)
        grads.append([t.grad for t in leaves])
    assert rel_err(outs[0], outs[1]) < 1e-5
    for nm, a, b in zip("qkv", *grads):
        assert rel_err(a, b) < 1e-5, nm


def test_sdpa_backend_refuses_sparse_patterns_and_decodes_as_auto():
    pat = powerattn.make_pattern("power", block_size=16)
    q, k, v = (t.detach() for t in inputs(1, 40, 4, 2, 8, torch.float64))
    with pytest.raises(ValueError, match=r"backend 'sdpa' runs dense causal attention, not pattern power"):
        powerattn.sparse_attention(q, k, v, pat, backend="sdpa")
    full = powerattn.make_pattern("full", block_size=16)
    lengths = torch.tensor([40], dtype=torch.int32)
    out = powerattn.decode_attention(q[:, -3:], k, v, full, lengths, backend="sdpa")
    torch.testing.assert_close(out, dense_reference(q, k, v, full)[:, -3:])


@pytest.mark.gpu
def test_gpu_auto_sends_unpacked_full_to_sdpa_and_it_matches_triton(monkeypatch):
    from powerattn import ops

    full = powerattn.make_pattern("full", block_size=256)
    q, k, v = (t.to(torch.bfloat16).requires_grad_() for t in inputs(1, 4000, 32, 8, 64, torch.float32, "cuda"))
    calls = []
    dense = ops.dense_attention
    monkeypatch.setattr(ops, "dense_attention", lambda *a: calls.append(a[3]) or dense(*a))
    powerattn.sparse_attention(q, k, v, full)
    cu = torch.tensor([0, 1000, 4000], dtype=torch.int32, device="cuda")
    powerattn.sparse_attention(q, k, v, full, cu_seqlens=cu)  # packed: auto keeps our kernel
    assert calls == [None]
    g = torch.randn_like(q)
    results = []
    for backend, c in (("sdpa", None), ("triton", None), ("sdpa", cu), ("triton", cu)):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out = powerattn.sparse_attention(*leaves, full, cu_seqlens=c, backend=backend)
        out.backward(g)
        results.append([out] + [t.grad for t in leaves])
    for a, b in (results[0:2], results[2:4]):
        for name, x, y in zip(("out", "dq", "dk", "dv"), a, b):
            assert rel_err(x, y) < 2e-2, name


def test_default_scale_and_explicit_scale():
    pat = powerattn.make_pattern("power", block_size=16)
    q, k, v = (t.detach() for t in inputs(1, 40, 2, 2, 8, torch.float64))
    a = powerattn.sparse_attention(q * 2, k, v, pat, scale=8**-0.5, backend="torch")
    b = powerattn.sparse_attention(q, k, v, pat, scale=2 * 8**-0.5, backend="torch")
    torch.testing.assert_close(a, b)


def test_auto_picks_torch_on_cpu(monkeypatch):
    from powerattn import ops

    called = {}
    monkeypatch.setattr(ops, "block_gather_attention", lambda *a, **k: called.setdefault("torch", a[0]))
    q, k, v = (t.detach() for t in inputs(1, 8, 2, 2, 8, torch.float32))
    powerattn.sparse_attention(q, k, v, powerattn.make_pattern("full", block_size=16))
    assert "torch" in called


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda q, k, v: (q[0], k, v), r"q must be \[batch, seqlen, heads, head_dim\], got shape \(10, 4, 8\)"),
        (lambda q, k, v: (q, k, v[:, :5]), r"k \(1, 10, 2, 8\) and v \(1, 5, 2, 8\) must have the same shape"),
        (lambda q, k, v: (q[:, :, :3], k, v), r"q heads \(3\) must be a multiple of k/v heads \(2\)"),
        (lambda q, k, v: (q, k.half(), v.half()), "dtypes differ"),
        (lambda q, k, v: (q[:, :9], k, v), r"q \(1, 9, 4, 8\) and k \(1, 10, 2, 8\) must agree"),
    ],
)
def test_bad_inputs_name_the_tensors(mutate, match):
    q, k, v = (t.detach() for t in inputs(1, 10, 4, 2, 8, torch.float32))
    with pytest.raises(ValueError, match=match):
        powerattn.sparse_attention(*mutate(q, k, v), powerattn.make_pattern("power", block_size=16))


def test_bad_cu_seqlens_and_backend():
    pat = powerattn.make_pattern("power", block_size=16)
    q, k, v = (t.detach() for t in inputs(1, 10, 2, 2, 8, torch.float32))
    with pytest.raises(ValueError, match="cu_seqlens must be a 1-D int32 tensor"):
        powerattn.sparse_attention(q, k, v, pat, cu_seqlens=torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="cu_seqlens must ascend from 0 to seqlen=10"):
        powerattn.sparse_attention(q, k, v, pat, cu_seqlens=torch.tensor([0, 4, 9], dtype=torch.int32))
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        powerattn.sparse_attention(q, k, v, pat, backend="cuda")
    with pytest.raises(TypeError, match="pattern must be a powerattn Pattern, got str"):
        powerattn.sparse_attention(q, k, v, "power")


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_decode_reference_matches_full_forward(name):
    pat = powerattn.make_pattern(name, **PATTERNS[name])
    q, k, v = (t.detach() for t in inputs(2, 90, 4, 2, 8, torch.float64))
    ref = dense_reference(q, k, v, pat)
    lengths = torch.tensor([90, 61], dtype=torch.int32)
    for c in (1, 5, 40):
        out = powerattn.decode_attention(
            torch.stack([q[0, 90 - c:90], q[1, 61 - c:61]]), k, v, pat, lengths, backend="torch"
        )
        torch.testing.assert_close(out[0], ref[0, 90 - c:90])
        torch.testing.assert_close(out[1], dense_reference(q[1:, :61], k[1:, :61], v[1:, :61], pat)[0, 61 - c:])
