"""Summary of train.py benchmark runs (bench/gpu_train.sh, bench/gpu_8b.sh): one row per run and length.

    python bench/summarize_runs.py WORK OUT.json RUN [RUN ...] [--compare A B]... [--table OUT.txt]

WORK holds, per run NAME: runs/NAME/{metrics.jsonl,config.yaml} (train.py's), NAME.log (its output,
each line prefixed by `[seconds since start]`), optionally NAME.smi.csv (nvidia-smi samples: gpu index,
MiB used) and NAME.json (a script's own JSON report); WORK/status.txt has `NAME rc=N Ss` lines. A run
whose curriculum has several lengths gives a row per length (`NAME@64K`). tokens/s and MFU are medians
over a length's steps after its first `--warmup` (default 1: the first compiles and autotunes);
`speedup_vs_full` divides by the `full` row of the same model, length, process layout and ZeRO stage.
No torch import: runs in well under 1 s.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

# Log lines (rank 0) that mark the phases of a run's start, in order: data tokenised or found in the cache,
# then model built and loaded (partitioned under ZeRO-3) and the DeepSpeed engine initialised, then step 1.
PHASES = {
    "data_ready": re.compile(r"data source '.*': (\d+ docs|tokenised cache hit)"),
    "ready": re.compile(r"^run folder "),
    "first_step": re.compile(r"^step 1: "),
}
STAMP = re.compile(r"^\[\s*([0-9.]+)s\] ?(.*)$")
ERROR = re.compile(r"^(error: |[A-Za-z_.]*Error: |Could not )")
OOM = re.compile(r"(CUDA out of memory|OutOfMemoryError).*?(Tried to allocate [0-9.]+ [GM]iB)?", re.IGNORECASE)


def _yaml(path: Path) -> dict:
    try:
        import yaml

        return yaml.safe_load(path.read_text()) or {}
    except (OSError, ImportError, ValueError):
        return {}


def read_status(work: Path) -> dict[str, dict]:
    """NAME -> {rc, seconds} (or {skipped: reason}) from status.txt."""
    out = {}
    path = work / "status.txt"
    for line in path.read_text().splitlines() if path.is_file() else []:
        m = re.match(r"(\S+) rc=(-?\d+) (\d+)s", line)
        if m:
            out[m.group(1)] = {"rc": int(m.group(2)), "seconds": int(m.group(3))}
        elif " skipped" in line:
            name, _, reason = line.partition(" skipped")
            out[name] = {"skipped": reason.strip(" :()") or "skipped"}
    return out


def read_log(path: Path) -> dict:
    """Seconds from launch to each phase of PHASES, and the first error or out-of-memory message."""
    phases, oom, error = {}, None, None
    for line in path.read_text(errors="replace").splitlines() if path.is_file() else []:
        m = STAMP.match(line)
        t, text = (float(m.group(1)), m.group(2)) if m else (None, line)
        for key, pattern in PHASES.items():
            if key not in phases and t is not None and pattern.search(text):
                phases[key] = t
        if oom is None and OOM.search(text):
            oom = text.strip()[:300]
        if error is None and ERROR.search(text):
            error = text.strip()[:300]
    out = {"phases_s": phases}
    if "data_ready" in phases and "ready" in phases:  # model load + DeepSpeed engine init
        out["load_s"] = round(phases["ready"] - phases["data_ready"], 1)
    if "ready" in phases:
        out["startup_s"] = phases["ready"]
    if oom:
        out["oom"] = oom
    if error:
        out["error"] = error
    return out


def read_smi(path: Path) -> dict[str, float] | None:
    """Largest memory.used per GPU (GiB) over nvidia-smi's samples."""
    if not path.is_file():
        return None
    peak: dict[str, float] = {}
    for line in path.read_text().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[1].replace(".", "", 1).isdigit():
            peak[parts[0]] = max(peak.get(parts[0], 0.0), float(parts[1]) / 1024)
    return {k: round(v, 1) for k, v in sorted(peak.items())} or None


def _length(seq_len: int) -> str:
    return f"{seq_len // 1024}K" if seq_len % 1024 == 0 else str(seq_len)


def _median(recs: list[dict], key: str):
    values = [r[key] for r in recs if r.get(key) is not None]
    return statistics.median(values) if values else None


