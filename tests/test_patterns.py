"""Patterns against brute-force token masks written straight from DESIGN.md, and their index tables."""

import math

import pytest
import torch

import powerattn
from powerattn.patterns import Pattern


def brute_force(name: str, p: Pattern, n: int) -> torch.Tensor:
    bs = p.block_size
    m = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(i + 1):
            qb, kb = i // bs, j // bs
            d = qb - kb
            if name == "power":
                ok = d < p.window or (d & (d - 1)) == 0 or kb < p.sink
            elif name == "sliding_window":
                ok = d < p.window or kb < p.sink
            elif name == "stride_slash":
                ok = d < p.window or d % p.stride == 0 or kb < p.sink
            elif name == "dilated":
                ok = d % 2 == 0 and d < p.window
            elif name == "longnet":
                ok = any(
                    qb // (p.segment * 2**i) == kb // (p.segment * 2**i) and qb % 2**i == 0 and kb % 2**i == 0
                    for i in range(p.levels)
                )
            else:
                ok = True
            m[i, j] = ok
    return m


SMALL = {
    "power": dict(block_size=4, window=2, sink=1),
    "sliding_window": dict(block_size=4, window=3, sink=2),
    "stride_slash": dict(block_size=4, window=2, sink=1, stride=3),
    "dilated": dict(block_size=4, window=6),
    "longnet": dict(block_size=4, segment=2, levels=3),
    "full": dict(block_size=4),
}


def test_registry_lists_all_six():
    assert set(powerattn.pattern_names()) >= set(SMALL)


@pytest.mark.parametrize("name", sorted(SMALL))
@pytest.mark.parametrize("n", [1, 37, 64])
def test_token_mask_matches_brute_force(name, n):
    p = powerattn.make_pattern(name, **SMALL[name])
    assert torch.equal(p.token_mask(n), brute_force(name, p, n))


@pytest.mark.parametrize("name", sorted(SMALL))
def test_block_layout_and_density_agree_with_token_mask(name):
    p = powerattn.make_pattern(name, **SMALL[name])
    n = 57  # partial last block
    mask = p.token_mask(n)
    nb = math.ceil(n / p.block_size)
    pad = nb * p.block_size - n
    padded = torch.nn.functional.pad(mask, (0, pad, 0, pad))
    any_in_block = padded.view(nb, p.block_size, nb, p.block_size).any(3).any(1)
    assert torch.equal(p.block_layout(nb), any_in_block)
    assert p.density(n) == pytest.approx(mask.sum().item() / (n * (n + 1) / 2), abs=1e-12)
    assert p.attended_pairs(n) == mask.sum().item()


