"""The train/validation split of a corpus, one document at a time.

Owns which documents are held out for validation (a hash of each document's
key and its size, never the tokenizer or the other sources), what the first
read must remember to replay the same split on the second (:class:`Scan`),
and the digest that tells whether the corpus changed in between. Knows
nothing about tokens or shards.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from crowdtrain.coordinator.data.documents import Document


class Splitter:
    """Which documents go to validation, one document at a time.

    A document is held out when the hash of its key falls below
    ``val_fraction`` and its bytes still fit in ``max_val_tokens`` (a token
    is at least a byte, so the validation shard fits too); the choice thus
    depends on keys and sizes only, not on the tokenizer or the other sources.
    """

    def __init__(self, val_fraction: float, max_val_tokens: int) -> None:
        self.val_fraction = val_fraction
        self.max_val_tokens = max_val_tokens
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
class Scan:
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


def document_digest(digest: hashlib._Hash, doc: Document) -> None:
    """Add a document to the corpus digest (its key and size): both reads must agree."""
    digest.update(doc.key.encode("utf-8", "surrogatepass"))
    digest.update(f"\0{len(doc.data)}\n".encode())
