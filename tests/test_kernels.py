"""Triton kernels against the float64 dense oracle: forward, dq/dk/dv, varlen, decode.

On CPU they run in Triton's interpreter (TRITON_INTERPRET=1, set here before triton is imported)
at small shapes in fp32/fp16; the `gpu` tests repeat them in bf16 at realistic sizes.
"""

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import powerattn  # noqa: E402
from powerattn.reference import decode_reference, dense_reference  # noqa: E402

pytest.importorskip("triton")

SMALL = {  # block 32 so 16-wide interpreter tiles split each pattern block
    "power": dict(block_size=32, window=2, sink=1),
    "sliding_window": dict(block_size=32, window=3, sink=1),
    "stride_slash": dict(block_size=32, window=2, sink=1, stride=3),
    "dilated": dict(block_size=32, window=6),
    "longnet": dict(block_size=32, segment=2, levels=3),
    "full": dict(block_size=32),
}
PAPER = {  # the paper's settings at 256-token blocks, for the GPU
    "power": dict(window=5, sink=1),
    "sliding_window": dict(window=9, sink=1),
    "stride_slash": dict(window=6, sink=1, stride=4),
    "dilated": dict(window=20),
    "longnet": dict(segment=2, levels=3),
    "full": dict(),
}


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture
def poisoned(monkeypatch):
    """Every buffer the kernels allocate starts as NaN (or a huge int), so an unwritten element shows."""
    def poison(fn):
        def wrapped(*args, **kwargs):
            t = fn(*args, **kwargs)
            return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-(2**30))
        return wrapped

    monkeypatch.setattr(torch, "empty", poison(torch.empty))
    monkeypatch.setattr(torch, "empty_like", poison(torch.empty_like))


