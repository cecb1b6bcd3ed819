"""Token streams cut into shard files, one stream per split.

Owns turning tokenized documents (each followed by its end-of-document token)
into shards of exactly ``shard_tokens`` tokens, the last one fewer, and their
manifest entries; the shard file format is :func:`crowdtrain.protocol.shards.write_shard`.
Knows nothing about reading the corpus or choosing the split.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from crowdtrain.coordinator.data.documents import Document
from crowdtrain.protocol.shards import ShardEntry, Split, write_shard

if TYPE_CHECKING:
    # crowdtrain.model imports torch: only a BPE run pays for that.
    from crowdtrain.model.tokenizer import BPETokenizer


class ShardStream:
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


def write_batch(
    batch: list[tuple[bool, Document]],
    tokenizer: BPETokenizer | None,
    end: np.ndarray,
    streams: dict[bool, ShardStream],
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
