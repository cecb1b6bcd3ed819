"""Both tokenizers round trip any text; documents are marked with an id text never yields."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from crowdtrain.model import EOD_BYTE, ByteTokenizer, Tokenizer
from crowdtrain.model import tokenizer as tokenizer_module
from crowdtrain.model.tokenizer import (
    EOD_TOKEN,
    BPETokenizer,
    TokenizerError,
    load_tokenizer,
)

TEXTS = [
    "def grüße(name):\n    return f'hello {name}'\n" * 30,
    "The quick brown fox jumps over the lazy dog. 日本語 🐍\n" * 30,
    "alpha beta gamma delta\n" * 50,
]


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


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return BPETokenizer.train(iter(TEXTS), vocab_size=300)


def test_bpe_round_trips_text_it_never_saw(bpe: BPETokenizer) -> None:
    assert isinstance(bpe, Tokenizer)
    assert bpe.vocab_size == 300 and bpe.eod_id == 0
    for text in [*TEXTS, "ünseen wörds, tabs\t and\r\n newlines ✓", " leading space", ""]:
        ids = bpe.encode(text)
        assert ids.dtype == np.uint16
        assert bpe.decode(ids) == text
        assert bpe.decode(ids.tolist()) == text
    ids = bpe.encode(TEXTS[2])
    assert len(ids) < len(TEXTS[2]) / 3  # merges learnt from the training text


def test_bpe_never_encodes_the_end_of_document_token_from_text(bpe: BPETokenizer) -> None:
    text = f"a {EOD_TOKEN} b"
    ids = bpe.encode(text)
    assert bpe.eod_id not in ids
    assert bpe.decode(ids) == text
    assert bpe.decode([bpe.eod_id]) == EOD_TOKEN


def test_bpe_token_bytes_add_up_to_the_utf8_bytes(bpe: BPETokenizer) -> None:
    lengths = bpe.token_num_bytes()
    assert lengths[bpe.eod_id] == 1 and lengths.min() >= 1
    for text in TEXTS:
        assert lengths[bpe.encode(text)].sum() == len(text.encode("utf-8"))


def test_bpe_batch_encoding_matches_one_at_a_time(bpe: BPETokenizer) -> None:
    batch = bpe.encode_batch(TEXTS)
    assert [ids.tolist() for ids in batch] == [bpe.encode(t).tolist() for t in TEXTS]


def test_bpe_saves_and_loads_byte_for_byte(bpe: BPETokenizer, tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    bpe.save(path)
    again = BPETokenizer.from_file(path)
    again.save(tmp_path / "again.json")
    assert (tmp_path / "again.json").read_bytes() == path.read_bytes()
    assert again.encode(TEXTS[0]).tolist() == bpe.encode(TEXTS[0]).tolist()
    trained = BPETokenizer.train(iter(TEXTS), vocab_size=300)
    trained.save(tmp_path / "trained.json")
    assert (tmp_path / "trained.json").read_bytes() == path.read_bytes()


def test_bpe_out_of_range_id_is_refused(bpe: BPETokenizer) -> None:
    with pytest.raises(ValueError, match="0..299, got 300"):
        bpe.decode([5, 300])


@pytest.mark.parametrize("vocab_size", [256, 65536])
def test_bpe_vocab_size_is_bounded(vocab_size: int) -> None:
    with pytest.raises(TokenizerError, match=f"vocab_size {vocab_size} is outside 257..65535"):
        BPETokenizer.train(iter(TEXTS), vocab_size=vocab_size)


def test_load_tokenizer_checks_the_file(bpe: BPETokenizer, tmp_path: Path) -> None:
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
    path = tmp_path / "tokenizer.json"
    bpe.save(path)
    sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    loaded = load_tokenizer("bpe", path, sha256=sha256)
    assert isinstance(loaded, BPETokenizer) and loaded.vocab_size == 300
    with pytest.raises(TokenizerError, match="fails its checksum.*download it again"):
        load_tokenizer("bpe", path, sha256="0" * 64)
    path.write_text("{}")
    with pytest.raises(TokenizerError, match="is not a tokenizer.json file"):
        load_tokenizer("bpe", path)
    with pytest.raises(TokenizerError, match="unknown tokenizer 'words'"):
        load_tokenizer("words")