def run_and_compare(pat, b, s, h, hkv, d, dtype, device, cu=None, tol=1e-5, max_seqlen=None):
    q = torch.randn(b, s, h, d, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(b, s, hkv, d, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(b, s, hkv, d, device=device, dtype=dtype, requires_grad=True)
    out = powerattn.sparse_attention(q, k, v, pat, cu_seqlens=cu, backend="triton", max_seqlen=max_seqlen)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    if device == "cuda":
        ref_in = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = dense_reference(*ref_in, pat, cu_seqlens=cu)
    ref.backward(grad.to(ref.dtype))
    errors = {"out": rel_err(out, ref)}
    errors.update({f"d{n}": rel_err(t.grad, r.grad) for n, t, r in zip("qkv", (q, k, v), ref_in)})
    for name, t in [("out", out), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad)]:
        assert torch.isfinite(t).all(), f"{name} has unwritten or non-finite elements"
    assert all(e < tol for e in errors.values()), errors
    return out, (q.grad, k.grad, v.grad)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_every_pattern_gqa_4to1_fp32(name, poisoned):
    # 90 tokens: not a multiple of the 16-token tile nor of the 32-token block.
    run_and_compare(powerattn.make_pattern(name, **SMALL[name]), 2, 90, 8, 2, 32, torch.float32, "cpu")


@pytest.mark.parametrize("d", [64, 128])
def test_head_dims_mha_fp16(d, poisoned):
    run_and_compare(powerattn.make_pattern("power", **SMALL["power"]), 1, 75, 2, 2, d, torch.float16, "cpu",
                    tol=2e-3)


@pytest.mark.parametrize("name", ["power", "longnet", "full"])
def test_varlen_three_odd_documents(name, poisoned):
    cu = torch.tensor([0, 37, 38, 117], dtype=torch.int32)
    run_and_compare(powerattn.make_pattern(name, **SMALL[name]), 1, 117, 4, 1, 32, torch.float32, "cpu", cu=cu)


def test_varlen_with_given_max_seqlen_and_long_table_bucket(poisoned):
    # max_seqlen larger than any document: tables cover more tiles than each document has.
    cu = torch.tensor([0, 20, 61, 90], dtype=torch.int32)
    run_and_compare(powerattn.make_pattern("power", **SMALL["power"]), 1, 90, 2, 1, 16, torch.float32, "cpu",
                    cu=cu, max_seqlen=200)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_decode_against_reference(name, poisoned):
    pat = powerattn.make_pattern(name, **SMALL[name])
    kc = torch.randn(2, 200, 2, 32)
    vc = torch.randn(2, 200, 2, 32)
    lengths = torch.tensor([200, 77], dtype=torch.int32)
    for c in (1, 6):
        q = torch.randn(2, c, 8, 32)
        out = powerattn.decode_attention(q, kc, vc, pat, lengths, backend="triton")
        ref = decode_reference(*(t.double() for t in (q, kc, vc)), pat, lengths)
        assert torch.isfinite(out).all()
        assert rel_err(out, ref) < 1e-5


def test_decode_merges_in_one_launch_and_leaves_its_counters_at_zero(poisoned):
    """Split rows are merged by their last slice (an atomic count): every call, the workspace's
    counters must be back at zero, or the next call's merge never runs."""
    from powerattn.kernels import decode

    pat = powerattn.make_pattern("power", **SMALL["power"])
    kc, vc = torch.randn(1, 300, 2, 32), torch.randn(1, 300, 2, 32)
    launches = []
    real = decode._decode_kernel

    class Count:  # counts launches and records each one's split count
        def __getitem__(self, grid):
            launches.append(grid)
            return real[grid]

    decode._decode_kernel = Count()
    try:
        for length in (300, 290, 171):
            lengths = torch.tensor([length], dtype=torch.int32)
            q = torch.randn(1, 1, 8, 32)
            out = powerattn.decode_attention(q, kc, vc, pat, lengths, backend="triton")
            ref = decode_reference(*(t.double() for t in (q, kc, vc)), pat, lengths)
            assert rel_err(out, ref) < 1e-5
    finally:
        decode._decode_kernel = real
    assert len(launches) == 3 and all(grid[2] > 1 for grid in launches)  # one launch each, split
    # Same workspace size (query heads x splits), twice the counters (KV heads): a workspace of its own.
    for kv_heads, heads in ((2, 8), (4, 16)):
        kc, vc = torch.randn(1, 300, kv_heads, 32), torch.randn(1, 300, kv_heads, 32)
        q, lengths = torch.randn(1, 1, heads, 32), torch.tensor([300], dtype=torch.int32)
        out = powerattn.decode_attention(q, kc, vc, pat, lengths, backend="triton")
        assert rel_err(out, decode_reference(*(t.double() for t in (q, kc, vc)), pat, lengths)) < 1e-5
    assert all(not counters.any() for *_, counters in decode._WORKSPACES.values())


def test_compiles_without_graph_breaks():
    pat = powerattn.make_pattern("power", **SMALL["power"])

    def f(q, k, v):
        return powerattn.sparse_attention(q, k, v, pat, backend="triton").square().sum()

    q, k, v = (torch.randn(1, 40, 2, 16, requires_grad=True) for _ in range(3))
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    expected = torch.autograd.grad(f(q, k, v), (q, k, v))
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e)


def test_unsupported_inputs_raise():
    pat = powerattn.make_pattern("power", **SMALL["power"])
    q = torch.randn(1, 40, 2, 48)
    with pytest.raises(ValueError, match="head_dim 48"):
        powerattn.sparse_attention(q, q, q, pat, backend="triton")
    odd = powerattn.make_pattern("power", block_size=24)
    q = torch.randn(1, 40, 2, 16)
    with pytest.raises(ValueError, match="block_size 24"):
        powerattn.sparse_attention(q, q, q, odd, backend="triton")


# ---- GPU: bf16 at realistic sizes -----------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(PAPER))
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_bf16_every_pattern(name, d):
    pat = powerattn.make_pattern(name, block_size=256, **PAPER[name])
    run_and_compare(pat, 1, 4096 + 77, 16, 4, d, torch.bfloat16, "cuda", tol=1.5e-2)


def check_bf16_varlen_deterministic(cu: list[int], heads: int, kv_heads: int):
    """Correct against the reference, and bit-identical gradients from two runs on the same inputs."""
    pat = powerattn.make_pattern("power", block_size=256)
    cu = torch.tensor(cu, dtype=torch.int32, device="cuda")
    grads = []
    for _ in range(2):
        torch.manual_seed(1)
        grads.append(run_and_compare(pat, 1, int(cu[-1]), heads, kv_heads, 128, torch.bfloat16, "cuda", cu=cu,
                                     tol=1.5e-2)[1])
    for g, a in zip(*grads):
        assert torch.equal(g, a), "backward must be deterministic"


