"""Where ``prepare-data`` writes: the output folder, refused or replaced as a whole.

Owns the checks on ``--out`` (new, empty, or an earlier data folder, of this
or an older format, and nothing else), creating its missing parents (and
removing them again on failure), and installing the finished folder in its
place with renames, so a reader sees the old folder or the new one, never a
mix. Knows nothing about what the folder holds beyond its manifest's file list.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

from crowdtrain.protocol.errors import DataError, ShardError
from crowdtrain.protocol.shards import MANIFEST_FILE, MANIFEST_VERSION, load_manifest


def make_folder(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; return those created, deepest first."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        path.mkdir(exist_ok=True)
    return missing


def check_out(out: Path) -> None:
    """Refuse an ``out`` that holds anything but an earlier data folder."""
    if not out.exists():
        return
    if not out.is_dir():
        raise DataError(f"--out {out} is a file; pass a folder (new, empty or an earlier output)")
    names = set(os.listdir(out))
    if names and not names <= _earlier_output(out):
        raise DataError(
            f"--out {out} is not empty and is not a crowdtrain data folder; "
            "pass a new or empty folder (nothing was changed)"
        )


def _earlier_output(out: Path) -> set[str]:
    """The files of an earlier data folder in ``out``, of this or an older format."""
    try:
        manifest = load_manifest(out)
        files = [s.file for s in manifest.shards] + [manifest.tokenizer_file]
    except ShardError:
        # An older crowdtrain's output is replaced too: its manifest names its files.
        try:
            data = json.loads((out / MANIFEST_FILE).read_bytes())
            if not isinstance(data["version"], int) or data["version"] >= MANIFEST_VERSION:
                return set()
            files = [item["file"] for item in data["shards"]] + [data.get("tokenizer_file")]
        except (OSError, ValueError, AttributeError, KeyError, TypeError):
            return set()
    return {MANIFEST_FILE, *(f for f in files if isinstance(f, str) and f and "/" not in f)}


def install(work: Path, out: Path) -> None:
    """Move the finished folder ``work`` to ``out``, replacing an earlier data folder there."""
    if not out.exists() or not any(out.iterdir()):
        os.replace(work, out)  # also replaces an empty folder
        return
    # Two renames: the old folder is gone only once the new one is in place.
    old = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.old")
    os.replace(out, old)
    try:
        os.replace(work, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old)
