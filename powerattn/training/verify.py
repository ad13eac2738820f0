"""Check a run folder's checkpoints against their manifests (one line each); exit status 1 if any is damaged.

    python -m powerattn.training.verify outputs/<run>                      # every checkpoint, and `latest`
    python -m powerattn.training.verify outputs/<run>/checkpoints/step_000100 --level size
    python -m powerattn.training.verify --seal outputs/<run>/checkpoints/step_000100   # adopt an unsealed one

`--level hash` (default) reads every byte (sha256); `size` compares file sizes only. `--seal` writes a
manifest for a checkpoint saved before manifests existed, recording its files as they are now.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from powerattn import manifest
from powerattn.manifest import MANIFEST, ManifestError

STATE_FILE = "trainer_state.json"  # powerattn.training.checkpoint.STATE_FILE (not imported: no torch here)


def _checkpoints(path: Path) -> tuple[list[Path], Path | None]:
    """(checkpoint folders to check, the checkpoints/ folder whose `latest` to report, if any)."""
    if (path / MANIFEST).is_file() or (path / STATE_FILE).is_file() or manifest.find_manifest(path):
        return [path], None
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    found = sorted(p for p in root.glob("step_*") if p.is_dir())
    return found, root if (root / "latest").exists() or found else None


def check(path: Path, level: str) -> str | None:
    """What is wrong with one checkpoint (or a sub-folder of one, e.g. its model/) at `level`, in one line."""
    found = manifest.find_manifest(path)
    if found is None:
        return f"{path} has no {MANIFEST} (an interrupted write, or saved by an older version: --seal adopts it)"
    try:
        manifest.verify(found[0], level, found[1])
    except ManifestError as e:
        return str(e)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m powerattn.training.verify", description=__doc__.split("\n")[0])
    parser.add_argument("path", type=Path, help="a run folder, its checkpoints/ folder, or one checkpoint")
    parser.add_argument("--level", choices=("hash", "size"), default="hash")
    parser.add_argument("--seal", action="store_true", help="write a manifest for an unsealed checkpoint folder")
    args = parser.parse_args(argv)
    path = args.path
    if not path.is_dir():
        print(f"error: no folder at {str(path)!r}", file=sys.stderr)
        return 2
    if args.seal:
        if not (path / STATE_FILE).is_file():
            print(f"error: {path} is not a checkpoint folder (no {STATE_FILE})", file=sys.stderr)
            return 2
        if manifest.is_ours(path / MANIFEST):
            print(f"error: {path} is sealed already; check it without --seal", file=sys.stderr)
            return 2
        print(f"sealed {path}: {manifest.seal(path)}")
        return 0
    folders, root = _checkpoints(path)
    if not folders:
        print(f"error: no checkpoints under {path}", file=sys.stderr)
        return 2
    results = {folder: check(folder, args.level) for folder in folders}
    for folder, problem in results.items():
        print(f"ok       {folder}" if problem is None else f"DAMAGED  {problem}")
    bad = sum(p is not None for p in results.values())
    if root is not None:
        pointer = root / "latest"
        name = pointer.read_text().strip() if pointer.is_file() else None
        ok = name is not None and results.get(root / name, "missing") is None
        print(f"latest   {name or '(none)'}" + ("" if ok else "  (not an intact checkpoint)"))
        bad += not ok and name is not None
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