@pytest.mark.gpu
def test_gpu_bf16_varlen_mha_and_determinism():
    check_bf16_varlen_deterministic([0, 1000, 1001, 5000], 8, 8)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["power", "full"])
def test_gpu_decode_bf16(name):
    pat = powerattn.make_pattern(name, block_size=256, **PAPER[name])
    kc = torch.randn(2, 20000, 8, 128, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    lengths = torch.tensor([20000, 9001], dtype=torch.int32, device="cuda")
    for c in (1, 16):
        q = torch.randn(2, c, 32, 128, device="cuda", dtype=torch.bfloat16)
        out = powerattn.decode_attention(q, kc, vc, pat, lengths, backend="triton")
        ref = decode_reference(q.float(), kc.float(), vc.float(), pat, lengths)
        assert rel_err(out, ref) < 1e-2


@pytest.mark.gpu
def test_gpu_decode_direct_launch_matches_triton_launcher():
    """After its first call a plan launches its compiled kernel directly; a misaligned input must go
    back through Triton's launcher (a kernel compiled for 16-byte-aligned pointers would misread it)."""
    from powerattn.kernels import decode

    pat = powerattn.make_pattern("power", block_size=256, window=5, sink=1)
    kc = torch.randn(1, 20000, 8, 128, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    lengths = torch.tensor([19000], dtype=torch.int32, device="cuda")
    q = torch.randn(1, 1, 32, 128, device="cuda", dtype=torch.bfloat16)
    first = powerattn.decode_attention(q, kc, vc, pat, lengths, backend="triton")
    plan = decode._plan(pat, 1, 1, 32, 8, 128, 20000, q.device)
    assert plan.compiled, "the first call did not keep its compiled kernel"
    for _ in range(3):
        assert torch.equal(powerattn.decode_attention(q, kc, vc, pat, lengths, backend="triton"), first)
    shifted = torch.empty(q.numel() + 1, device="cuda", dtype=q.dtype)[1:].view_as(q).copy_(q)  # 2-byte offset
    assert shifted.data_ptr() % 16 and shifted.is_contiguous()
    assert torch.equal(powerattn.decode_attention(shifted, kc, vc, pat, lengths, backend="triton"), first)
    ref = decode_reference(q.float(), kc.float(), vc.float(), pat, lengths)
    assert rel_err(first, ref) < 1e-2



def test_heavy_first_schedule_cuts_the_sink_columns_and_covers_every_entry_once():
    from powerattn.kernels.tables import heavy_first_schedule

    t = powerattn.make_pattern("power", block_size=32, window=2).tables(4096, 16, 16)
    sched = heavy_first_schedule(t, 16, 16)
    lens = t.q_ptr[1:] - t.q_ptr[:-1]
    cap = math.ceil(4 * lens.float().mean().item())
    items = sched.items.tolist()
    assert sched.split_tiles.tolist() == [0, 1]  # the sink block's two tiles, and only they
    assert {it[0] for it in items[: sched.n_pieces]} == {0, 1}
    assert all(0 < last - first <= cap for _, first, last, _ in items[: sched.n_pieces])
    whole = [it[0] for it in items[sched.n_pieces :]]
    assert whole == sorted(whole) and set(whole) == set(range(2, lens.numel()))
    for tile in range(lens.numel()):  # the pieces tile the full entries in order; one of them walks the diagonal
        mine = [it for it in items if it[0] == tile]
        assert mine[0][1] == t.q_ptr[tile] and mine[-1][2] == t.q_ptr[tile] + t.q_full[tile]
        assert all(a[2] == b[1] for a, b in zip(mine, mine[1:]))
        assert [it[3] for it in mine] == [1] + [0] * (len(mine) - 1)
    for i, tile in enumerate(sched.split_tiles.tolist()):
        assert all(items[j][0] == tile for j in range(sched.split_ptr[i], sched.split_ptr[i + 1]))
    for i in range(len(sched.split_ptr) - 1):  # the pieces reach ever farther queries
        needs = sched.need[sched.split_ptr[i] : sched.split_ptr[i + 1]].tolist()
        assert needs == sorted(needs) and needs[0] == 16 * sched.split_tiles[i] + 1


@pytest.fixture
def split_every_long_column(monkeypatch):
    """Cut every key column longer than the mean, so small tests run the piece + reduce path for real."""
    from powerattn.kernels import tables

    summed = []
    slots = tables.DkdvSchedule.slots

    def spy(self, seqlens, total_tokens):
        out = slots(self, seqlens, total_tokens)
        summed.append(bool(out[1].any()))
        return out

    monkeypatch.setattr(tables, "HEAVY_COLUMN_FACTOR", 1.0)
    monkeypatch.setattr(tables.DkdvSchedule, "slots", spy)
    yield
    assert any(summed), "no column was summed from pieces: the test never ran the reduce"


@pytest.mark.parametrize("name", ["power", "stride_slash", "longnet"])
def test_split_columns_gqa_fp32(name, poisoned, split_every_long_column):
    run_and_compare(powerattn.make_pattern(name, **SMALL[name]), 2, 90, 8, 2, 32, torch.float32, "cpu")


def test_split_columns_varlen_and_long_table_bucket(poisoned, split_every_long_column):
    # Pieces of a column that lies past a short document's end, and pieces past its last query tile.
    cu = torch.tensor([0, 20, 21, 150], dtype=torch.int32)
    run_and_compare(powerattn.make_pattern("power", **SMALL["power"]), 1, 150, 4, 1, 16, torch.float32, "cpu",
                    cu=cu, max_seqlen=300)


@pytest.mark.parametrize("tiles", [(16, 32), (16, 64), (32, 16)])
def test_split_columns_other_tiles_varlen(tiles, poisoned, split_every_long_column, monkeypatch):
    # BLOCK_N > ROWS runs several reduce programs per tile; BLOCK_M != BLOCK_N puts pieces wholly in
    # a column's diagonal half. Documents of many lengths, most too short to need a cut column.
    from powerattn.kernels import custom_ops

    def pick(kind, q, k, pattern, max_seqlen, run):
        return dict(zip(("BLOCK_M", "BLOCK_N"), tiles if kind == "dkdv" else (16, 16)))

    monkeypatch.setattr(custom_ops, "pick_config", pick)
    cu = torch.tensor([0, 5, 17, 33, 34, 90, 200, 230, 560], dtype=torch.int32)
    run_and_compare(powerattn.make_pattern("power", block_size=64, window=2), 1, 560, 4, 2, 16, torch.float32,
                    "cpu", cu=cu, max_seqlen=600)


def test_workspace_slots_only_where_a_column_is_cut():
    from powerattn.kernels.tables import heavy_first_schedule

    t = powerattn.make_pattern("power", block_size=32, window=2).tables(4096, 16, 16)
    sched = heavy_first_schedule(t, 16, 16)
    lens = torch.tensor([4096, 7, 300, 1, 2000, 4096, 33, 700], dtype=torch.int32)
    slots, cut, capacity = sched.slots(lens, int(lens.sum()))
    items = sched.items.tolist()

    def works(item, n):  # brute force from the tables: a tile this piece walks lies in the sequence
        tile, first, last, diag = item
        walked = t.q_idx[first:last].tolist()
        if diag:
            walked += t.q_idx[t.q_ptr[tile] + t.q_full[tile] : t.q_ptr[tile + 1]].tolist()
        return tile * 16 < n and any(q * 16 < n for q in walked)

    for p in range(sched.n_pieces):
        column = [it for it in items[: sched.n_pieces] if it[0] == items[p][0]]
        for d, n in enumerate(lens.tolist()):
            n_working = sum(works(it, n) for it in column)
            want = -1 if not works(items[p], n) else (-2 if n_working == 1 else None)
            got = int(slots[p, d])
            assert (got >= 0) if want is None else got == want, (p, d, got, want)
    used = slots[slots >= 0]
    assert sorted(used.tolist()) == list(range(used.numel())) and used.numel() <= capacity
    # Documents shorter than the first piece's queries need no slot at all.
    first_piece_end = int(sched.need[1]) - 1
    short = [d for d, n in enumerate(lens.tolist()) if n <= first_piece_end]
    assert short and int((slots[:, short] >= 0).sum()) == 0
    with pytest.raises(ValueError, match="factor must be >= 1"):
        heavy_first_schedule(t, 16, 16, factor=0.5)


@pytest.mark.gpu
def test_gpu_bf16_split_columns_deterministic(split_every_long_column):
    check_bf16_varlen_deterministic([0, 3000, 3001, 9000], 16, 4)
