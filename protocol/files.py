"""Files that are either whole or absent: atomic writes.

Everything crowdtrain keeps on disk and reads back later (an identity key, a
checkpoint and its sidecar, a node's place in its shard, the coordinator's
ports) is written here: to a temporary file beside the target, flushed to
disk, renamed over the target, and the folder flushed, so a crash or a full
disk leaves the previous file or none, never half of one. Standard library
only: every package may use it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

TEMP_SUFFIX = ".tmp"
"""Temporary files are named ``.<target name>.<random>.tmp`` beside their target."""

_DEFAULT_MODE = 0o666  # less the process's umask, as open() does


def temp_name(path: Path) -> Path:
    """A fresh temporary name beside ``path`` (hidden, ending in :data:`TEMP_SUFFIX`)."""
    return path.with_name(f".{path.name}.{secrets.token_hex(6)}{TEMP_SUFFIX}")


def fsync_folder(folder: Path) -> None:
    """Flush a folder's entries to disk (a rename is durable only then); a no-op where
    folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on folders; the rename itself still happened
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for a writer to fill; when the block ends
    without an error the file is flushed to disk and renamed to ``path``.

    The temporary file exists, empty, when the block starts, created with ``mode``
    (``0o600`` for a secret; default: ``0o666`` less the umask), so a secret is never
    readable by others, not even for a moment. On any error it is removed and
    ``path`` is as it was. The folder must exist.
    """
    path = Path(path)
    temp = temp_name(path)
    fd = os.open(
        temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _DEFAULT_MODE if mode is None else mode
    )
    os.close(fd)
    try:
        yield temp
        with open(temp, "rb+") as file:
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


def atomic_write(path: str | Path, data: bytes | str, mode: int | None = None) -> None:
    """Write ``data`` (text is UTF-8) to ``path`` atomically; see :func:`atomic_path`."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_path(path, mode) as temp, open(temp, "wb") as file:
        file.write(payload)


__all__ = ["TEMP_SUFFIX", "atomic_path", "atomic_write", "fsync_folder", "temp_name"]
