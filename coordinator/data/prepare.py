"""Turn a corpus into token shards and their manifest (`prepare-data`).

Owns what ``prepare-data`` is asked (:class:`PrepareConfig`), the tokenizer
of the data (bytes, or a BPE trained here) and the order of the work: a first
read of the corpus to check it, choose the split and train the BPE, a second
to tokenize and write, then the manifest and the install. The parts live
beside it: reading sources in :mod:`~crowdtrain.coordinator.data.corpus`, the
split in :mod:`~crowdtrain.coordinator.data.split`, the shard files in
:mod:`~crowdtrain.coordinator.data.shard_writer`, the output folder in
:mod:`~crowdtrain.coordinator.data.output`, what is shown meanwhile in
:mod:`~crowdtrain.coordinator.data.progress`; the shard and manifest formats
in :mod:`crowdtrain.protocol.shards`. The command line lives elsewhere.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from crowdtrain.coordinator.data.corpus import STDLIB, Corpus, Document, Skips
from crowdtrain.coordinator.data.output import check_out, install, make_folder
from crowdtrain.coordinator.data.progress import PassProgress
from crowdtrain.coordinator.data.shard_writer import ShardStream, write_batch
from crowdtrain.coordinator.data.split import Scan, Splitter, document_digest
from crowdtrain.protocol.errors import DataError
from crowdtrain.protocol.shards import (
    MANIFEST_FILE,
    MANIFEST_VERSION,
    ShardManifest,
    sha256_file,
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
    check_out(out)
    corpus = Corpus(
        config.sources, config.text_field, config.split, exclude=out, spool_dir=out.parent
    )
    created = make_folder(out.parent)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        skips = Skips()
        scan, tokenizer = _scan(corpus, skips, config)
        manifest = _write(corpus, scan, tokenizer, work, config)
        os.chmod(work, 0o755)  # mkdtemp makes it private
        check_out(out)  # again: it may have changed while the corpus was read
        install(work, out)
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


def _scan(corpus: Corpus, skips: Skips, config: PrepareConfig) -> tuple[Scan, BPETokenizer | None]:
    """The first read: check and count the documents, and train the BPE on the first ones."""
    scan = Scan()
    splitter = Splitter(config.val_fraction, config.max_val_tokens)
    digest = hashlib.sha256()

    def documents() -> Iterator[Document]:
        bar = PassProgress("reading", corpus.size_bytes)
        try:
            for doc in corpus.documents(skips, bar.update):
                if splitter.held_out(doc):
                    scan.num_held_out += 1
                if len(doc.data) < config.max_val_tokens:
                    scan.last_fitting = scan.num_documents
                scan.num_documents += 1
                scan.num_bytes += len(doc.data)
                document_digest(digest, doc)
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


def _write(
    corpus: Corpus,
    scan: Scan,
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
        False: ShardStream(folder, "train", config.shard_tokens, dtype, token_num_bytes),
        True: ShardStream(folder, "val", None, dtype, token_num_bytes),
    }
    end = np.array([eod], dtype=np.dtype(dtype))
    to_val, to_train = scan.val_override()
    splitter = Splitter(config.val_fraction, config.max_val_tokens)
    digest = hashlib.sha256()
    batch: list[tuple[bool, Document]] = []
    num_documents = num_batch_bytes = 0
    bar = PassProgress("tokenizing", scan.num_bytes)

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
            document_digest(digest, doc)
            batch.append((held_out, doc))
            num_batch_bytes += len(doc.data)
            if num_batch_bytes >= _BATCH_BYTES or len(batch) >= _BATCH_DOCUMENTS:
                write_batch(batch, tokenizer, end, streams)
                written(num_batch_bytes)
                batch, num_batch_bytes = [], 0
        write_batch(batch, tokenizer, end, streams)
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
