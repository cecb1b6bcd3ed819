"""What every source of a corpus yields and shares: documents, the skips counted on
the way, the text field of records and how sources name datasets.

The bottom of the data package: :mod:`corpus` (text and JSON Lines files) and
:mod:`arrow_sources` (Parquet, ``datasets`` folders, hub datasets) both build on
it. Knows nothing about tokenizers, shards or the train/validation split.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from crowdtrain.protocol.errors import DataError

logger = logging.getLogger(__name__)


HUB_PREFIX = "hf:"
"""Sources ``hf:NAME[:SPLIT]`` are Hugging Face hub datasets, streamed once."""


DATASET_MARKERS = ("dataset_dict.json", "state.json", "dataset_info.json")
"""Files that make a folder a ``datasets`` folder (written by ``save_to_disk``)."""


_WARNINGS_PER_REASON = 5


Progress = Callable[[int], None]
"""Called with the number of bytes of the source just read."""


@dataclass(frozen=True)
class Document:
    """One document: ``key`` is stable across runs and machines and decides its split."""

    key: str
    text: str
    data: bytes  # the UTF-8 bytes of text


class Skips:
    """Counts what is skipped, by reason, and logs the first few of each reason."""

    def __init__(self, quiet: bool = False) -> None:
        self.counts: Counter[str] = Counter()
        self._quiet = quiet

    def skip(self, reason: str, where: str, problem: str, fix: str = "") -> None:
        """Count one skipped file, line or record: ``where`` names it, ``fix`` says what to do."""
        self.counts[reason] += 1
        if self._quiet or self.counts[reason] > _WARNINGS_PER_REASON:
            return
        more = (
            f" (more skipped for being {reason} are counted, not logged)"
            if self.counts[reason] == _WARNINGS_PER_REASON
            else ""
        )
        # An empty file is common (an __init__.py) and harmless: worth a note, not a warning.
        level = logging.INFO if reason == "empty" else logging.WARNING
        logger.log(level, "skipping %s: %s%s%s", where, problem, f"; {fix}" if fix else "", more)

    def empty(self, where: str, problem: str = "it is empty") -> None:
        self.skip("empty", where, problem)

    def binary(self, where: str) -> None:
        self.skip(
            "with NUL bytes",
            where,
            "it contains NUL bytes, so it is not text",
            "remove it from the source",
        )

    def not_utf8(self, where: str, problem: str) -> None:
        self.skip("not UTF-8", where, problem, "save it as UTF-8 to include it")

    def not_string(self, where: str, field: str, value: Any) -> None:
        self.skip("not a string", where, f"field '{field}' is {_json_kind(value)}, not a string")

    def missing(self, where: str, field: str) -> None:
        self.skip(f"without '{field}'", where, f"the record has no field '{field}'")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def describe(self) -> str:
        """``"3 skipped: 2 empty, 1 not UTF-8"``, or ``"none skipped"``."""
        if not self.counts:
            return "none skipped"
        parts = ", ".join(f"{n} {reason}" for reason, n in sorted(self.counts.items()))
        return f"{self.total} skipped: {parts}"


class Fields:
    """Takes the text field out of records; refuses a source where no record has it."""

    def __init__(self, field: str, source: str) -> None:
        self.field = field
        self.source = source
        self.num_records = self.num_with_field = 0
        self.other_fields: set[str] = set()

    def text(self, record: dict[str, Any], where: str, skips: Skips) -> str | None:
        """The record's text, or None when it is skipped (counted in ``skips``)."""
        self.num_records += 1
        if self.field not in record:
            if len(self.other_fields) < 100:
                self.other_fields.update(record)
            skips.missing(where, self.field)
            return None
        self.num_with_field += 1
        value = record[self.field]
        if not isinstance(value, str):
            skips.not_string(where, self.field, value)
            return None
        return value

    def check(self) -> None:
        """Raise when there were records and none had the field: --text-field is wrong."""
        if self.num_records and not self.num_with_field:
            raise DataError(
                f"{self.source}: no record has the field '{self.field}' (fields found: "
                f"{quote_names(self.other_fields)}); pass --text-field with the field that holds "
                "the text"
            )


def quote_names(names: Any) -> str:
    """``"'a', 'b'"`` sorted, for messages: at most 20, then how many more; ``"none"``."""
    listed = sorted(str(name) for name in names)
    if not listed:
        return "none"
    shown = ", ".join(f"'{name}'" for name in listed[:20])
    return shown + (f" and {len(listed) - 20} more" if len(listed) > 20 else "")


def _json_kind(value: Any) -> str:
    kinds = {
        bool: "a boolean",
        int: "a number",
        float: "a number",
        list: "a list",
        dict: "an object",
    }
    return "null" if value is None else kinds.get(type(value), f"a {type(value).__name__}")