@pytest.mark.parametrize("name", sorted(SMALL))
@pytest.mark.parametrize("tiles", [(4, 4), (4, 2), (2, 2), (2, 1)])
def test_tables_cover_exactly_the_token_mask(name, tiles):
    p = powerattn.make_pattern(name, block_size=4, **{k: v for k, v in SMALL[name].items() if k != "block_size"})
    tm, tn = tiles
    n = 45
    t = p.tables(n, tm, tn)
    mask = p.token_mask(n)
    n_qt, n_kt = math.ceil(n / tm), math.ceil(n / tn)
    covered = torch.zeros(n_qt, n_kt, dtype=torch.int64)
    for r in range(n_qt):
        lo, hi, nf = t.kv_ptr[r].item(), t.kv_ptr[r + 1].item(), t.kv_full[r].item()
        row = t.kv_idx[lo:hi]
        full, part = row[:nf], row[nf:]
        assert torch.all(full[1:] > full[:-1]) and torch.all(part[1:] > part[:-1])
        for c, is_full in [(c, True) for c in full.tolist()] + [(c, False) for c in part.tolist()]:
            covered[r, c] += 1
            block = mask[r * tm:(r + 1) * tm, c * tn:(c + 1) * tn]
            q = torch.arange(r * tm, r * tm + tm)[:, None]
            k = torch.arange(c * tn, c * tn + tn)[None, :]
            causal = (k <= q)[: block.shape[0], : block.shape[1]]
            assert torch.equal(block, causal), "a listed tile must be the causal mask and nothing else"
            # Full tiles need no mask at all: every key in range and below every query.
            assert is_full == bool(causal.all() and block.shape[1] == tn)
    # Every tile holding an attended pair is listed exactly once; unlisted tiles are empty.
    pad_q, pad_k = n_qt * tm - n, n_kt * tn - n
    tiles_any = torch.nn.functional.pad(mask, (0, pad_k, 0, pad_q)).view(n_qt, tm, n_kt, tn).any(3).any(1)
    assert torch.equal(covered, tiles_any.long())
    # The transposed table is the same set of tiles.
    seen = torch.zeros_like(covered)
    for c in range(n_kt):
        lo, hi, nf = t.q_ptr[c].item(), t.q_ptr[c + 1].item(), t.q_full[c].item()
        for j, r in enumerate(t.q_idx[lo:hi].tolist()):
            seen[r, c] += 1
            assert (j < nf) == (t.kv_idx[t.kv_ptr[r]:t.kv_ptr[r] + t.kv_full[r]] == c).any().item()
    assert torch.equal(seen, covered)
    assert all(x.dtype == torch.int32 for x in t)


def test_tables_are_cached_and_prefix_stable():
    p = powerattn.make_pattern("power", block_size=8)
    assert p.tables(100, 4, 2) is p.tables(100, 4, 2)
    short, long = p.tables(64, 4, 4), p.tables(200, 4, 4)
    rows = short.kv_ptr.numel() - 1
    assert torch.equal(short.kv_idx, long.kv_idx[: short.kv_idx.numel()])
    assert torch.equal(short.kv_ptr, long.kv_ptr[: rows + 1])


def test_paper_configurations_have_about_ten_blocks_per_row():
    # At 32K (128 blocks of 256), every paper configuration reads about 10 blocks per late query block.
    for name in ["power", "sliding_window", "stride_slash", "dilated"]:
        row = powerattn.make_pattern(name).block_layout(128)[-1]
        assert 9 <= int(row.sum()) <= 11, name


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: powerattn.make_pattern("powr"), "unknown pattern 'powr'; known patterns: dilated, full"),
        (lambda: powerattn.make_pattern("power", windw=3), r"unknown parameter\(s\) \['windw'\]"),
        (lambda: powerattn.make_pattern("power", block_size=0), "block_size must be >= 1, got 0"),
        (lambda: powerattn.make_pattern("sliding_window", window=0), "window must be >= 1, got 0"),
        (lambda: powerattn.make_pattern("power", sink=-1), "sink must be >= 0, got -1"),
        (lambda: powerattn.make_pattern("power").token_mask(0), "seq_len must be >= 1, got 0"),
        (lambda: powerattn.make_pattern("power", block_size=8).tables(64, 3, 8), "tile_m=3 must divide block_size=8"),
    ],
)
def test_bad_parameters_raise_clear_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_non_integer_parameters_are_rejected():
    with pytest.raises(TypeError, match="window must be an int, got float 2.5"):
        powerattn.make_pattern("power", window=2.5)


def test_a_new_pattern_joins_by_one_definition():
    from dataclasses import dataclass
    from typing import ClassVar

    from powerattn.patterns import _REGISTRY, register

    @register
    @dataclass(frozen=True)
    class EveryThird(Pattern):
        name: ClassVar[str] = "test_every_third"

        def allowed(self, qb, kb):
            return (qb - kb) % 3 == 0

    try:
        p = powerattn.make_pattern("test_every_third", block_size=2)
        m = p.token_mask(12)
        assert m[11, 5] and not m[11, 7] and m[11, 11] and not m[5, 11]
    finally:
        del _REGISTRY["test_every_third"]
