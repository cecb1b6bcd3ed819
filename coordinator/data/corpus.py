"""Reading a corpus as documents: which kind each source is, and text and JSON Lines files.

Owns finding the documents of each source, their stable keys, and what is
skipped as bad input and why. Parquet, ``datasets`` folders and hub datasets
are read by :mod:`crowdtrain.coordinator.data.arrow_sources`, which imports
``pyarrow`` and ``datasets`` only when such a source is read. Knows nothing about tokenizers, shards or the
train/validation split; :mod:`crowdtrain.coordinator.data.prepare` drives it.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from crowdtrain.coordinator.data.arrow_sources import DatasetFolder, HubDataset, ParquetSource
from crowdtrain.coordinator.data.documents import (
    DATASET_MARKERS,
    HUB_PREFIX,
    Document,
    Fields,
    Progress,
    Skips,
)
from crowdtrain.protocol.errors import DataError

logger = logging.getLogger(__name__)


STDLIB = "stdlib"
"""The source name for this Python's own standard library (its ``.py`` files)."""


JSONL_SUFFIX = ".jsonl"


PARQUET_SUFFIX = ".parquet"


TEXT_SUFFIXES = frozenset(
    {".txt", ".text", ".md", ".markdown", ".rst", ".tex", ".py", ".json", ".csv", ".tsv"}
)
"""Suffixes (any case) of the plain text files taken from a source folder, besides
``.jsonl`` and ``.parquet``; a file named explicitly as a source is taken
whatever its suffix."""


_STDLIB_SKIPPED_FOLDERS = frozenset({"site-packages", "dist-packages", "__pycache__"})


_BINARY_PROBE_BYTES = 8000  # as git and grep do


class _Source(Protocol):
    @property
    def size_bytes(self) -> int | None:
        """Bytes on disk, for the progress bar; None when unknown."""
        ...

    def read(self, skips: Skips, progress: Progress) -> Iterator[tuple[str, str]]:
        """``(key, text)`` of each document, in a fixed order; the same on every call."""
        ...


class Corpus:
    """Every document of the sources, in a fixed order, as many times as asked.

    ``sources`` are ``"stdlib"``, text files and folders (searched for
    :data:`TEXT_SUFFIXES`, ``.jsonl`` and ``.parquet``, skipping hidden names),
    ``.jsonl`` and ``.parquet`` files, ``datasets`` folders made by
    ``save_to_disk`` and ``hf:NAME[:SPLIT]``. JSON Lines, Parquet and datasets
    take their text from ``text_field``; a folder holding a dataset dict and a
    hub dataset without ``:SPLIT`` use ``split``. Hub datasets are streamed
    once and kept in an unnamed temporary file in ``spool_dir`` for later
    reads. Files under ``exclude`` are never read.
    """

    def __init__(
        self,
        sources: tuple[str, ...],
        text_field: str,
        split: str,
        exclude: Path,
        spool_dir: Path,
    ) -> None:
        self.sources = sources
        self._seen: set[tuple[int, int]] = set()  # (device, inode) of the files read
        self._parts: list[_Source] = _resolve(
            sources, text_field, split, exclude, spool_dir, self._seen
        )
        sizes = [part.size_bytes for part in self._parts]
        self.size_bytes: int | None = None if None in sizes else sum(s or 0 for s in sizes)

    def documents(self, skips: Skips, progress: Progress) -> Iterator[Document]:
        """Each usable document once, in corpus order; what is not usable goes to ``skips``."""
        self._seen.clear()
        for part in self._parts:
            for key, text in part.read(skips, progress):
                try:
                    data = text.encode("utf-8")
                except UnicodeEncodeError:
                    skips.not_utf8(key, "its text has a lone surrogate")
                    continue
                if not data:
                    skips.empty(key)
                elif b"\0" in data:
                    skips.binary(key)
                else:
                    yield Document(key, text, data)

    def describe(self) -> str:
        return ", ".join(
            f"the Python {platform.python_version()} standard library" if s == STDLIB else s
            for s in self.sources
        )

    def close(self) -> None:
        for part in self._parts:
            close = getattr(part, "close", None)  # only a hub dataset holds a file open
            if close is not None:
                close()


