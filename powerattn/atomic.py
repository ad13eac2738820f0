"""Atomic file and folder writes: readers see the old content or the new, never half of either.

Everything is written under a temporary name in the destination's folder and renamed into place;
files created this way follow the umask (mkstemp / mkdtemp alone would make them private).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def umask_mode(mode: int) -> int:
    """`mode` as the umask leaves it (what open() / mkdir() would create)."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def make_tempdir(parent: str | os.PathLike, name: str) -> Path:
    """A fresh hidden folder in `parent`, for building `name` to rename into place (replace_dir)."""
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{name}.tmp-"))
    os.chmod(tmp, umask_mode(0o777))
    return tmp


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path (same folder, same suffix) to write; it replaces `path` when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.tmp-", suffix=path.suffix)
    os.close(fd)
    os.chmod(tmp, umask_mode(0o666))
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Write bytes or text to `path` atomically (fsync'd before the rename)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 2, sort_keys: bool = True) -> None:
    atomic_write(path, json.dumps(obj, indent=indent, sort_keys=sort_keys) + "\n")


def save_figure(fig, path: str | os.PathLike, **savefig_kwargs) -> None:
    """fig.savefig to `path` atomically, then close the figure."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, **savefig_kwargs)
    finally:
        plt.close(fig)


def replace_dir(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Move a finished folder into place; an existing dst is swapped out first, then deleted."""
    src, dst = Path(src), Path(dst)
    if not os.path.lexists(dst):
        os.rename(src, dst)
        return
    old = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(dst, old)
    os.rename(src, dst)
    shutil.rmtree(old, ignore_errors=True)
