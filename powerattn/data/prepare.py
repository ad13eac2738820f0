"""`python -m powerattn.data.prepare`: tokenise corpora offline into token stores, with a per-source report.

    python -m powerattn.data.prepare --input /data/web/*.jsonl --input books=/data/pg19 \\
        --tokenizer /models/llama2/tokenizer.model --seq-len 32768 --output /data/prepared

Each --input (optionally NAME=PATH) becomes DIR/NAME/ (tokens.bin, doc_offsets.npy, meta.json);
DIR/manifest.json lists them with their counts, and DIR holds a copy of the tokenizer. Inputs are
files, globs or folders of jsonl/json/parquet/csv/txt files (jsonl/json/txt/csv may be compressed:
.gz, .zst, .bz2, .xz), `save_to_disk` folders or hub ids. With --group-by FIELD (a dotted field,
e.g. meta.redpajama_set_name for SlimPajama) each input becomes DIR/NAME/VALUE/ stores, one per
value of FIELD, reported separately; a source reading DIR can then weight them with group_weights.
Documents are stored in input order; packing into seq_len rows happens in the loader (with per-epoch
shuffling), so one prepared folder serves every curriculum stage; the report shows how the corpus
packs at --seq-len. Everything is written to a temporary sibling folder and renamed into place
when complete: a DIR with a manifest is never half-written. Use DIR as a `data.sources` path.
From a checkout, `python -m data.prepare` (data/prepare.py) runs the same CLI.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from powerattn.atomic import atomic_write_json, make_tempdir, replace_dir
from powerattn.data.config import SourceConfig
from powerattn.data.sources import build_groups, build_store, check_source, resolve, source_name
from powerattn.data.store import FORMAT_VERSION, TokenStore
from powerattn.data.tokenizer import Tokenizer

PROG = "python -m powerattn.data.prepare"


def parse_args(argv: list[str] | None = None, prog: str = PROG) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    p.add_argument("--input", action="append", required=True, metavar="[NAME=]PATH_OR_GLOB",
                   help="file, glob, folder or hub id; repeat for several sources")
    p.add_argument("--tokenizer", required=True, help="tokenizer.model, tokenizer.json, or a model folder")
    p.add_argument("--seq-len", type=int, required=True, help="training row length to report on")
    p.add_argument("--output", required=True, help="output folder (must not exist unless --overwrite)")
    p.add_argument("--text-field", default="text")
    p.add_argument("--num-proc", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    p.add_argument("--max-docs", type=int, default=None, help="take at most this many documents per source")
    p.add_argument("--group-by", default=None, metavar="FIELD",
                   help="split each input by this dotted field's value, e.g. meta.redpajama_set_name")
    p.add_argument("--streaming", action="store_true", help="stream inputs (hub ids) instead of caching them")
    p.add_argument("--cache-dir", default=None, help="datasets download/Arrow cache (default: HF's)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    return p.parse_args(argv)


def _split_input(spec: str) -> SourceConfig:
    # NAME=PATH names a source; a path that itself contains "=" still works if it exists.
    name, sep, path = spec.partition("=")
    if sep and name.isidentifier() and not Path(spec).exists():
        return SourceConfig(path=path, name=name)
    return SourceConfig(path=spec)


def _report(stores: list[TokenStore], seq_len: int) -> list[dict]:
    rows = []
    for st in stores:
        lens = st.doc_lengths
        rows.append({
            "name": st.name, "docs": st.num_docs, "tokens": st.num_tokens,
            "mean_doc": float(lens.mean()), "max_doc": int(lens.max()),
            "long_token_share": float(lens[lens >= seq_len].sum() / max(1, st.num_tokens)),
            "sequences": -(-st.num_tokens // seq_len),
        })
    return rows


def _print_report(rows: list[dict], seq_len: int) -> None:
    total = sum(r["tokens"] for r in rows)
    w = max(20, *(len(r["name"]) for r in rows))
    print(f"\n{'source':<{w}} {'docs':>10} {'tokens':>14} {'share':>7} {'mean doc':>9} {'max doc':>9} "
          f"{f'>= {seq_len}':>9} {f'rows@{seq_len}':>11}")
    for r in rows:
        print(f"{r['name']:<{w}} {r['docs']:>10,} {r['tokens']:>14,} {r['tokens'] / total:>7.1%} "
              f"{r['mean_doc']:>9.0f} {r['max_doc']:>9,} {r['long_token_share']:>9.1%} {r['sequences']:>11,}")
    print(f"{'total':<{w}} {sum(r['docs'] for r in rows):>10,} {total:>14,} {'':>7} {'':>9} {'':>9} {'':>9} "
          f"{sum(r['sequences'] for r in rows):>11,}")
    print(f"(column '>= {seq_len}': share of tokens in documents at least one row long)")


def prepare(args: argparse.Namespace) -> Path:
    """Validate everything, tokenise every input, publish the output folder atomically."""
    if args.seq_len < 1:
        raise ValueError(f"--seq-len must be >= 1, got {args.seq_len}")
    tok = Tokenizer.from_pretrained(args.tokenizer)
    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"--output {str(out)!r} exists; pass --overwrite to replace it")
    srcs = [_split_input(s) for s in args.input]
    for s in srcs:
        s.max_docs, s.streaming, s.group_by = args.max_docs, args.streaming, args.group_by
    names = [source_name(s) for s in srcs]
    if len(set(names)) != len(names):
        raise ValueError(f"source names {names} collide; name them with --input NAME=PATH")
    # Missing files, unreadable formats and absent text fields fail here, before any tokenisation.
    resolved = [resolve(s.path, n) for s, n in zip(srcs, names)]
    for s, r in zip(srcs, resolved):
        check_source(s, args.text_field, r)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_tempdir(out.parent, out.name)
    try:
        stores, entries = [], []  # entries: (input, group) of each store
        for s, n, r in zip(srcs, names, resolved):
            print(f"[prepare] {n}: {s.path}", flush=True)
            build = [args.text_field, args.num_proc, args.cache_dir, r]
            if s.group_by:
                for group, store in build_groups(s, tok, tmp / n, *build).items():
                    stores.append(store)
                    entries.append({"input": s.path, "group": group})
            else:
                stores.append(build_store(s, tok, tmp / n, *build))
                entries.append({"input": s.path})
        rows = _report(stores, args.seq_len)
        tok.save(tmp)
        atomic_write_json(tmp / "manifest.json", {
            "format": FORMAT_VERSION, "seq_len": args.seq_len, "tokenizer": tok.hash,
            "tokenizer_path": tok.path, "text_field": args.text_field, "created": time.time(),
            "sources": [{**row, **entry, "dir": st.path.relative_to(tmp).as_posix()}
                        for row, entry, st in zip(rows, entries, stores)],
            "total_tokens": int(np.sum([r["tokens"] for r in rows])),
        })
        replace_dir(tmp, out)  # --overwrite: the old folder goes only once the new one is complete
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _print_report(rows, args.seq_len)
    print(f"\nwrote {out}")
    return out


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    """The CLI; `prog` is the command its help and errors name."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv, prog)
    try:
        prepare(args)
    except (FileNotFoundError, FileExistsError, ValueError, TypeError) as e:
        print(f"{prog.removeprefix('python -m ')}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