def _resolve(
    sources: tuple[str, ...],
    text_field: str,
    split: str,
    exclude: Path,
    spool_dir: Path,
    seen: set[tuple[int, int]],
) -> list[_Source]:
    parts: list[_Source] = []
    for source in sources:
        if source == STDLIB:
            stdlib = Path(sysconfig.get_paths()["stdlib"])
            parts.append(_Files(stdlib, text_field, exclude, seen, _STDLIB_RULES))
        elif source.startswith(HUB_PREFIX):
            name, _, hub_split = source[len(HUB_PREFIX) :].partition(":")
            if not name:
                raise DataError(f"source {source} names no dataset; pass hf:NAME or hf:NAME:SPLIT")
            parts.append(HubDataset(name, hub_split or split, text_field, spool_dir))
        elif any((Path(source) / marker).is_file() for marker in DATASET_MARKERS):
            parts.append(DatasetFolder(Path(source), split, text_field))
        elif os.path.isdir(source):
            parts.append(_Files(Path(source), text_field, exclude, seen, _FOLDER_RULES))
        elif os.path.isfile(source):
            parts.append(_Files(Path(source), text_field, exclude, seen))
        elif os.path.exists(source):
            raise DataError(f"source {source} is neither a file nor a folder; pass text files")
        else:
            raise DataError(
                f"source {source} does not exist; pass --source with folders or files "
                f"of UTF-8 text, .jsonl, .parquet, a datasets folder, hf:NAME (or {STDLIB})"
            )
    return parts


_Rules = tuple[Callable[[str], bool], Callable[[str], bool]]
"""Which folders to enter and which files to take, by name."""


_STDLIB_RULES: _Rules = (
    lambda folder: folder not in _STDLIB_SKIPPED_FOLDERS,
    lambda file: file.endswith(".py"),
)


_FOLDER_RULES: _Rules = (
    lambda folder: not folder.startswith("."),
    lambda file: (
        not file.startswith(".")
        and os.path.splitext(file)[1].lower() in {*TEXT_SUFFIXES, JSONL_SUFFIX, PARQUET_SUFFIX}
    ),
)


def _walk(folder: str, prefix: str, rules: _Rules, exclude: str) -> Iterator[tuple[str, str, bool]]:
    """``(path, name, is_link)`` of the files under ``folder``, sorted by ``name`` (their
    path relative to the root, with '/'). Lists one folder at a time, so memory holds
    one listing per level, never the whole tree; never enters ``exclude``."""
    try:
        with os.scandir(folder) as entries:
            children = []
            for entry in entries:
                try:
                    is_folder = entry.is_dir()
                    is_link = entry.is_symlink()
                except OSError:
                    is_folder = is_link = False
                if is_folder and is_link:
                    continue  # like os.walk: never follow links to folders
                # A folder sorts as "name/": names come in the order of their full paths.
                key = entry.name + "/" if is_folder else entry.name
                children.append((key, is_folder, is_link, entry.name))
    except OSError as e:
        logger.warning("skipping folder %s: %s", folder, e.strerror)
        return
    keep_folder, keep_file = rules
    for _, is_folder, is_link, name in sorted(children):
        path = os.path.join(folder, name)
        if is_folder and keep_folder(name) and not _is_within(os.path.realpath(path), exclude):
            yield from _walk(path, f"{prefix}{name}/", rules, exclude)
        elif not is_folder and keep_file(name):
            yield path, f"{prefix}{name}", is_link


def _is_within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


