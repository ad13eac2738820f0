"""Manifests: `manifest.json` records the size and sha256 of every file of a folder, written last.

A checkpoint (`checkpoints/step_N/`) is sealed with one after all its files are written; whoever reads
it later (resume, eval.py, `from_pretrained` on its `model/` folder, `python -m powerattn.training.verify`)
can tell an intact folder from a truncated or damaged one before loading anything. Checking sizes costs
a directory listing; checking hashes reads every byte (sha256, ~1 GB/s per core; files are spread over
threads, and over ranks when a run saves or resumes). Standard library only.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from powerattn.atomic import atomic_write

MANIFEST = "manifest.json"
FORMAT = "powerattn.manifest/1"
ALGORITHM = "sha256"
LEVELS = ("hash", "size", "none")  # how much `verify` checks: every byte, file sizes, nothing
_CHUNK = 8 << 20


class ManifestError(ValueError):
    """A folder whose files do not match its manifest (or whose manifest is missing or unreadable)."""


def umask_mode(mode: int) -> int:
    """`mode` as the user's umask allows (0o666 -> 0o644 under umask 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def publish_permissions(folder: str | os.PathLike) -> None:
    """Give `folder` and everything under it the permissions the umask asks for (0755 / 0644 under 022).

    Temporary folders (0700) and some writers (safetensors: 0600) create private entries; a checkpoint
    is meant to be read by the user's group too.
    """
    folder = Path(folder)
    dirs, files = umask_mode(0o777), umask_mode(0o666)
    os.chmod(folder, dirs)
    for root, dirnames, filenames in os.walk(folder):
        for d in dirnames:
            os.chmod(os.path.join(root, d), dirs)
        for f in filenames:
            os.chmod(os.path.join(root, f), files)


def list_files(folder: str | os.PathLike) -> dict[str, int]:
    """Relative path (POSIX) -> size of every file under `folder`, the manifest itself excluded."""
    folder = Path(folder)
    out = {}
    for root, _, filenames in os.walk(folder):
        for f in filenames:
            rel = Path(root, f).relative_to(folder).as_posix()
            if rel != MANIFEST:
                out[rel] = os.path.getsize(os.path.join(root, f))
    return dict(sorted(out.items()))


def hash_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)  # hashlib releases the GIL on large buffers: threads hash in parallel
    return h.hexdigest()


def hash_files(folder: str | os.PathLike, names: Iterable[str], threads: int | None = None) -> dict[str, str]:
    """sha256 of each named file (relative to `folder`), a few files at a time."""
    names = list(names)
    threads = threads or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max(1, min(threads, len(names) or 1))) as pool:
        return dict(zip(names, pool.map(lambda n: hash_file(Path(folder, n)), names)))


def split_work(sizes: dict[str, int], parts: int) -> list[list[str]]:
    """Files dealt to `parts` workers with about equal bytes each (largest first); the same on every rank."""
    loads, out = [0] * parts, [[] for _ in range(parts)]
    for name, size in sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0])):
        i = loads.index(min(loads))
        out[i].append(name)
        loads[i] += size
    return out


def write_manifest(folder: str | os.PathLike, files: dict[str, dict]) -> Path:
    """Write `folder/manifest.json` ({path: {size, sha256}}) atomically (temporary file, fsync, rename)."""
    path = Path(folder) / MANIFEST
    atomic_write(path, json.dumps({"format": FORMAT, "algorithm": ALGORITHM, "files": dict(sorted(files.items()))},
                                  indent=1) + "\n")
    return path


def seal(folder: str | os.PathLike) -> Path:
    """Hash every file of `folder` and write its manifest (one process; checkpoints spread the work over ranks)."""
    sizes = list_files(folder)
    digests = hash_files(folder, sizes)
    return write_manifest(folder, {n: {"size": sizes[n], ALGORITHM: digests[n]} for n in sizes})


def read_manifest(folder: str | os.PathLike) -> dict[str, dict]:
    """The {path: {size, sha256}} entries of `folder/manifest.json`; ManifestError if absent or unreadable."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{folder} has no {MANIFEST} (an interrupted write; or saved by an older version: "
                            "python -m powerattn.training.verify --seal adopts it)")
    try:
        data = json.loads(path.read_text())
        files = data["files"]
        if data.get("format") != FORMAT or not all(isinstance(e.get("size"), int) for e in files.values()):
            raise ValueError(f"format {data.get('format')!r}")
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path} is unreadable ({type(e).__name__}: {e})") from None
    return files


def is_ours(path: str | os.PathLike) -> bool:
    """Whether `path` is a manifest.json of this format (other tools write files of that name too).

    An unreadable one counts as ours when it sits in a checkpoint (beside trainer_state.json): a
    damaged manifest must not turn the check off.
    """
    path = Path(path)
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError:
        return False
    except ValueError:
        return (path.parent / "trainer_state.json").is_file()
    return isinstance(data, dict) and data.get("format") == FORMAT


def size_problems(folder: str | os.PathLike, files: dict[str, dict]) -> list[str]:
    """Entries whose file is missing or has another size than recorded."""
    out = []
    for name, entry in files.items():
        p = Path(folder, name)
        if not p.is_file():
            out.append(f"{name} is missing")
        elif (size := os.path.getsize(p)) != entry["size"]:
            out.append(f"{name} has {size} bytes, the manifest says {entry['size']}")
    return out


def hash_problems(folder: str | os.PathLike, files: dict[str, dict], names: Iterable[str] | None = None) -> list[str]:
    """Entries (all, or `names`) whose content hash differs from the recorded one (sizes must match first)."""
    names = list(files if names is None else names)
    digests = hash_files(folder, names)
    return [f"{n} does not match its recorded sha256" for n in names if digests[n] != files[n][ALGORITHM]]


def describe(folder: str | os.PathLike, problems: list[str]) -> str:
    """One line: what is wrong with `folder` (the first two problems, and how many more)."""
    more = f" (and {len(problems) - 2} more)" if len(problems) > 2 else ""
    return f"{folder} is damaged: {'; '.join(problems[:2])}{more}"


def verify(folder: str | os.PathLike, level: str = "hash", prefix: str = "") -> None:
    """Raise ManifestError (one line) unless `folder` matches its manifest at `level` (hash | size | none).

    prefix: check only the entries under that sub-folder (e.g. "model/").
    """
    if level not in LEVELS:
        raise ValueError(f"verify level {level!r} is not one of {LEVELS}")
    if level == "none":
        return
    files = {n: e for n, e in read_manifest(folder).items() if n.startswith(prefix)}
    problems = size_problems(folder, files)
    if not problems and level == "hash":
        problems = hash_problems(folder, files)
    if problems:
        raise ManifestError(describe(Path(folder, prefix) if prefix else folder, problems))


def find_manifest(path: str | os.PathLike) -> tuple[Path, str] | None:
    """(folder holding the manifest, prefix of `path` inside it) for a sealed folder or a sub-folder of one
    (a checkpoint's model/), else None."""
    path = Path(path)
    if is_ours(path / MANIFEST):
        return path, ""
    if is_ours(path.parent / MANIFEST):
        return path.parent, path.name + "/"
    return None


def verify_if_sealed(path: str | os.PathLike, level: str = "hash") -> bool:
    """verify() the manifest that covers `path` if there is one; returns whether there was."""
    found = find_manifest(path)
    if found is None or level == "none":
        return found is not None
    verify(found[0], level, found[1])
    return True
