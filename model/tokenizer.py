"""Tokenizers: the ``Tokenizer`` contract and the byte-level tokenizer.

Owns the mapping between text and token ids. Knows nothing about shards,
files on disk or how documents are gathered; data preparation decides where
``EOD_BYTE`` goes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

EOD_BYTE = 0
"""Token id written between documents when a corpus is concatenated into shards.

The byte 0 (NUL) never occurs in Python source or ordinary text, so it marks
document boundaries without an extra vocabulary entry. ``ByteTokenizer.encode``
does not add it; data preparation does.
"""


@runtime_checkable
class Tokenizer(Protocol):
    """What the model side needs from any tokenizer."""

    @property
    def vocab_size(self) -> int:
        """Number of distinct token ids; ids are ``0 .. vocab_size - 1``."""
        ...

    def encode(self, text: str) -> Sequence[int] | np.ndarray:
        """Token ids of ``text``."""
        ...

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of ``ids``; never raises on ids that do not form valid text."""
        ...


class ByteTokenizer:
    """Byte-level tokenizer: each UTF-8 byte is one token; needs no files.

    One token is one byte, so bits per token equal bits per byte
    (``bytes_per_token=1.0`` in ``evaluate``).
    """

    vocab_size: int = 256

    def encode(self, text: str) -> np.ndarray:
        """UTF-8 bytes of ``text`` as a writable ``np.uint8`` array."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of the bytes ``ids``; invalid UTF-8 (a cut multi-byte character) becomes U+FFFD.

        Raises ``ValueError`` for an id outside ``0..255`` or a non-integer id.
        """
        array = np.asarray(ids)
        if array.size and array.dtype.kind not in "iu":
            raise ValueError(f"ByteTokenizer ids must be integers, got dtype {array.dtype}")
        if array.size and (array.min() < 0 or array.max() >= self.vocab_size):
            bad = array[(array < 0) | (array >= self.vocab_size)].flat[0]
            raise ValueError(f"ByteTokenizer ids must be in 0..255, got {int(bad)}")
        return array.astype(np.uint8).tobytes().decode("utf-8", errors="replace")
