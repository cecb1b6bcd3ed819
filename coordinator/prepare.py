"""Turn a text corpus into byte-level token shards and their manifest (`prepare-data`).

Owns finding the documents, the train/validation split and the atomic install
of the data folder. The shard and manifest formats live in
:mod:`crowdtrain.protocol.shards`; the command line lives elsewhere.
"""

from __future__ import annotations

import codecs
import hashlib
import logging
import os
import platform
import shutil
import sysconfig
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from crowdtrain.protocol.errors import DataError, ShardError
from crowdtrain.protocol.shards import (
    MANIFEST_FILE,
    MANIFEST_VERSION,
    ShardEntry,
    ShardManifest,
    Split,
    load_manifest,
    write_shard,
)

logger = logging.getLogger(__name__)

STDLIB = "stdlib"
"""The source name for this Python's own standard library (its ``.py`` files)."""

TEXT_SUFFIXES = frozenset(
    {".txt", ".text", ".md", ".markdown", ".rst", ".tex", ".py", ".json", ".jsonl", ".csv", ".tsv"}
)
"""Suffixes (any case) of the files taken from a source folder; a file named
explicitly as a source is taken whatever its suffix."""

END_OF_DOCUMENT = 0  # the same byte as crowdtrain.model.tokenizer.EOD_BYTE
MIN_SHARD_TOKENS = 1024
_STDLIB_SKIPPED_FOLDERS = frozenset({"site-packages", "dist-packages", "__pycache__"})
_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class PrepareConfig:
    """What `prepare-data` reads and where it writes.

    ``sources`` are ``"stdlib"`` (this Python's standard library: the same
    bytes on every machine with the same Python version), text files (taken
    whatever their suffix) or folders (searched recursively for
    :data:`TEXT_SUFFIXES`, skipping hidden files and folders). Train shards
    hold exactly ``shard_tokens`` tokens, the last one fewer; a node leases a
    shard at a time, so shards of 1 Mi tokens suit most links. About
    ``val_fraction`` of the documents, at most ``max_val_tokens`` tokens, are
    held out as the one validation shard.
    """

    sources: tuple[str, ...]
    out: Path
    shard_tokens: int = 1_048_576
    val_fraction: float = 0.005
    max_val_tokens: int = 262_144

    def __post_init__(self) -> None:
        sources = (self.sources,) if isinstance(self.sources, str | os.PathLike) else self.sources
        object.__setattr__(self, "sources", tuple(os.fspath(s) for s in sources))
        object.__setattr__(self, "out", Path(self.out))
        if not self.sources:
            raise DataError(
                "no sources given; pass --source with folders or files of UTF-8 text "
                f"(or --source {STDLIB})"
            )
        if self.shard_tokens < MIN_SHARD_TOKENS:
            raise DataError(
                f"shard_tokens {self.shard_tokens} is too small; pass --shard-tokens "
                f"{MIN_SHARD_TOKENS} or more (default 1048576)"
            )
        if not 0 <= self.val_fraction < 0.5:
            raise DataError(
                f"val_fraction {self.val_fraction} is outside [0, 0.5); pass --val-fraction "
                "between 0 and 0.5 (default 0.005)"
            )
        if self.max_val_tokens < 1:
            raise DataError(
                f"max_val_tokens {self.max_val_tokens} must be at least 1; "
                "pass --max-val-tokens 1 or more (default 262144)"
            )


@dataclass(frozen=True)
class _Document:
    path: Path
    name: str  # path relative to its source, with '/' separators; decides the split
    num_bytes: int


