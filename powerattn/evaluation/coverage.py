"""Theory next to measurement (the paper's Fig. 1b, for one checkpoint): the blocks its attention DAG
lets the last block reach within the model's layers, and its passkey accuracy at each needle depth.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from powerattn.data.tokenizer import Tokenizer
from powerattn.evaluation.passkey import passkey_grid, resolve_depths
from powerattn.patterns import Pattern, make_pattern, pattern_names
from powerattn.receptive_field import receptive_field


def layered_coverage(pattern: Pattern, full_layers: Sequence[int], num_layers: int, seq_len: int) -> dict:
    """Coverage after layers 1..k for k = 1..num_layers, full-attention layers included.

    Every sparse layer shares `pattern` and a block always reads itself, so the reachable set after k
    layers is the pattern's k-hop set, or everything once a full layer is among the first k.
    """
    rf = receptive_field(pattern, seq_len, num_layers)
    full = set(full_layers)
    coverage = [1.0 if full & set(range(k + 1)) else c for k, c in enumerate(rf.coverage)]
    hops = rf.hops.tolist()
    reachable = [bool(full) or 0 <= h <= num_layers for h in hops]
    return {
        "pattern": pattern.key, "full_attention_layers": sorted(full), "block_size": pattern.block_size,
        "num_blocks": len(hops), "coverage_by_layer": coverage, "coverage": coverage[-1],
        "layers_to_full": next((k + 1 for k, c in enumerate(coverage) if c >= 1.0), None),
        "hops_by_block": hops, "reachable_by_block": reachable,
    }


def reference_coverage(block_size: int, num_layers: int, seq_len: int, skip: str | None = None) -> dict:
    """coverage_by_layer of every registered pattern with its default (paper) parameters, for context."""
    patterns = [make_pattern(name, block_size=block_size) for name in pattern_names() if name != skip]
    return {p.name: receptive_field(p, seq_len, num_layers).coverage for p in patterns}


def run_receptive_field(model: nn.Module, tokenizer: Tokenizer, length: int, depths: int | Sequence[float],
                        samples: int, pattern: Pattern, full_layers: Sequence[int], num_layers: int,
                        seed: int = 0, batch_size: int = 1, progress: bool = True) -> dict:
    """Theoretical coverage of (pattern, full_layers) at `length` and measured passkey accuracy by depth."""
    depths = resolve_depths(depths)
    theory = layered_coverage(pattern, full_layers, num_layers, length)
    grid = passkey_grid(model, tokenizer, [length], depths, samples, seed, batch_size=batch_size,
                        progress=progress)
    hops, reach = theory["hops_by_block"], theory["reachable_by_block"]
    for r in grid.records:
        block = r["needle_position"] // pattern.block_size
        r.update(needle_block=block, hops=hops[block], reachable=reach[block])
    measured = {"depths": depths, "accuracy": grid.by_depth(), "needle_block": [], "hops": [],
                "reachable": []}
    for d in depths:
        rows = [r for r in grid.records if r["depth"] == d]
        measured["needle_block"].append(rows[0]["needle_block"])
        measured["hops"].append(rows[0]["hops"])
        measured["reachable"].append(sum(r["reachable"] for r in rows) / len(rows))

    def acc(flag: bool) -> float | None:
        xs = [float(r["correct"]) for r in grid.records if r["reachable"] is flag]
        return sum(xs) / len(xs) if xs else None

    return {
        "length": length, "layers": num_layers, "samples": samples, "theory": theory, "measured": measured,
        "agreement": {"accuracy_where_reachable": acc(True), "accuracy_where_unreachable": acc(False)},
        "reference": reference_coverage(pattern.block_size, num_layers, length,
                                        skip=None if full_layers else pattern.name),
        "records": grid.records,
    }
