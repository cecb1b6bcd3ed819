"""Turn a corpus into token shards and their manifest (`prepare-data`).

Owns the tokenizer of the data (bytes, or a BPE trained here), the
train/validation split, cutting token streams into shards and the atomic
install of the data folder. Reading sources lives in
:mod:`crowdtrain.coordinator.data.corpus`, the shard and manifest formats in
:mod:`crowdtrain.protocol.shards`; the command line lives elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from tqdm import tqdm

from crowdtrain.coordinator.data.corpus import STDLIB, Corpus, Document, Skips
from crowdtrain.protocol.errors import DataError, ShardError
from crowdtrain.protocol.shards import (
    MANIFEST_FILE,
    MANIFEST_VERSION,
    ShardEntry,
    ShardManifest,
    Split,
    load_manifest,
    sha256_file,
    write_shard,
)

if TYPE_CHECKING:
    # crowdtrain.model imports torch: only a BPE run pays for that.
    from crowdtrain.model.tokenizer import BPETokenizer

logger = logging.getLogger(__name__)

END_OF_DOCUMENT = 0  # the same byte as crowdtrain.model.tokenizer.EOD_BYTE
MIN_SHARD_TOKENS = 1024
TOKENIZER_FILE = "tokenizer.json"
DEFAULT_BPE_VOCAB_SIZE = 4096
MIN_BPE_VOCAB_SIZE = 257  # as in crowdtrain.model.tokenizer: 256 bytes and the end of document
MAX_BPE_VOCAB_SIZE = 65535  # every id fits the uint16 of a shard
_BATCH_BYTES = 1 << 20
_BATCH_DOCUMENTS = 1024
# Off a terminal, progress is a log line at most this often.
_LOG_EVERY_S = 10.0


class _Progress:
    """Bytes read of a pass over the corpus: a bar on a terminal (with the shards written
    and tokens/s when tokenizing), else a log line every ``_LOG_EVERY_S`` at most."""

    def __init__(self, desc: str, total: int) -> None:
        self.desc, self.total = desc, total
        self.bar = tqdm(
            total=total, unit="B", unit_scale=True, desc=desc, disable=None, dynamic_ncols=True
        )
        self._started = self._last_log = time.monotonic()
        self._done = 0

    def update(self, num_bytes: int, num_tokens: int | None = None, num_shards: int = 0) -> None:
        self._done += num_bytes
        now = time.monotonic()
        rate = num_tokens / max(now - self._started, 1e-9) if num_tokens is not None else None
        if not self.bar.disable:
            if rate is not None:
                self.bar.set_postfix_str(f"{num_shards} shards, {rate:,.0f} tokens/s", False)
            self.bar.update(num_bytes)
        elif now - self._last_log >= _LOG_EVERY_S:
            self._last_log = now
            tokens = f", {num_shards} shards, {rate:,.0f} tokens/s" if rate is not None else ""
            logger.info(
                "%s: %.1f of %.1f MB (%.0f%%)%s",
                self.desc,
                self._done / 1e6,
                self.total / 1e6,
                100 * self._done / max(self.total, 1),
                tokens,
            )

    def close(self) -> None:
        self.bar.close()


@dataclass(frozen=True)
class PrepareConfig:
    """What `prepare-data` reads, how it tokenizes and where it writes.

    ``sources`` are what :class:`~crowdtrain.coordinator.data.corpus.Corpus` reads:
    ``"stdlib"`` (this Python's standard library: the same bytes on every
    machine with the same Python version), text files and folders, ``.jsonl``
    and ``.parquet`` files, ``datasets`` folders and ``hf:NAME[:SPLIT]``;
    ``text_field`` names the field or column that holds the text and ``split``
    the split of a dataset dict. Train shards hold exactly ``shard_tokens``
    tokens, the last one fewer; a node leases a shard at a time, so shards of
    1 Mi tokens suit most links. About ``val_fraction`` of the documents, at
    most ``max_val_tokens`` bytes of text, are held out as the one validation
    shard. ``tokenizer="bpe"`` trains a byte-level BPE of ``vocab_size`` ids
    (default 4096) on the first ``bpe_train_bytes`` of the corpus.
    """

    sources: tuple[str, ...]
    out: Path
    shard_tokens: int = 1_048_576
    val_fraction: float = 0.005
    max_val_tokens: int = 262_144
    text_field: str = "text"
    split: str = "train"
    tokenizer: Literal["byte", "bpe"] = "byte"
    vocab_size: int | None = None
    bpe_train_bytes: int = 100_000_000

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
        if not self.text_field:
            raise DataError("text_field is empty; pass --text-field with a field name")
        if self.tokenizer not in ("byte", "bpe"):
            raise DataError(f"tokenizer {self.tokenizer!r} is unknown; pass --tokenizer byte|bpe")
        if self.tokenizer == "byte" and self.vocab_size not in (None, 256):
            raise DataError(
                f"vocab_size {self.vocab_size} needs --tokenizer bpe; the byte tokenizer has 256"
            )
        if self.tokenizer == "bpe" and not (
            MIN_BPE_VOCAB_SIZE <= self.bpe_vocab_size <= MAX_BPE_VOCAB_SIZE
        ):
            raise DataError(
                f"vocab_size {self.bpe_vocab_size} is outside {MIN_BPE_VOCAB_SIZE}.."
                f"{MAX_BPE_VOCAB_SIZE}; pass --vocab-size in that range (256 bytes plus the "
                f"end-of-document token at least; shards hold uint16) (default "
                f"{DEFAULT_BPE_VOCAB_SIZE})"
            )
        if self.bpe_train_bytes < 1:
            raise DataError(
                f"bpe_train_bytes {self.bpe_train_bytes} must be at least 1; pass "
                "--bpe-train-bytes 1 or more (default 100000000)"
            )

    @property
    def bpe_vocab_size(self) -> int:
        """The BPE vocabulary asked for: ``vocab_size`` or 4096."""
        return DEFAULT_BPE_VOCAB_SIZE if self.vocab_size is None else self.vocab_size


def prepare_data(config: PrepareConfig) -> ShardManifest:
    """Tokenize the sources into shards and a manifest in ``config.out``; return the manifest.

    Each document is followed by an end-of-document token: the byte 0, or the
    BPE's ``<|endoftext|>``, whose ``tokenizer.json`` is written beside the
    manifest. Bad input (empty, binary or non-UTF-8 files, JSON Lines that are
    not objects, records without a string in ``text_field``) is skipped,
    logged and counted; a ``text_field`` that no record has raises
    :class:`DataError`. The corpus is read twice, never held in memory: once
    to check it, choose the split and train the BPE, once to write. Output
    appears all at once: everything is written next to ``out`` first, and a
    previous data folder there is replaced only when the new one is complete.
    The same sources give byte-identical output.
    """
    out = config.out.resolve()
    _check_out(out)
    corpus = Corpus(
        config.sources, config.text_field, config.split, exclude=out, spool_dir=out.parent
    )
    created = _make_folder(out.parent)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        skips = Skips()
        scan, tokenizer = _scan(corpus, skips, config)
        manifest = _write(corpus, scan, tokenizer, work, config)
        os.chmod(work, 0o755)  # mkdtemp makes it private
        _check_out(out)  # again: it may have changed while the corpus was read
        _install(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        for folder in created:
            try:
                folder.rmdir()
            except OSError:
                break
        raise
    finally:
        corpus.close()
    num_val_tokens = sum(s.num_tokens for s in manifest.val_shards)
    num_tokens = manifest.num_train_tokens + num_val_tokens
    logger.info(
        "prepared %s: %d documents (%s), %d train tokens in %d shards, %d val tokens, "
        "%.2f bytes per token (%s tokenizer, %d ids); manifest %s",
        out,
        scan.num_documents,
        skips.describe(),
        manifest.num_train_tokens,
        len(manifest.train_shards),
        num_val_tokens,
        sum(s.num_bytes for s in manifest.shards) / max(num_tokens, 1),
        manifest.tokenizer,
        manifest.vocab_size,
        manifest.hash[:12],
    )
    return manifest


def _make_folder(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; return those created, deepest first."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        path.mkdir(exist_ok=True)
    return missing


def _check_out(out: Path) -> None:
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


class _Splitter:
    """Which documents go to validation, one document at a time.

    A document is held out when the hash of its key falls below
    ``val_fraction`` and its bytes still fit in ``max_val_tokens`` (a token
    is at least a byte, so the validation shard fits too); the choice thus
    depends on keys and sizes only, not on the tokenizer or the other sources.
    """

    def __init__(self, config: PrepareConfig) -> None:
        self.val_fraction = config.val_fraction
        self.max_val_tokens = config.max_val_tokens
        self.num_val_bytes = 0

    def held_out(self, doc: Document) -> bool:
        key = doc.key.encode("utf-8", "surrogatepass")
        score = int(hashlib.sha256(key).hexdigest()[:8], 16) / 2**32
        size = len(doc.data) + 1
        if score < self.val_fraction and self.num_val_bytes + size <= self.max_val_tokens:
            self.num_val_bytes += size
            return True
        return False


@dataclass
class _Scan:
    """What the first read learned: enough to replay the split on the second."""

    num_documents: int = 0
    num_bytes: int = 0
    num_held_out: int = 0
    last_fitting: int | None = None  # the last document small enough for validation
    digest: str = ""

    def val_override(self) -> tuple[int | None, int | None]:
        """``(to_val, to_train)``: the documents moved so both splits are non-empty.

        A small corpus holds out its last document that fits; one that would
        hold out everything keeps its last document for training.
        """
        to_val = None
        if not self.num_held_out:
            to_val = self.num_documents - 1 if self.last_fitting is None else self.last_fitting
        to_train = self.num_documents - 1 if self.num_held_out == self.num_documents else None
        return to_val, to_train


def _document_digest(digest: hashlib._Hash, doc: Document) -> None:
    digest.update(doc.key.encode("utf-8", "surrogatepass"))
    digest.update(f"\0{len(doc.data)}\n".encode())


def _scan(corpus: Corpus, skips: Skips, config: PrepareConfig) -> tuple[_Scan, BPETokenizer | None]:
    """The first read: check and count the documents, and train the BPE on the first ones."""
    scan = _Scan()
    splitter = _Splitter(config)
    digest = hashlib.sha256()

    def documents() -> Iterator[Document]:
        bar = _Progress("reading", corpus.size_bytes)
        try:
            for doc in corpus.documents(skips, bar.update):
                if splitter.held_out(doc):
                    scan.num_held_out += 1
                if len(doc.data) < config.max_val_tokens:
                    scan.last_fitting = scan.num_documents
                scan.num_documents += 1
                scan.num_bytes += len(doc.data)
                _document_digest(digest, doc)
                yield doc
        finally:
            bar.close()

    tokenizer = None
    if config.tokenizer == "bpe":
        from crowdtrain.model.tokenizer import BPETokenizer, TokenizerError

        logger.info(
            "reading the corpus and training a BPE of %d ids on its first %.0f MB",
            config.bpe_vocab_size,
            config.bpe_train_bytes / 1e6,
        )
        try:
            tokenizer = BPETokenizer.train(
                _training_texts(documents(), config.bpe_train_bytes), config.bpe_vocab_size
            )
        except TokenizerError as e:
            raise DataError(f"cannot train the BPE tokenizer: {e}") from e
    else:
        for _ in documents():
            pass
    scan.digest = digest.hexdigest()
    if not scan.num_documents:
        raise DataError(
            f"no text found in {', '.join(config.sources)} ({skips.describe()}); pass --source "
            "with folders or files of UTF-8 text, .jsonl, .parquet or a datasets folder"
        )
    if scan.num_documents < 2:
        raise DataError(
            f"only one document found in {', '.join(config.sources)}; one is held out for "
            "validation, so pass more files or split the text into several"
        )
    if tokenizer is not None and tokenizer.vocab_size < config.bpe_vocab_size:
        logger.warning(
            "the BPE has %d ids, not the %d asked for: the corpus has no more pairs to merge",
            tokenizer.vocab_size,
            config.bpe_vocab_size,
        )
    return scan, tokenizer


def _training_texts(documents: Iterator[Document], budget: int) -> Iterator[str]:
    """The first ``budget`` bytes of text, in corpus order; reads ``documents`` to the end."""
    for doc in documents:
        if budget <= 0:
            continue  # the scan goes on: it needs every document
        if len(doc.data) > budget:
            yield doc.data[:budget].decode("utf-8", "ignore")
        else:
            yield doc.text
        budget -= len(doc.data)


class _ShardStream:
    """Cuts a stream of tokens into shards of exactly ``shard_tokens`` tokens (the last fewer).

    With ``shard_tokens=None`` everything goes into one shard, written on close.
    """

    def __init__(
        self,
        folder: Path,
        split: Split,
        shard_tokens: int | None,
        dtype: str,
        token_num_bytes: np.ndarray | None,
    ) -> None:
        self.folder = folder
        self.split = split
        self.shard_tokens = shard_tokens
        self.dtype = dtype
        self.token_num_bytes = token_num_bytes  # None: one byte per token
        self.entries: list[ShardEntry] = []
        self._parts: list[np.ndarray] = []
        self._count = 0
        self.num_tokens = 0  # written so far, in shards or waiting for the next one

    def write(self, tokens: np.ndarray) -> None:
        self.num_tokens += tokens.size
        while tokens.size:
            room = tokens.size if self.shard_tokens is None else self.shard_tokens - self._count
            self._parts.append(tokens[:room])
            self._count += min(room, tokens.size)
            tokens = tokens[room:]
            if self._count == self.shard_tokens:
                self._flush()

    def close(self) -> list[ShardEntry]:
        if self._count:
            self._flush()
        return self.entries

    def _flush(self) -> None:
        shard_id = f"{self.split}-{len(self.entries):05d}"
        file = f"{shard_id}.bin"
        tokens = self._parts[0] if len(self._parts) == 1 else np.concatenate(self._parts)
        if self.token_num_bytes is None:
            num_bytes = len(tokens)
        else:
            num_bytes = int(self.token_num_bytes[tokens].sum())
        size_bytes, sha256 = write_shard(self.folder / file, tokens, self.dtype)
        self.entries.append(
            ShardEntry(shard_id, file, self.split, len(tokens), size_bytes, sha256, num_bytes)
        )
        self._parts = []
        self._count = 0


def _write(
    corpus: Corpus,
    scan: _Scan,
    tokenizer: BPETokenizer | None,
    folder: Path,
    config: PrepareConfig,
) -> ShardManifest:
    """The second read: tokenize each document into its split's shards, then the manifest."""
    if tokenizer is None:
        dtype, vocab_size, eod, token_num_bytes = "uint8", 256, END_OF_DOCUMENT, None
    else:
        dtype, vocab_size = "uint16", tokenizer.vocab_size
        eod, token_num_bytes = tokenizer.eod_id, tokenizer.token_num_bytes()
    streams = {
        False: _ShardStream(folder, "train", config.shard_tokens, dtype, token_num_bytes),
        True: _ShardStream(folder, "val", None, dtype, token_num_bytes),
    }
    end = np.array([eod], dtype=np.dtype(dtype))
    to_val, to_train = scan.val_override()
    splitter = _Splitter(config)
    digest = hashlib.sha256()
    batch: list[tuple[bool, Document]] = []
    num_documents = num_batch_bytes = 0
    bar = _Progress("tokenizing", scan.num_bytes)

    def written(num_bytes: int) -> None:
        num_tokens = sum(stream.num_tokens for stream in streams.values())
        num_shards = sum(len(stream.entries) for stream in streams.values())
        bar.update(num_bytes, num_tokens, num_shards)

    try:
        for doc in corpus.documents(Skips(quiet=True), lambda _: None):
            held_out = splitter.held_out(doc)
            if num_documents == to_val:
                held_out = True
            elif num_documents == to_train:
                held_out = False
            num_documents += 1
            _document_digest(digest, doc)
            batch.append((held_out, doc))
            num_batch_bytes += len(doc.data)
            if num_batch_bytes >= _BATCH_BYTES or len(batch) >= _BATCH_DOCUMENTS:
                _write_batch(batch, tokenizer, end, streams)
                written(num_batch_bytes)
                batch, num_batch_bytes = [], 0
        _write_batch(batch, tokenizer, end, streams)
        written(num_batch_bytes)
    finally:
        bar.close()
    if num_documents != scan.num_documents or digest.hexdigest() != scan.digest:
        raise DataError(
            f"{', '.join(config.sources)} changed while it was being prepared; "
            "run again when nothing writes to the corpus"
        )
    shards = (*streams[False].close(), *streams[True].close())
    # Every token stands for its bytes, so the shards count every byte once.
    assert sum(s.num_bytes for s in shards) == scan.num_bytes + scan.num_documents
    tokenizer_file = tokenizer_sha256 = None
    if tokenizer is not None:
        tokenizer.save(folder / TOKENIZER_FILE)
        tokenizer_file, tokenizer_sha256 = TOKENIZER_FILE, sha256_file(folder / TOKENIZER_FILE)
    manifest = ShardManifest(
        version=MANIFEST_VERSION,
        tokenizer=config.tokenizer,
        vocab_size=vocab_size,
        dtype=dtype,
        shards=shards,
        source=f"{scan.num_documents} documents from {corpus.describe()}",
        tokenizer_file=tokenizer_file,
        tokenizer_sha256=tokenizer_sha256,
    )
    (folder / MANIFEST_FILE).write_text(manifest.to_json() + "\n", encoding="ascii")
    return manifest


def _write_batch(
    batch: list[tuple[bool, Document]],
    tokenizer: BPETokenizer | None,
    end: np.ndarray,
    streams: dict[bool, _ShardStream],
) -> None:
    """Tokenize a batch of ``(held_out, document)`` at once and append each to its split."""
    if tokenizer is None:
        ids = [np.frombuffer(doc.data, dtype=np.uint8) for _, doc in batch]
    else:
        ids = tokenizer.encode_batch([doc.text for _, doc in batch])
    for held_out, stream in streams.items():
        parts = [
            part
            for (val, _), tokens in zip(batch, ids, strict=True)
            if val == held_out
            for part in (tokens, end)
        ]
        if parts:
            stream.write(np.concatenate(parts))


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