def prepare_data(config: PrepareConfig) -> ShardManifest:
    """Tokenize the sources into shards and a manifest in ``config.out``; return the manifest.

    Each document is its UTF-8 bytes followed by the end-of-document byte 0.
    Files that are empty, not UTF-8 or that contain NUL bytes are skipped with
    a warning. Output appears all at once: everything is written next to
    ``out`` first, and a previous data folder there is replaced only when the
    new one is complete. The same sources give byte-identical output.
    """
    out = config.out.resolve()
    _check_out(out)
    documents, num_skipped = _scan(_list_files(config.sources, exclude=out))
    if not documents:
        raise DataError(
            f"no text found in {', '.join(config.sources)}; "
            "pass --source with folders or files of UTF-8 text"
        )
    if len(documents) < 2:
        raise DataError(
            f"only one document found in {', '.join(config.sources)} ({documents[0].path}); "
            "one is held out for validation, so pass more files or split the text into several"
        )
    to_val = _split(documents, config)

    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        manifest = _write(documents, to_val, work, config)
        os.chmod(work, 0o755)  # mkdtemp makes it private
        _check_out(out)  # again: it may have changed while the corpus was read
        _install(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    logger.info(
        "prepared %s: %d documents (%d skipped), %d train tokens in %d shards, "
        "%d val tokens; manifest %s",
        out,
        len(documents),
        num_skipped,
        manifest.num_train_tokens,
        len(manifest.train_shards),
        sum(s.num_tokens for s in manifest.val_shards),
        manifest.hash[:12],
    )
    return manifest


def _check_out(out: Path) -> None:
    """Refuse an ``out`` that holds anything but an earlier data folder."""
    if not out.exists():
        return
    if not out.is_dir():
        raise DataError(f"--out {out} is a file; pass a folder (new, empty or an earlier output)")
    names = set(os.listdir(out))
    if not names:
        return
    try:
        ours = {MANIFEST_FILE, *(s.file for s in load_manifest(out).shards)}
    except ShardError:
        ours = set()
    if not names <= ours:
        raise DataError(
            f"--out {out} is not empty and is not a crowdtrain data folder; "
            "pass a new or empty folder (nothing was changed)"
        )


def _list_files(sources: tuple[str, ...], exclude: Path) -> list[tuple[Path, str, int]]:
    """``(path, name, size)`` of every candidate file, in a fixed order, each once."""
    found: list[tuple[Path, str]] = []
    for source in sources:
        if source == STDLIB:
            root = Path(sysconfig.get_paths()["stdlib"])
            found += _walk(
                root,
                keep_folder=lambda name: name not in _STDLIB_SKIPPED_FOLDERS,
                keep_file=lambda name: name.endswith(".py"),
            )
            continue
        path = Path(source)
        if path.is_dir():
            found += _walk(
                path,
                keep_folder=lambda name: not name.startswith("."),
                keep_file=lambda name: (
                    not name.startswith(".") and Path(name).suffix.lower() in TEXT_SUFFIXES
                ),
            )
        elif path.is_file():
            found.append((path, path.name))
        elif path.exists():
            raise DataError(f"source {source} is neither a file nor a folder; pass text files")
        else:
            raise DataError(
                f"source {source} does not exist; pass --source with folders or files "
                f"of UTF-8 text (or --source {STDLIB})"
            )
    files = []
    seen: set[Path] = set()
    for path, name in found:
        real = path.resolve()
        # --out may sit inside a source folder: never read our own output.
        if real in seen or real.is_relative_to(exclude):
            continue
        seen.add(real)
        try:
            files.append((path, name, path.stat().st_size))
        except OSError as e:
            logger.warning("skipping %s: %s", path, e.strerror)
    return files


def _walk(
    root: Path, keep_folder: Callable[[str], bool], keep_file: Callable[[str], bool]
) -> list[tuple[Path, str]]:
    found = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [name for name in subfolders if keep_folder(name)]
        for name in names:
            if keep_file(name):
                path = Path(folder, name)
                found.append((path, path.relative_to(root).as_posix()))
    return sorted(found, key=lambda item: item[1])


def _scan(files: list[tuple[Path, str, int]]) -> tuple[list[_Document], int]:
    """Keep the files that are non-empty UTF-8 text without NUL bytes."""
    documents = []
    num_skipped = 0
    total = sum(size for _, _, size in files)
    with tqdm(total=total, unit="B", unit_scale=True, desc="scanning", disable=None) as bar:
        for path, name, size in files:
            num_bytes, problem = _measure_text(path)
            bar.update(size)
            if problem is None and num_bytes > 0:
                documents.append(_Document(path, name, num_bytes))
                continue
            num_skipped += 1
            if problem is not None:
                logger.warning("skipping %s: %s", path, problem)
    return documents, num_skipped


def _measure_text(path: Path) -> tuple[int, str | None]:
    """The file's size in bytes, and why it is not usable text (None when it is)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    num_bytes = 0
    try:
        with path.open("rb") as f:
            while chunk := f.read(_CHUNK_BYTES):
                num_bytes += len(chunk)
                if b"\0" in chunk:
                    return num_bytes, "it contains NUL bytes"
                decoder.decode(chunk)
            decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return num_bytes, "it is not valid UTF-8"
    except OSError as e:
        return num_bytes, f"it cannot be read ({e.strerror})"
    return num_bytes, None


def _split(documents: list[_Document], config: PrepareConfig) -> list[bool]:
    """Which documents go to validation.

    A document is held out when the hash of its name falls below
    ``val_fraction`` and it still fits in ``max_val_tokens``; the choice thus
    depends on names only, not on the order or the other files. Both splits
    must be non-empty, so a small corpus holds out its last document that fits.
    """
    to_val = []
    num_val_tokens = 0
    for doc in documents:
        score = int(hashlib.sha256(doc.name.encode()).hexdigest()[:8], 16) / 2**32
        held_out = score < config.val_fraction
        if held_out and num_val_tokens + doc.num_bytes + 1 <= config.max_val_tokens:
            num_val_tokens += doc.num_bytes + 1
        else:
            held_out = False
        to_val.append(held_out)
    if not any(to_val):
        fitting = [i for i, doc in enumerate(documents) if doc.num_bytes < config.max_val_tokens]
        to_val[fitting[-1] if fitting else -1] = True
    if all(to_val):
        to_val[-1] = False
    return to_val


class _ShardStream:
    """Cuts a stream of byte tokens into shards of exactly ``shard_tokens`` tokens (the last fewer)."""

    def __init__(self, folder: Path, split: Split, shard_tokens: int) -> None:
        self.folder = folder
        self.split = split
        self.shard_tokens = shard_tokens
        self.entries: list[ShardEntry] = []
        self._buffer = bytearray()

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            room = self.shard_tokens - len(self._buffer)
            self._buffer += view[:room]
            view = view[room:]
            if len(self._buffer) == self.shard_tokens:
                self._flush()

    def close(self) -> list[ShardEntry]:
        if self._buffer:
            self._flush()
        return self.entries

    def _flush(self) -> None:
        shard_id = f"{self.split}-{len(self.entries):05d}"
        file = f"{shard_id}.bin"
        tokens = np.frombuffer(self._buffer, dtype=np.uint8)
        size_bytes, sha256 = write_shard(self.folder / file, tokens, "uint8")
        self.entries.append(ShardEntry(shard_id, file, self.split, len(tokens), size_bytes, sha256))
        self._buffer = bytearray()


def _write(
    documents: list[_Document], to_val: list[bool], folder: Path, config: PrepareConfig
) -> ShardManifest:
    """Write the shards and the manifest into ``folder``, reading each document in chunks."""
    num_val_tokens = sum(
        doc.num_bytes + 1 for doc, val in zip(documents, to_val, strict=True) if val
    )
    train = _ShardStream(folder, "train", config.shard_tokens)
    val = _ShardStream(folder, "val", num_val_tokens)
    end = bytes([END_OF_DOCUMENT])
    total = sum(doc.num_bytes for doc in documents)
    with tqdm(total=total, unit="B", unit_scale=True, desc="writing", disable=None) as bar:
        for doc, is_val in zip(documents, to_val, strict=True):
            stream = val if is_val else train
            num_bytes = 0
            try:
                with doc.path.open("rb") as f:
                    while chunk := f.read(_CHUNK_BYTES):
                        if num_bytes + len(chunk) > doc.num_bytes or b"\0" in chunk:
                            break
                        stream.write(chunk)
                        num_bytes += len(chunk)
                        bar.update(len(chunk))
            except OSError as e:
                raise DataError(f"cannot read {doc.path}: {e.strerror}; run again") from e
            if num_bytes != doc.num_bytes:
                raise DataError(
                    f"{doc.path} changed while it was being prepared; "
                    "run again when nothing writes to the corpus"
                )
            stream.write(end)
    manifest = ShardManifest(
        version=MANIFEST_VERSION,
        tokenizer="byte",
        vocab_size=256,
        dtype="uint8",
        shards=(*train.close(), *val.close()),
        source=f"{len(documents)} documents from {_describe(config.sources)}",
    )
    (folder / MANIFEST_FILE).write_text(manifest.to_json() + "\n", encoding="ascii")
    return manifest


def _describe(sources: tuple[str, ...]) -> str:
    return ", ".join(
        f"the Python {platform.python_version()} standard library" if s == STDLIB else s
        for s in sources
    )


def _install(work: Path, out: Path) -> None:
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
