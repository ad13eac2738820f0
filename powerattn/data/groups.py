"""Sources split by a document field (SlimPajama's `meta.redpajama_set_name`): one token store per value.

A grouped store is a folder holding one token store per group value and `groups.json` ({value:
sub-folder}); it is built in a temporary sibling folder and renamed into place once every group's
store is complete, so a folder with groups.json is never half-written. `mixture` turns the groups
into mixture sources, weighted by `group_weights` or by their tokens.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np

from powerattn.atomic import atomic_write_json, make_tempdir
from powerattn.data.config import SourceConfig
from powerattn.data.loader import Source
from powerattn.data.store import StoreWriter, TokenStore

GROUPS = "groups.json"


class GroupError(ValueError):
    """A document without the group_by field."""


def group_values(batch: dict, field: str) -> list[str]:
    """Each document's value of the dotted `field` (e.g. "meta.redpajama_set_name"), as a string."""
    top, *rest = field.split(".")
    out = []
    for value in batch[top]:
        for key in rest:
            value = value.get(key) if isinstance(value, dict) else None
        if value is None or value == "":
            raise GroupError(f"group_by field {field!r} is missing or empty in a document")
        out.append(str(value))
    return out


def check_group_field(row: dict, field: str, where: str) -> None:
    """Pre-flight on the first document: the dotted field exists."""
    try:
        group_values({k: [v] for k, v in row.items()}, field)
    except (KeyError, GroupError):
        raise ValueError(f"{where}: group_by field {field!r} not found in the first document (keys "
                         f"{sorted(row)})") from None


def folder_name(group: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", group).lstrip(".") or "_"


def is_complete(path: str | os.PathLike) -> bool:
    return (Path(path) / GROUPS).is_file()


def open_groups(path: str | os.PathLike) -> dict[str, TokenStore]:
    """{group value: store} of a complete grouped folder."""
    path = Path(path)
    folders = json.loads((path / GROUPS).read_text())
    return {group: TokenStore(path / folder) for group, folder in folders.items()}


class GroupWriter:
    """Like StoreWriter, for documents that each carry a group value: one store per value."""

    def __init__(self, path: str | os.PathLike, vocab_size: int, meta: dict):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = make_tempdir(self.path.parent, self.path.name)
        self.vocab_size, self.meta = vocab_size, meta
        self.writers: dict[str, StoreWriter] = {}

    def _writer(self, group: str) -> StoreWriter:
        if group not in self.writers:
            folder = folder_name(group)
            clash = [g for g in self.writers if folder_name(g) == folder]
            if clash:
                raise ValueError(f"group values {clash[0]!r} and {group!r} map to the same folder {folder!r}")
            meta = {**self.meta, "name": f"{self.meta.get('name')}/{group}", "group": group}
            self.writers[group] = StoreWriter(self.tmp / folder, self.vocab_size, meta)
        return self.writers[group]

    def add(self, values: np.ndarray, lengths: np.ndarray, groups: list[str] | np.ndarray) -> None:
        """Documents as concatenated ids + lengths, and each document's group."""
        groups, lengths = np.asarray(groups, dtype=object), np.asarray(lengths, dtype=np.int64)
        for group in dict.fromkeys(groups.tolist()):  # first-seen order
            rows = groups == group
            self._writer(group).add(values[np.repeat(rows, lengths)], lengths[rows])

    def add_docs(self, docs: list[list[int]], groups: list[str]) -> None:
        for group in dict.fromkeys(groups):
            self._writer(group).add_docs([d for d, g in zip(docs, groups) if g == group])

    def commit(self) -> dict[str, TokenStore]:
        if not self.writers:
            self.abort()
            raise ValueError(f"data source {self.meta.get('name')!r} ({self.meta.get('source')}): the dataset "
                             "is empty (no documents)")
        for w in self.writers.values():
            w.commit()
        atomic_write_json(self.tmp / GROUPS, {g: folder_name(g) for g in self.writers})
        try:
            os.rename(self.tmp, self.path)
        except OSError:  # another process published the same folder first
            if not is_complete(self.path):
                raise
            shutil.rmtree(self.tmp, ignore_errors=True)
        return open_groups(self.path)

    def abort(self) -> None:
        for w in self.writers.values():
            w.abort()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> GroupWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def mixture(src: SourceConfig, entries: list[tuple[str, str | None, TokenStore]], where: str) -> list[Source]:
    """Sources of a split corpus; entries (name, group, store) share src.weight.

    Without group_weights in proportion to their tokens; with them, group g gets group_weights[g]
    (normalised; entries of one group split it by tokens). Every group must be named: 0 drops one.
    """
    weights = src.group_weights
    if weights is None:
        total = sum(s.num_tokens for _, _, s in entries)
        shares = [s.num_tokens / total for _, _, s in entries]
    else:
        found = {g for _, g, _ in entries}
        unknown, missing = sorted(set(weights) - found), sorted(g for g in found - set(weights) if g is not None)
        if unknown or missing or None in found:
            raise ValueError(
                f"{where}: group_weights must name every {src.group_by!r} group present, and only those; groups "
                f"found {sorted(g for g in found if g is not None)}; not found: {unknown}; without a weight: "
                f"{missing}" + ("; some stores have no group" if None in found else "")
            )
        norm = sum(weights[g] for g in found)
        if norm <= 0:
            raise ValueError(f"{where}: group_weights give every group present weight 0")
        group_tokens = {g: sum(s.num_tokens for _, h, s in entries if h == g) for g in found}
        shares = [weights[g] / norm * s.num_tokens / max(1, group_tokens[g]) for _, g, s in entries]
    return [Source(name, store, src.weight * share, src.upsample_min_tokens, src.upsample_factor)
            for (name, _, store), share in zip(entries, shares) if share > 0]
