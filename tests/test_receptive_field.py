"""Receptive-field facts from the paper (Fig. 1b, 32K tokens = 128 blocks of 256)."""

import torch

import powerattn
from powerattn.receptive_field import main

SEQ = 32768


def test_sliding_window_reaches_ten_blocks_in_one_hop():
    rf = powerattn.receptive_field(powerattn.make_pattern("sliding_window", window=9, sink=1), SEQ, 28)
    assert round(rf.coverage[0] * 128) == 10 and abs(rf.coverage[0] - 0.078) < 1e-3
    assert rf.layers_to_full == 16  # linear growth: 9 blocks a hop, plus the sink


def test_power_covers_everything_within_six_hops():
    rf = powerattn.receptive_field(powerattn.make_pattern("power", window=5, sink=1), SEQ, 28)
    assert rf.layers_to_full == 6 and rf.coverage[4] < 1.0
    assert int(rf.hops.max()) == 6 and bool((rf.hops >= 0).all())


def test_dilated_never_exceeds_half():
    rf = powerattn.receptive_field(powerattn.make_pattern("dilated", window=20), SEQ, 28)
    assert max(rf.coverage) <= 0.5 and rf.coverage[-1] == 0.5
    assert bool((rf.hops[1::2] >= 0).all()) and bool((rf.hops[0::2] == -1).all())  # odd distances unreachable


def test_hops_are_shortest_paths_against_brute_force():
    pat = powerattn.make_pattern("longnet", block_size=16, segment=2, levels=3)
    n = 40
    layout = pat.block_layout(n)
    rf = powerattn.receptive_field(pat, n * 16, 12)
    dist = torch.full((n,), -1)
    dist[n - 1] = 0
    for k in range(1, 13):
        for q in range(n):
            if dist[q] == k - 1:
                for kb in range(n):
                    if layout[q, kb] and dist[kb] < 0:
                        dist[kb] = k
    assert torch.equal(rf.hops, dist)
    assert rf.coverage == [float((dist[dist >= 0] <= k).sum()) / n for k in range(1, 13)]


def test_cli_prints_all_six_and_plots(tmp_path, capsys):
    png = tmp_path / "rf.png"
    main(["--seq-len", str(SEQ), "--layers", "28", "--plot", str(png)])
    out = capsys.readouterr().out
    for name in ["full", "power", "stride_slash", "sliding_window", "dilated", "longnet"]:
        assert name in out
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
