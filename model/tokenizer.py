"""Tokenizers: the ``Tokenizer`` contract, the byte-level tokenizer and byte-level BPE.

Owns the mapping between text and token ids, and training a BPE. Knows nothing
about shards, manifests or how documents are gathered; data preparation
decides where the end-of-document token goes.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from crowdtrain.protocol.errors import CrowdtrainError

if TYPE_CHECKING:
    from tokenizers import Tokenizer as HFTokenizer

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


EOD_TOKEN = "<|endoftext|>"
"""The BPE tokenizer's end-of-document special token; training gives it id 0."""

MAX_BPE_VOCAB_SIZE = 65535
"""Largest BPE vocabulary: every id then fits the ``uint16`` of a shard."""

MIN_BPE_VOCAB_SIZE = 257
"""Smallest BPE vocabulary: the 256 bytes and the end-of-document token."""


class TokenizerError(CrowdtrainError):
    """A tokenizer file that cannot be read, or a tokenizer that cannot be trained."""


class BPETokenizer:
    """Byte-level BPE through the ``tokenizers`` library, loaded from a ``tokenizer.json``.

    Any text round trips exactly: there is no normalizer, no unknown token and
    no prefix space, so the bytes of the tokens are the UTF-8 bytes of the text.
    ``encode`` never produces ``eod_id`` (a literal ``<|endoftext|>`` in text is
    encoded as text); data preparation appends it after each document.
    """

    def __init__(self, tokenizer: HFTokenizer) -> None:
        eod_id = tokenizer.token_to_id(EOD_TOKEN)
        if eod_id is None:
            raise TokenizerError(
                f"the tokenizer has no {EOD_TOKEN} token; make it with "
                "`crowdtrain-coordinator prepare-data --tokenizer bpe`"
            )
        tokenizer.encode_special_tokens = True  # not stored in tokenizer.json
        self._tokenizer = tokenizer
        self.eod_id: int = eod_id
        self.vocab_size: int = tokenizer.get_vocab_size()
        self._dtype = np.uint16 if self.vocab_size <= 1 << 16 else np.uint32

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> BPETokenizer:
        """Load a ``tokenizer.json`` written by :meth:`save` (or by ``prepare-data``)."""
        from tokenizers import Tokenizer as HFTokenizer

        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise TokenizerError(f"cannot read tokenizer file {path}: {e}") from e
        try:
            tokenizer = HFTokenizer.from_str(text)
        except Exception as e:  # tokenizers raises a bare Exception for bad files
            raise TokenizerError(f"{path} is not a tokenizer.json file: {e}") from e
        return cls(tokenizer)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> BPETokenizer:
        """Train a byte-level BPE of at most ``vocab_size`` ids on ``texts``, read once, in order.

        The same texts give the same tokenizer, byte for byte, whatever the
        number of threads. A small corpus may give fewer ids than asked for.
        Exceptions raised by ``texts`` propagate unchanged.
        """
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        if not MIN_BPE_VOCAB_SIZE <= vocab_size <= MAX_BPE_VOCAB_SIZE:
            raise TokenizerError(
                f"BPE vocab_size {vocab_size} is outside {MIN_BPE_VOCAB_SIZE}.."
                f"{MAX_BPE_VOCAB_SIZE} (256 bytes and {EOD_TOKEN}, up to what uint16 holds)"
            )
        tokenizer = HFTokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOD_TOKEN],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tokenizer.train_from_iterator(texts, trainer)
        return cls(tokenizer)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the tokenizer as ``tokenizer.json`` text; the same tokenizer gives the same bytes."""
        Path(path).write_text(self._tokenizer.to_str(pretty=True) + "\n", encoding="utf-8")

    def encode(self, text: str) -> np.ndarray:
        """Token ids of ``text`` as an ``np.uint16`` array (``uint32`` past 65536 ids)."""
        return np.array(self._tokenizer.encode(text).ids, dtype=self._dtype)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """:meth:`encode` for many texts at once, on every core; same ids as one at a time."""
        encodings = self._tokenizer.encode_batch_fast(list(texts), add_special_tokens=False)
        return [np.array(e.ids, dtype=self._dtype) for e in encodings]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of ``ids``; ``eod_id`` becomes ``<|endoftext|>`` and a cut character U+FFFD.

        Raises ``ValueError`` for an id outside ``0..vocab_size - 1`` or a non-integer id.
        """
        array = np.asarray(ids)
        if array.size and array.dtype.kind not in "iu":
            raise ValueError(f"BPETokenizer ids must be integers, got dtype {array.dtype}")
        if array.size and (array.min() < 0 or array.max() >= self.vocab_size):
            bad = array[(array < 0) | (array >= self.vocab_size)].flat[0]
            raise ValueError(
                f"BPETokenizer ids must be in 0..{self.vocab_size - 1}, got {int(bad)}"
            )
        return self._tokenizer.decode(array.tolist(), skip_special_tokens=False)

    def token_num_bytes(self) -> np.ndarray:
        """UTF-8 bytes each id stands for, as an ``np.int64`` array; ``eod_id`` counts one.

        Summed over a shard's tokens this gives the bytes of text behind them,
        for bits per byte.
        """
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        # The byte-level alphabet spells each byte as one character.
        for token, token_id in self._tokenizer.get_vocab(with_added_tokens=False).items():
            lengths[token_id] = len(token)
        lengths[self.eod_id] = 1
        return lengths


def load_tokenizer(
    kind: str, path: str | os.PathLike[str] | None = None, sha256: str | None = None
) -> Tokenizer:
    """The tokenizer a manifest names: ``load_tokenizer(m.tokenizer, folder / m.tokenizer_file,
    m.tokenizer_sha256)``.

    ``"byte"`` needs no file. ``"bpe"`` loads ``path``, first checking its
    sha256 when given (always give it for a file that came over the network).
    """
    if kind == "byte":
        return ByteTokenizer()
    if kind != "bpe":
        raise TokenizerError(f"unknown tokenizer {kind!r}; use 'byte' or 'bpe'")
    if path is None:
        raise TokenizerError("the bpe tokenizer needs its tokenizer.json file")
    if sha256 is not None:
        try:
            actual = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        except OSError as e:
            raise TokenizerError(f"cannot read tokenizer file {path}: {e.strerror}") from e
        if actual != sha256:
            raise TokenizerError(
                f"tokenizer file {path} fails its checksum: sha256 is {actual[:12]}..., "
                f"the manifest says {sha256[:12]}...; download it again"
            )
    return BPETokenizer.from_file(path)