class _Files:
    """A file named as a source, or every kept file under a folder, each read once.

    Keys are paths relative to the folder (the file's name for a file named
    as a source). A file already read from an earlier source, or one under
    ``exclude``, is left out.
    """

    def __init__(
        self,
        path: Path,
        text_field: str,
        exclude: Path,
        seen: set[tuple[int, int]],
        rules: _Rules | None = None,  # None: path is a file
    ) -> None:
        self.path = path
        self.text_field = text_field
        self.exclude = str(exclude)
        self._seen = seen
        self._rules = rules
        self.size_bytes: int | None = 0
        for file, _, _ in self._files():
            try:
                self.size_bytes += os.stat(file).st_size
            except OSError:
                pass

    def _files(self) -> Iterator[tuple[str, str, bool]]:
        if self._rules is None:
            yield str(self.path), self.path.name, True
        elif not _is_within(os.path.realpath(self.path), self.exclude):
            yield from _walk(str(self.path), "", self._rules, self.exclude)

    def read(self, skips: Skips, progress: Progress) -> Iterator[tuple[str, str]]:
        for file, name, check_real_path in self._files():
            try:
                stat = os.stat(file)
            except OSError as e:
                skips.skip("unreadable", file, f"it cannot be read ({e.strerror})")
                continue
            if (stat.st_dev, stat.st_ino) in self._seen:
                continue
            # --out may sit inside a source folder: never read our own output.
            if check_real_path and _is_within(os.path.realpath(file), self.exclude):
                continue
            self._seen.add((stat.st_dev, stat.st_ino))
            path = Path(file)
            suffix = path.suffix.lower()
            reader: _Source
            if suffix == JSONL_SUFFIX:
                reader = _JsonLines(path, name, stat.st_size, self.text_field)
            elif suffix == PARQUET_SUFFIX:
                reader = ParquetSource(path, name, stat.st_size, self.text_field)
            else:
                reader = _TextFile(path, name, stat.st_size)
            yield from reader.read(skips, progress)


@dataclass
class _TextFile:
    """A whole file is one document; its key is its path relative to its source."""

    path: Path
    name: str
    size_bytes: int

    def read(self, skips: Skips, progress: Progress) -> Iterator[tuple[str, str]]:
        where = str(self.path)
        try:
            data = self.path.read_bytes()
        except OSError as e:
            skips.skip("unreadable", where, f"it cannot be read ({e.strerror})")
            return
        finally:
            progress(self.size_bytes)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            skips.not_utf8(where, f"it is not valid UTF-8 (byte {e.start})")
            return
        if b"\0" in data:
            skips.binary(where)
        elif not data:
            skips.empty(where)
        else:
            yield self.name, text


@dataclass
class _JsonLines:
    """One document per line, from ``text_field``; keys are ``name:line``."""

    path: Path
    name: str
    size_bytes: int
    text_field: str

    def read(self, skips: Skips, progress: Progress) -> Iterator[tuple[str, str]]:
        num_lines = 0
        fields = Fields(self.text_field, str(self.path))
        try:
            with self.path.open("rb") as f:
                # JSON never holds a raw NUL: one near the start means a binary file.
                if b"\0" in f.read(_BINARY_PROBE_BYTES):
                    progress(self.size_bytes)
                    skips.binary(str(self.path))
                    return
                f.seek(0)
                for number, line in enumerate(f, start=1):
                    progress(len(line))
                    if not line.strip():
                        continue
                    num_lines += 1
                    where = f"{self.path} line {number}"
                    try:
                        record = json.loads(line.decode("utf-8"))
                    except UnicodeDecodeError as e:
                        skips.not_utf8(where, f"byte {e.start} is not UTF-8")
                        continue
                    except ValueError as e:
                        skips.skip(
                            "not a JSON object", where, f"it is not JSON ({e})", "fix or remove it"
                        )
                        continue
                    if not isinstance(record, dict):
                        skips.skip(
                            "not a JSON object",
                            where,
                            f"it is a JSON {type(record).__name__}, not an object",
                            'write one object per line, like {"text": "..."}',
                        )
                    elif (text := fields.text(record, where, skips)) is not None:
                        yield f"{self.name}:{number}", text
        except OSError as e:
            raise DataError(f"cannot read {self.path}: {e.strerror}; run again") from e
        fields.check()
        if not num_lines:
            skips.empty(str(self.path), "it has no lines")
