"""Receptive field of a pattern across layers: reachability in its block-level attention DAG.

Layer l lets block q read every block its row names, so after k layers the last block has seen
every block reachable from it in at most k hops. `python -m powerattn.receptive_field` prints the
coverage per layer for one or all patterns and can plot them (the paper's Figure 1b).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import TYPE_CHECKING

from powerattn.atomic import save_figure

if TYPE_CHECKING:
    from torch import Tensor

    from powerattn.patterns import Pattern

# torch and the patterns load on first use: `import powerattn` imports this module (its name is also
# the function's, so it cannot be a lazy export) and must stay light for config checks before torch.


@dataclass(frozen=True)
class ReceptiveField:
    """coverage[k-1]: fraction of blocks the last block reaches within k hops; hops: fewest hops (-1 = never)."""

    pattern: Pattern
    seq_len: int
    coverage: list[float]
    hops: Tensor

    @property
    def layers_to_full(self) -> int | None:
        """Fewest layers after which every block is reached, or None within the analysed depth."""
        return next((k + 1 for k, c in enumerate(self.coverage) if c >= 1.0), None)


def receptive_field(pattern: Pattern, seq_len: int, layers: int) -> ReceptiveField:
    """Breadth-first search from the last block over `layers` hops of the pattern's block DAG."""
    import torch

    if layers < 1:
        raise ValueError(f"receptive_field: layers must be >= 1, got {layers}")
    t = pattern.tables(seq_len)
    ptr, idx = t.kv_ptr.long(), t.kv_idx.long()
    nb = ptr.numel() - 1
    hops = torch.full((nb,), -1, dtype=torch.long)
    hops[nb - 1] = 0
    frontier = torch.tensor([nb - 1])
    coverage = []
    for k in range(1, layers + 1):
        if frontier.numel():
            starts, lens = ptr[frontier], ptr[frontier + 1] - ptr[frontier]
            offsets = torch.arange(int(lens.sum())) - torch.repeat_interleave(torch.cumsum(lens, 0) - lens, lens)
            reached = torch.unique(idx[torch.repeat_interleave(starts, lens) + offsets])
            frontier = reached[hops[reached] < 0]
            hops[frontier] = k
        coverage.append(float((hops >= 0).double().mean()))
    return ReceptiveField(pattern, seq_len, coverage, hops)


def format_table(fields: dict[str, ReceptiveField]) -> str:
    """Coverage (%) per layer, one column per pattern."""
    names = list(fields)
    width = max(8, *(len(n) for n in names))
    lines = ["layer " + " ".join(f"{n:>{width}}" for n in names)]
    layers = len(next(iter(fields.values())).coverage)
    for k in range(layers):
        lines.append(f"{k + 1:>5} " + " ".join(f"{100 * fields[n].coverage[k]:>{width - 1}.1f}%" for n in names))
    lines.append(
        "full@ " + " ".join(f"{str(fields[n].layers_to_full or '-'):>{width}}" for n in names)
    )
    return "\n".join(lines)


def plot(fields: dict[str, ReceptiveField], path: str) -> None:
    """PNG of coverage vs layers for each pattern, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=150)
    for name, rf in fields.items():
        ax.plot(range(1, len(rf.coverage) + 1), [100 * c for c in rf.coverage], marker=".", label=name)
    any_rf = next(iter(fields.values()))
    nb = any_rf.hops.numel()
    ax.set(
        xlabel="layers (hops)", ylabel="blocks reached from the last block (%)", ylim=(0, 102),
        title=f"Receptive field at {any_rf.seq_len} tokens ({nb} blocks of {any_rf.pattern.block_size})",
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    from powerattn.patterns import make_pattern, pattern_names

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pattern", action="append", choices=pattern_names() + ["all"],
                        help="pattern name (repeatable); default: all, with the paper's parameters")
    parser.add_argument("--seq-len", type=int, default=32768)
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--plot", metavar="PNG", help="write a coverage-vs-layers plot here")
    args = parser.parse_args(argv)
    if args.seq_len < 1:
        parser.error(f"--seq-len must be >= 1, got {args.seq_len}")
    names = args.pattern or ["all"]
    if "all" in names:
        names = ["full", "power", "stride_slash", "sliding_window", "dilated", "longnet"]
    fields = {
        n: receptive_field(make_pattern(n, block_size=args.block_size), args.seq_len, args.layers) for n in names
    }
    print(f"coverage of {args.seq_len} tokens from the last block, by layer "
          f"({fields[names[0]].hops.numel()} blocks of {args.block_size})")
    print(format_table(fields))
    if args.plot:
        plot(fields, args.plot)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
