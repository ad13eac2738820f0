"""Turn `SourceConfig`s into tokenised `Source`s: find the files, load them with HF `datasets`,
tokenise with `datasets.map(num_proc=...)` and cache the result as a token store.

The cache folder is `<cache_dir>/tokenized/<name>-<key>`, key = hash of (the files' paths, sizes
and mtimes or the hub id, split, text field, max_docs, group_by, tokenizer hash): a second run with
the same inputs opens the store without touching `datasets` or the tokenizer. The intermediate Arrow
files of `datasets.map` are deleted once the store is published (the store holds the same ids,
smaller). A source with `group_by` caches a folder of stores, one per group value, plus groups.json
(written last, the whole folder renamed into place when complete).
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from filelock import FileLock
from tqdm.auto import tqdm

from powerattn.data import groups
from powerattn.data.config import DataConfig, SourceConfig, as_data_config
from powerattn.data.groups import group_values
from powerattn.data.loader import Source
from powerattn.data.store import StoreWriter, TokenStore
from powerattn.data.tokenizer import Tokenizer, encode_documents

log = logging.getLogger(__name__)

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text", ".arrow": "arrow",
            ".csv": "csv"}
COMPRESSIONS = (".gz", ".zst", ".bz2", ".xz")  # read by `datasets` itself (.zst through zstandard)
_GLOB_CHARS = set("*?[")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
_OFFLINE = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def _builder_of(path: str) -> str | None:
    name = path.lower()
    for ext in COMPRESSIONS:
        name = name.removesuffix(ext)
    builder = BUILDERS.get(Path(name).suffix)
    compressed = name != path.lower()
    return None if compressed and builder in ("parquet", "arrow") else builder


def resolve(path: str, name: str) -> tuple[str, Any]:
    """Classify a source path: ("store"|"prepared"|"disk", folder), (builder, [files]) or ("hub", id)."""
    p = Path(path).expanduser()
    if p.is_dir():
        if TokenStore.is_complete(p):
            return "store", p
        if (p / "manifest.json").is_file():
            return "prepared", p
        if (p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file():
            return "disk", p
        files = sorted(f for f in glob.glob(str(p / "**" / "*"), recursive=True)
                       if os.path.isfile(f) and _builder_of(f))
        if not files:
            raise FileNotFoundError(
                f"data source {name!r}: folder {path!r} holds no data files ({', '.join(sorted(BUILDERS))})"
            )
    elif p.is_file():
        files = [str(p)]
    elif _GLOB_CHARS & set(path):
        files = sorted(f for f in glob.glob(str(p), recursive=True) if os.path.isfile(f))
        if not files:
            raise FileNotFoundError(f"data source {name!r}: glob {path!r} matches no files")
    elif _looks_like_hub_id(path):
        if _offline():
            raise FileNotFoundError(f"data source {name!r}: no file or folder at {path!r} (and HF offline mode "
                                    "is on, so it is not tried as a hub dataset id)")
        return "hub", path
    else:
        raise FileNotFoundError(f"data source {name!r}: no file or folder at {path!r}")
    kinds = {_builder_of(f) for f in files}
    if None in kinds:
        bad = next(f for f in files if _builder_of(f) is None)
        raise ValueError(f"data source {name!r}: unsupported file type {bad!r} (known: {sorted(BUILDERS)})")
    if len(kinds) > 1:
        raise ValueError(
            f"data source {name!r}: {path!r} mixes file types {sorted(kinds)}; use one source per type"
        )
    return kinds.pop(), [os.path.abspath(f) for f in files]


def _looks_like_hub_id(path: str) -> bool:
    """`owner/name` with no data-file suffix, whose first part is not a local folder."""
    owner = path.split("/")[0]
    return bool(_HUB_ID.fullmatch(path)) and _builder_of(path) is None and not Path(owner).exists() \
        and not path.lower().endswith(COMPRESSIONS)


def _offline() -> bool:
    return any(os.environ.get(k, "").upper() in ("1", "ON", "YES", "TRUE") for k in _OFFLINE)


def source_name(src: SourceConfig) -> str:
    """src.name, else the file/folder stem ("web" for /data/web/*.jsonl or /data/web.jsonl)."""
    if src.name:
        return src.name
    parts = [p for p in Path(src.path).parts if p != "/"]
    while parts and (_GLOB_CHARS & set(parts[-1])) and Path(parts[-1]).stem.strip("*?[]") in ("", "**"):
        parts.pop()  # "*.jsonl", "**": name after the folder instead
    stem = parts[-1].split(".")[0] if parts else ""
    return "".join(ch for ch in stem if ch not in "*?[]") or "source"


def _cache_key(kind: str, target: Any, src: SourceConfig, field: str, tok: Tokenizer) -> str:
    if kind == "disk":  # a save_to_disk folder: its files identify it
        target = sorted(str(f) for f in Path(target).rglob("*") if f.is_file())
    if isinstance(target, list):
        ident = [[f, os.path.getsize(f), os.stat(f).st_mtime_ns] for f in target]
    else:
        ident = str(target)
    parts = [1, kind, ident, src.split, field, src.max_docs, tok.hash]
    if src.group_by:  # appended only when set, so ungrouped caches keep their keys
        parts.append(["group_by", src.group_by])
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def _load_dataset(kind: str, target: Any, src: SourceConfig, hf_cache_dir, streaming: bool, where: str):
    import datasets

    if kind == "disk":
        ds = datasets.load_from_disk(str(target))
        if isinstance(ds, datasets.DatasetDict):
            if src.split not in ds:
                raise ValueError(f"{where}: no split {src.split!r}; splits are {sorted(ds)}")
            ds = ds[src.split]
        return ds.to_iterable_dataset() if streaming else ds
    cache = None if hf_cache_dir is None else str(hf_cache_dir)
    if kind == "hub":
        try:
            return datasets.load_dataset(target, split=src.split, streaming=streaming, cache_dir=cache)
        except Exception as e:  # offline, unknown id, no such split: say what we tried, on one line
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise FileNotFoundError(
                f"{where}: no local file or folder at {target!r}, and loading it as a hub dataset id failed: {reason}"
            ) from e
    # Plain .txt files: one document per file (sample_by="document"), as for books.
    extra = {"sample_by": "document"} if kind == "text" else {}
    try:
        return datasets.load_dataset(kind, data_files=target, split="train", streaming=streaming,
                                     cache_dir=cache, **extra)
    except Exception as e:
        if _all_empty(target):
            raise ValueError(f"{where}: the dataset is empty (no documents)") from e
        raise ValueError(f"{where}: datasets could not read the files: {e}") from e


def _all_empty(files: list[str]) -> bool:
    return all(os.path.getsize(f) == 0 for f in files)


def _columns(ds) -> list[str]:
    if ds.column_names is not None:
        return list(ds.column_names)
    first = next(iter(ds), None)
    return [] if first is None else list(first)


def _texts(batch: dict, field: str) -> list[str]:
    out = []
    for t in batch[field]:
        if t is None:
            t = ""
        if not isinstance(t, str):
            raise TypeError(f"text field {field!r} holds {type(t).__name__}, not str")
        out.append(t)
    return out


def _tokenize_batch(batch: dict, field: str, path: str, bos_id: int, eos_id: int, group_by: str | None) -> dict:
    out = {"input_ids": encode_documents(_texts(batch, field), path, bos_id, eos_id)}
    if group_by:
        out["group"] = group_values(batch, group_by)
    return out


def tokenize_source(
    src: SourceConfig, tokenizer: Tokenizer, cache_dir: str | os.PathLike, text_field: str = "text",
    num_proc: int = 1,
) -> list[Source]:
    """Tokenise one configured source (or open its cache / prepared store) into `Source`s."""
    name, cache_dir = source_name(src), Path(cache_dir)
    kind, target = resolve(src.path, name)
    if kind == "store":
        return [_source(src, name, _check_tokenizer(TokenStore(target), tokenizer))]
    if kind == "prepared":
        return _prepared_sources(src, name, target, tokenizer)
    field = src.text_field or text_field
    store_dir = cache_dir / "tokenized" / f"{name}-{_cache_key(kind, target, src, field, tokenizer)}"
    (cache_dir / "locks").mkdir(parents=True, exist_ok=True)
    # Runs side by side (bench/pattern_study.py --jobs, two jobs on one node) share the cache: one
    # builds it, the others wait here and then hit it; two builders would delete each other's files.
    with FileLock(cache_dir / "locks" / f"{store_dir.name}.lock"):
        hit = groups.is_complete(store_dir) if src.group_by else TokenStore.is_complete(store_dir)
        if hit:
            log.info("data source %r: tokenised cache hit %s", name, store_dir)
        resolved = (kind, target)
        if src.group_by:
            stores = groups.open_groups(store_dir) if hit else build_groups(
                src, tokenizer, store_dir, field, num_proc, cache_dir / "hf", resolved)
            return _group_sources(src, name, stores)
        store = TokenStore(store_dir) if hit else build_store(
            src, tokenizer, store_dir, field, num_proc, cache_dir / "hf", resolved)
        return [_source(src, name, store)]


def check_source(
    src: SourceConfig, text_field: str = "text", resolved: tuple[str, Any] | None = None
) -> None:
    """Cheap pre-flight: the source exists, reads, is not empty, has its text (and group_by) field (peeks one row)."""
    name = source_name(src)
    kind, target = resolved or resolve(src.path, name)
    if kind in ("store", "prepared"):
        return
    where, field = f"data source {name!r} ({src.path})", src.text_field or text_field
    ds = _load_dataset(kind, target, src, None, True, where)
    cols = _columns(ds)
    if not cols:
        raise ValueError(f"{where}: the dataset is empty (no documents)")
    if field not in cols:
        raise ValueError(f"{where}: text field {field!r} not found; columns are {cols}")
    if src.group_by:
        groups.check_group_field(next(iter(ds)), src.group_by, where)


def build_store(
    src: SourceConfig, tokenizer: Tokenizer, store_dir: str | os.PathLike, text_field: str = "text",
    num_proc: int = 1, hf_cache_dir: str | os.PathLike | None = None, resolved: tuple[str, Any] | None = None,
) -> TokenStore:
    """Load a raw source with `datasets`, tokenise it ([BOS] text [EOS] per document) into a new store."""
    if src.group_by:
        raise ValueError(f"data source {source_name(src)!r} has group_by {src.group_by!r}: use build_groups")
    return _build(src, tokenizer, Path(store_dir), text_field, num_proc, hf_cache_dir, resolved)


def build_groups(
    src: SourceConfig, tokenizer: Tokenizer, out_dir: str | os.PathLike, text_field: str = "text",
    num_proc: int = 1, hf_cache_dir: str | os.PathLike | None = None, resolved: tuple[str, Any] | None = None,
) -> dict[str, TokenStore]:
    """As build_store, one store per value of src.group_by, in a grouped folder (see powerattn.data.groups)."""
    if not src.group_by:
        raise ValueError(f"data source {source_name(src)!r} has no group_by")
    return _build(src, tokenizer, Path(out_dir), text_field, num_proc, hf_cache_dir, resolved)


def _build(src: SourceConfig, tokenizer: Tokenizer, out_dir: Path, text_field: str, num_proc: int,
           hf_cache_dir, resolved):
    name = source_name(src)
    kind, target = resolved or resolve(src.path, name)
    if kind in ("store", "prepared"):
        raise ValueError(f"data source {name!r}: {src.path!r} is already tokenised ({kind})")
    field = src.text_field or text_field
    meta = {"name": name, "source": src.path, "text_field": field, "tokenizer": tokenizer.hash,
            "tokenizer_path": tokenizer.path}
    where = f"data source {name!r} ({src.path})"
    ds = _load_dataset(kind, target, src, hf_cache_dir, src.streaming, where)
    cols = _columns(ds)
    if not cols:
        raise ValueError(f"{where}: the dataset is empty (no documents)")
    if field not in cols:
        raise ValueError(f"{where}: text field {field!r} not found; columns are {cols}")
    if src.group_by and src.group_by.split(".")[0] not in cols:
        raise ValueError(f"{where}: group_by field {src.group_by!r} not found; columns are {cols}")
    writer = groups.GroupWriter if src.group_by else StoreWriter
    with writer(out_dir, tokenizer.vocab_size, meta) as w:
        try:
            if src.streaming:
                _tokenize_streaming(ds, w, field, tokenizer, src.max_docs, name, src.group_by)
            else:
                _tokenize_map(ds, w, field, tokenizer, src.max_docs, num_proc, out_dir, name, src.group_by)
        except (TypeError, groups.GroupError) as e:
            raise type(e)(f"{where}: {e}") from None
        result = w.commit()
    for sub, store in (result.items() if src.group_by else [(None, result)]):
        log.info("data source %r%s: %d docs, %d tokens -> %s", name, f" group {sub!r}" if sub else "",
                 store.num_docs, store.num_tokens, store.path)
    return result


def _tokenize_map(ds, w, field: str, tok: Tokenizer, max_docs: int | None, num_proc: int,
                  store_dir: Path, name: str, group_by: str | None) -> None:
    if max_docs is not None:
        ds = ds.select(range(min(max_docs, len(ds))))
    if len(ds) == 0:
        raise ValueError(f"data source {name!r}: the dataset is empty (no documents)")
    import datasets

    features = {"input_ids": datasets.Sequence(datasets.Value("int32"))}
    if group_by:
        features["group"] = datasets.Value("string")
    map_dir = store_dir.parent / f".map-{store_dir.name}"
    map_dir.mkdir(parents=True, exist_ok=True)
    try:
        out = ds.map(
            _tokenize_batch, batched=True, batch_size=256, remove_columns=ds.column_names,
            num_proc=max(1, min(num_proc, len(ds))) if num_proc > 1 else None,
            fn_kwargs={"field": field, "path": tok.path, "bos_id": tok.bos_id if tok.add_bos else -1,
                       "eos_id": tok.eos_id, "group_by": group_by},
            cache_file_name=str(map_dir / "tokens.arrow"), new_fingerprint=store_dir.name,
            features=datasets.Features(features), desc=f"tokenising {name}",
        )
        for batch in out.data.to_batches():  # record batches: the columns' rows line up
            ids = batch.column("input_ids")
            values, lengths = ids.flatten().to_numpy(), ids.value_lengths().to_numpy()
            if group_by:
                w.add(values, lengths, batch.column("group").to_numpy(zero_copy_only=False))
            else:
                w.add(values, lengths)
        del out
    finally:
        shutil.rmtree(map_dir, ignore_errors=True)


def _tokenize_streaming(
    ds, w, field: str, tok: Tokenizer, max_docs: int | None, name: str, group_by: str | None
) -> None:
    texts: list[str] = []
    labels: list[str] = []
    n = 0

    def flush():
        docs = tok.encode_batch(texts, eos=True)
        if group_by:
            w.add_docs(docs, labels)
        else:
            w.add_docs(docs)

    for row in tqdm(ds, desc=f"tokenising {name} (streaming)", unit=" docs", total=max_docs):
        if max_docs is not None and n >= max_docs:
            break
        texts += _texts({field: [row[field]]}, field)
        if group_by:
            labels += group_values({k: [v] for k, v in row.items()}, group_by)
        n += 1
        if len(texts) == 1024:
            flush()
            texts, labels = [], []
    if texts:
        flush()


def _check_tokenizer(store: TokenStore, tok: Tokenizer) -> TokenStore:
    if store.meta.get("tokenizer") != tok.hash:
        raise ValueError(
            f"token store {store.path} was made with tokenizer {store.meta.get('tokenizer')} "
            f"({store.meta.get('tokenizer_path')}), not {tok.hash} ({tok.path})"
        )
    return store


def _prepared_sources(src: SourceConfig, name: str, root: Path, tok: Tokenizer) -> list[Source]:
    # A prepare output expands to its stores, sharing src.weight in proportion to their tokens (or by
    # group_weights over the groups a --group-by prepare recorded); they are named "NAME/sub" when
    # the source has a name, else by their own names.
    manifest = json.loads((root / "manifest.json").read_text())
    entries = [(f"{src.name}/{st.name}" if src.name else st.name, s.get("group"), st)
               for s in manifest["sources"] for st in [_check_tokenizer(TokenStore(root / s["dir"]), tok)]]
    return groups.mixture(src, entries, f"data source {name!r} ({src.path})")


def _group_sources(src: SourceConfig, name: str, stores: dict[str, TokenStore]) -> list[Source]:
    entries = [(f"{name}/{g}", g, st) for g, st in stores.items()]
    return groups.mixture(src, entries, f"data source {name!r} ({src.path})")


def _source(src: SourceConfig, name: str, store: TokenStore) -> Source:
    return Source(name, store, src.weight, src.upsample_min_tokens, src.upsample_factor)


def load_sources(cfg: DataConfig, tokenizer: Tokenizer) -> list[Source]:
    """All sources of `cfg`, tokenised or opened from cache (the default synthetic corpus when empty)."""
    cfg = as_data_config(cfg)
    specs = cfg.sources
    if not specs:
        from powerattn.data.default import default_source_config

        specs = [default_source_config(cfg)]
    out: list[Source] = []
    for s in specs:
        out += tokenize_source(s, tokenizer, cfg.cache_dir, cfg.text_field, cfg.num_proc)
    names = [s.name for s in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"data sources: duplicate names {dup}; set `name` on each source")
    return out