def run_rows(work: Path, name: str, status: dict, warmup: int = 1) -> dict[str, dict]:
    """Rows of one run: one per sequence length its metrics.jsonl holds (one row, no steps, if none)."""
    run_dir = work / "runs" / name
    path = run_dir / "metrics.jsonl"
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    cfg = _yaml(run_dir / "config.yaml")
    model = cfg.get("model") or {}
    arch = model.get("arch") or {}
    common = {
        "pattern": (cfg.get("pattern") or {}).get("name"),
        "model": f"{arch.get('num_hidden_layers')}x{arch.get('hidden_size')}" if arch else model.get("path"),
        "sp": (cfg.get("parallel") or {}).get("sequence_parallel_size"),
        "zero": (((cfg.get("deepspeed") or {}).get("zero_optimization")) or {}).get("stage"),
        **status.get(name, {}), **read_log(work / f"{name}.log"),
    }
    smi = read_smi(work / f"{name}.smi.csv")
    if smi:
        common["gpu_mem_used_gib"] = smi
    report = work / f"{name}.json"
    if report.is_file():
        try:
            common["report"] = json.loads(report.read_text().splitlines()[-1])
        except (ValueError, IndexError):
            pass
    lengths = sorted({r["seq_len"] for r in recs})
    if not lengths:
        return {name: {"steps": 0, "seq_len": None, **common}}
    rows = {}
    for seq_len in lengths:
        stage = [r for r in recs if r["seq_len"] == seq_len]
        timed = stage[warmup:] or stage
        rows[name if len(lengths) == 1 else f"{name}@{_length(seq_len)}"] = {
            "steps": len(stage), "seq_len": seq_len, "tokens_per_s": _median(timed, "tokens_per_s"),
            "mfu": _median(timed, "mfu"), "step_time_s": _median(timed, "step_time_s"),
            "peak_mem_gb": max((r["peak_mem_gb"] for r in stage if r.get("peak_mem_gb") is not None),
                               default=None),
            "first_step": stage[0].get("step"), "losses": [round(r["loss"], 5) for r in stage], **common,
        }
    return rows


def summarize(work: Path, names: list[str], compare: list[tuple[str, str]] = (), warmup: int = 1) -> dict:
    status = read_status(work)
    rows: dict[str, dict] = {}
    for name in names:
        rows.update(run_rows(work, name, status, warmup))
    key = lambda r: (r.get("model"), r.get("seq_len"), r.get("sp"), r.get("zero"))
    for r in rows.values():  # against full at the same model, length and layout
        full = next((f for f in rows.values() if f.get("pattern") == "full" and key(f) == key(r)
                     and f.get("tokens_per_s")), None)
        if full and r.get("tokens_per_s") and r.get("seq_len"):
            r["speedup_vs_full"] = r["tokens_per_s"] / full["tokens_per_s"]
    out: dict = dict(rows)
    for first, second in compare:
        if first in rows and second in rows:
            a, b = rows[first], rows[second]  # step by step: a resumed run's rows start later
            shift = (a.get("first_step") or 1) - (b.get("first_step") or 1)
            pairs = zip(a.get("losses", []), b.get("losses", [])[shift:]) if shift >= 0 else \
                zip(a.get("losses", [])[-shift:], b.get("losses", []))
            diffs = [abs(x - y) for x, y in pairs]
            out[f"{first}_vs_{second}_max_abs_loss_diff"] = max(diffs) if diffs else None
    return out


def table(summary: dict) -> str:
    """A fixed-width table of the rows (plain text, for the end of a script's output)."""
    head = f"{'run':<22}{'len':>6}{'pattern':>9}{'steps':>6}{'tok/s':>9}{'x full':>7}{'MFU':>7}" \
           f"{'peak GiB':>9}{'smi GiB':>13}{'step s':>7}{'load s':>7}{'ready s':>8}  status"
    lines = [head]
    fmt = lambda v, f: "-" if v is None else format(v, f)
    for name, r in summary.items():
        if not isinstance(r, dict):
            lines.append(f"{name}: {r}")
            continue
        smi = r.get("gpu_mem_used_gib")
        state = r.get("skipped") and f"skipped ({r['skipped']})" or (
            "OOM" if r.get("oom") else f"rc={r['rc']} {r['seconds']}s" if "rc" in r else "")
        rep = r.get("report") or {}
        if "bytes" in rep and "seconds" in rep:
            state += f" (wrote {rep['bytes'] / 1e9:.1f} GB in {rep['seconds']:.0f} s)"
        length = _length(r["seq_len"]) if r.get("seq_len") else "-"
        mfu = None if r.get("mfu") is None else 100 * r["mfu"]
        lines.append(
            f"{name:<22}{length:>6}{r.get('pattern') or '-':>9}{r.get('steps', 0):>6}"
            f"{fmt(r.get('tokens_per_s'), ',.0f'):>9}{fmt(r.get('speedup_vs_full'), '.2f'):>7}"
            f"{fmt(mfu, '.1f'):>7}{fmt(r.get('peak_mem_gb'), '.1f'):>9}"
            f"{'/'.join(str(v) for v in smi.values()) if smi else '-':>13}"
            f"{fmt(r.get('step_time_s'), '.1f'):>7}{fmt(r.get('load_s'), '.0f'):>7}"
            f"{fmt(r.get('startup_s'), '.0f'):>8}  {state}")
    errors = {name.split("@")[0]: r.get("oom") or r["error"] for name, r in summary.items()
              if isinstance(r, dict) and (r.get("oom") or r.get("error"))}
    errors = [f"  {name}: {text}" for name, text in errors.items()]
    return "\n".join(lines + (["errors:", *errors] if errors else []))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("work", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("runs", nargs="+")
    p.add_argument("--compare", nargs=2, action="append", default=[], metavar=("A", "B"),
                   help="max |loss difference| of two runs, step by step (repeatable)")
    p.add_argument("--table", type=Path, help="also write the table here")
    p.add_argument("--warmup", type=int, default=1, help="steps of each length left out of the medians")
    args = p.parse_args(argv)
    summary = summarize(args.work, args.runs, [tuple(c) for c in args.compare], args.warmup)
    args.out.write_text(json.dumps(summary, indent=1))
    text = table(summary)
    if args.table:
        args.table.write_text(text + "\n")
    print(text)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
