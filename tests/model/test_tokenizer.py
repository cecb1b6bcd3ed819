"""ByteTokenizer round trips any text and marks documents with a byte text never holds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from crowdtrain.model import EOD_BYTE, ByteTokenizer, Tokenizer
from crowdtrain.model import tokenizer as tokenizer_module


def test_round_trips_non_ascii_text() -> None:
    tokenizer = ByteTokenizer()
    text = "def grüße():\n    return '日本語 🐍 — ok'\n"
    ids = tokenizer.encode(text)
    assert ids.dtype == np.uint8
    assert len(ids) == len(text.encode("utf-8"))
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(ids.tolist()) == text


def test_is_a_tokenizer_with_256_ids() -> None:
    tokenizer = ByteTokenizer()
    assert isinstance(tokenizer, Tokenizer)
    assert tokenizer.vocab_size == 256


def test_cut_character_decodes_to_replacement() -> None:
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode("é")
    assert tokenizer.decode(ids[:1]) == "\ufffd"


def test_out_of_range_id_is_refused() -> None:
    with pytest.raises(ValueError, match="300"):
        ByteTokenizer().decode([65, 300])


def test_end_of_document_byte_never_occurs_in_python_source() -> None:
    source = Path(tokenizer_module.__file__).read_text(encoding="utf-8")
    assert EOD_BYTE == 0
    assert EOD_BYTE not in ByteTokenizer().encode(source)
