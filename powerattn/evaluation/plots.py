"""The PNG of each evaluation task; every figure is written to a temporary file and renamed into place."""

from __future__ import annotations

from pathlib import Path

from powerattn.atomic import save_figure


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: str | Path) -> None:
    save_figure(fig, path)


def _k(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def passkey_heatmap(res: dict, path: str | Path, title: str) -> None:
    """Accuracy per (context length, depth): lengths across, depths down (0% = start of the context)."""
    import numpy as np

    plt = _plt()
    lengths, depths = res["lengths"], res["depths"]
    acc = np.array(res["accuracy"], dtype=float).T  # [depth, length]
    size = (1.2 + 0.9 * max(len(lengths), 4), 1.6 + 0.38 * max(len(depths), 4))
    fig, ax = plt.subplots(figsize=size, dpi=150)
    im = ax.imshow(acc, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(lengths)), [_k(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{100 * d:.0f}%" for d in depths])
    ax.set(xlabel="context length (tokens)", ylabel="needle depth")
    ax.set_title(title, fontsize=9)
    if acc.size <= 400:
        for (i, j), v in np.ndenumerate(acc):
            ax.text(j, i, "-" if np.isnan(v) else f"{100 * v:.0f}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax, label="exact-match accuracy")
    fig.tight_layout()
    save(fig, path)


def ruler_plot(res: dict, path: str | Path, title: str) -> None:
    plt = _plt()
    xs = list(range(len(res["lengths"])))
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=150)
    for name, scores in res["scores"].items():
        ax.plot(xs, [100 * s for s in scores], "o--", label=name, alpha=0.8)
    ax.plot(xs, [100 * s for s in res["average"]], "s-", color="black", lw=2, label="average")
    ax.set_xticks(xs, [_k(n) for n in res["lengths"]])
    ax.set(xlabel="context length (tokens)", ylabel="score (%)", ylim=(-2, 102), title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save(fig, path)


def ppl_plot(res: dict, path: str | Path, title: str) -> None:
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=150)
    rows = res["per_length"]
    xs = list(range(len(rows)))
    a.plot(xs, [r["ppl"] for r in rows], "o-")
    a.set_xticks(xs, [_k(r["length"]) for r in rows])
    a.set(xlabel="context length (tokens)", ylabel="perplexity", title="per context length")
    for r in rows:
        mids = [(bk["start"] + bk["end"]) / 2 for bk in r["buckets"] if bk["tokens"]]
        b.plot(mids, [bk["loss"] for bk in r["buckets"] if bk["tokens"]], ".-", label=_k(r["length"]))
    b.set(xlabel=f"position in the context ({res['mode']} mode)", ylabel="mean loss (nats)",
          title="loss by position bucket")
    if len(rows) > 1 and max(r["length"] for r in rows) >= 8 * min(r["length"] for r in rows):
        b.set_xscale("symlog", linthresh=max(1, min(r["length"] for r in rows) // res["buckets"]))
    b.legend(title="length")
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    save(fig, path)


def receptive_field_plot(res: dict, path: str | Path, title: str) -> None:
    """Left: coverage vs layers (this model bold); right: passkey accuracy by depth over the reachable set."""
    plt = _plt()
    th, ms = res["theory"], res["measured"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.4), dpi=150)
    layers = list(range(1, res["layers"] + 1))
    for name, cov in res["reference"].items():
        a.plot(layers, [100 * c for c in cov], lw=1, alpha=0.45, label=name)
    a.plot(layers, [100 * c for c in th["coverage_by_layer"]], "o-", color="black", lw=2.2, ms=3,
           label=f"this model: {th['pattern']}" + (" + full layers" if th["full_attention_layers"] else ""))
    a.set(xlabel="layers (hops)", ylabel="blocks reached from the last block (%)", ylim=(0, 102),
          title=f"theoretical receptive field at {_k(res['length'])} tokens")
    from matplotlib.ticker import MaxNLocator

    a.xaxis.set_major_locator(MaxNLocator(integer=True))
    a.grid(alpha=0.3)
    a.legend(fontsize=7, loc="best")
    nb, length = th["num_blocks"], res["length"]
    bs = th["block_size"]
    for i, ok in enumerate(th["reachable_by_block"]):  # shade what L layers cannot reach
        if not ok:
            b.axvspan(100 * i * bs / length, 100 * min((i + 1) * bs, length) / length, color="0.85", lw=0)
    centers = [100 * min((blk + 0.5) * bs, length) / length for blk in ms["needle_block"]]
    width = max(1.0, 60.0 / max(len(centers), 1))
    acc = [100 * x for x in ms["accuracy"]]
    b.bar(centers, acc, width=width, color="tab:blue", alpha=0.8, label="measured passkey accuracy")
    b.plot(centers, acc, "o", color="tab:blue", ms=3)  # zero-height bars stay visible
    b.plot([], [], "s", color="0.85", label=f"not reachable in {res['layers']} layers")
    hops = [h if h >= 0 else float("nan") for h in th["hops_by_block"]]
    starts = [100 * i * bs / length for i in range(nb)]
    h_ax = b.twinx()
    h_ax.step(starts + [100.0], hops + hops[-1:], where="post", color="tab:red", lw=1, alpha=0.7)
    h_ax.set_ylabel("fewest hops from the last block", color="tab:red")
    h_ax.set_ylim(0, max([h for h in hops if h == h] + [1]) + 1)
    b.plot([], [], color="tab:red", lw=1, label="hops needed (theory)")
    b.set(xlim=(0, 100), ylim=(0, 102), xlabel="needle position (% of the context)", ylabel="accuracy (%)",
          title=f"passkey at {_k(length)}: {nb} blocks of {bs}")
    b.grid(alpha=0.3, axis="y")
    b.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3, frameon=False)
    fig.suptitle(title)
    fig.tight_layout()
    save(fig, path)
