import json
import logging
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from crowdtrain.coordinator import cli
from crowdtrain.coordinator.data.prepare import (
    MAX_BPE_VOCAB_SIZE,
    MIN_BPE_VOCAB_SIZE,
    PrepareConfig,
    prepare_data,
)
from crowdtrain.model import tokenizer as tokenizer_module
from crowdtrain.model.tokenizer import BPETokenizer, load_tokenizer
from crowdtrain.protocol.errors import DataError
from crowdtrain.protocol.shards import load_manifest, read_shard, sha256_file, verify_shard

TEXTS = {
    "a.txt": "alpha beta gamma\n" * 100,
    "b.md": "# Title\n\nSome *markdown* text, with ünïcödé.\n" * 40,
    "c.py": "def f(x):\n    return x + 1\n" * 60,
    "sub/d.rst": "Heading\n=======\n\nBody text.\n" * 70,
    "sub/e.txt": "the last document\n" * 90,
}


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    for name, text in TEXTS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    (root / "bad.txt").write_bytes(b"caf\xe9 in latin-1\n")
    (root / "nul.txt").write_bytes(b"text with a \0 byte\n")
    (root / "empty.txt").write_bytes(b"")
    (root / "image.png").write_bytes(b"\x89PNG not text")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "secret.txt").write_text("not for training")
    return root


def _documents(folder, manifest, split):
    """The documents of a split, decoded from its shards in order."""
    tokens = np.concatenate(
        [read_shard(folder / s.file, s) for s in manifest.shards if s.split == split]
    )
    assert tokens[-1] == 0
    return [part.decode("utf-8") for part in tokens[:-1].tobytes().split(b"\0")]


def test_prepare_small_corpus(corpus, tmp_path, caplog):
    out = tmp_path / "data"
    caplog.set_level(logging.INFO)
    manifest = prepare_data(PrepareConfig((str(corpus),), out, shard_tokens=1024))

    train = _documents(out, manifest, "train")
    val = _documents(out, manifest, "val")
    assert sorted(train + val) == sorted(TEXTS.values())
    assert val == [TEXTS["sub/e.txt"]]  # too small to hold one out by hash: the last one
    num_tokens = sum(len(t.encode()) + 1 for t in TEXTS.values())
    assert manifest.num_train_tokens + len(val[0]) + 1 == num_tokens

    assert [s.id for s in manifest.val_shards] == ["val-00000"]
    sizes = [s.num_tokens for s in manifest.train_shards]
    assert [s.id for s in manifest.train_shards] == [f"train-{i:05d}" for i in range(len(sizes))]
    assert len(sizes) > 2 and set(sizes[:-1]) == {1024} and 0 < sizes[-1] <= 1024
    assert (manifest.tokenizer, manifest.vocab_size, manifest.dtype) == ("byte", 256, "uint8")
    assert (manifest.tokenizer_file, manifest.tokenizer_sha256) == (None, None)
    for shard in manifest.shards:
        verify_shard(out / shard.file, shard)
        assert sha256_file(out / shard.file) == shard.sha256
        assert shard.num_bytes == shard.num_tokens
    assert load_manifest(out) == manifest
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["manifest.json", *(s.file for s in manifest.shards)]
    )

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "bad.txt: it is not valid UTF-8 (byte 3); save it as UTF-8" in warnings[0]
    assert "nul.txt: it contains NUL bytes, so it is not text" in warnings[1]
    summary = caplog.records[-1].getMessage()
    assert "5 documents (3 skipped: 1 empty, 1 not UTF-8, 1 with NUL bytes)" in summary


def test_prepare_twice_gives_identical_bytes(corpus, tmp_path):
    config = PrepareConfig((str(corpus),), tmp_path / "one", shard_tokens=1024)
    first = prepare_data(config)
    second = prepare_data(PrepareConfig((str(corpus),), tmp_path / "two", shard_tokens=1024))
    assert first.hash == second.hash
    for name in ["manifest.json", *(s.file for s in first.shards)]:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()

    # Preparing into an earlier output replaces it and leaves nothing behind.
    assert prepare_data(config).hash == first.hash
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "one", "two"]


def test_out_inside_the_source_folder_is_not_read_back(corpus):
    config = PrepareConfig((str(corpus),), corpus / "data", shard_tokens=1024)
    assert prepare_data(config).hash == prepare_data(config).hash


def test_validation_is_chosen_by_name_and_capped(tmp_path):
    root = tmp_path / "many"
    root.mkdir()
    for i in range(200):
        (root / f"doc{i:03d}.txt").write_text(f"document number {i}\n" * 20)
    config = PrepareConfig((str(root),), tmp_path / "data", val_fraction=0.2, max_val_tokens=4000)
    manifest = prepare_data(config)
    (val,) = manifest.val_shards
    assert 2000 < val.num_tokens <= 4000
    assert manifest.num_train_tokens + val.num_tokens == sum(
        p.stat().st_size + 1 for p in root.iterdir()
    )


def test_explicit_file_is_taken_whatever_its_suffix(tmp_path):
    (tmp_path / "notes.log").write_text("first file\n" * 10)
    (tmp_path / "more.dat").write_text("second file\n" * 10)
    sources = (str(tmp_path / "notes.log"), str(tmp_path / "more.dat"))
    manifest = prepare_data(PrepareConfig(sources, tmp_path / "data"))
    assert manifest.num_train_tokens == len("first file\n" * 10) + 1
    assert "notes.log" in manifest.source


def test_stdlib_is_deterministic(tmp_path):
    config = PrepareConfig(("stdlib",), tmp_path / "one", shard_tokens=4_000_000)
    first = prepare_data(config)
    second = prepare_data(PrepareConfig(("stdlib",), tmp_path / "two", shard_tokens=4_000_000))
    assert first.hash == second.hash
    assert len(first.train_shards) >= 2 and len(first.val_shards) == 1
    assert all(s.num_tokens == 4_000_000 for s in first.train_shards[:-1])
    assert first.num_train_tokens > 10_000_000
    assert 0 < first.val_shards[0].num_tokens <= 262_144
    assert "standard library" in first.source
    val = read_shard(tmp_path / "one" / first.val_shards[0].file, first.val_shards[0])
    assert val[-1] == 0


def test_non_empty_folder_that_is_not_data_is_refused_and_untouched(corpus, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match=f"{out} is not empty and is not a crowdtrain data folder"):
        prepare_data(PrepareConfig((str(corpus),), out))
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "mine"]


def test_data_folder_with_foreign_files_is_refused(corpus, tmp_path):
    out = tmp_path / "data"
    prepare_data(PrepareConfig((str(corpus),), out))
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="is not a crowdtrain data folder"):
        prepare_data(PrepareConfig((str(corpus),), out))
    assert (out / "notes.txt").read_text() == "keep me"


def test_missing_source_is_refused_and_nothing_created(corpus, tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match=f"source {missing} does not exist"):
        prepare_data(PrepareConfig((str(corpus), str(missing)), tmp_path / "out" / "data"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]


def test_corpus_without_text_is_refused(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe")
    (tmp_path / "empty.md").write_bytes(b"")
    message = f"no text found in {tmp_path} (2 skipped: 1 empty, 1 not UTF-8); pass --source"
    with pytest.raises(DataError, match=re.escape(message)):
        prepare_data(PrepareConfig((str(tmp_path),), tmp_path / "data"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.txt", "empty.md"]


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"shard_tokens": 1000}, "shard_tokens 1000 is too small"),
        ({"val_fraction": 0.5}, r"val_fraction 0.5 is outside \[0, 0.5\)"),
        ({"val_fraction": -0.1}, "val_fraction -0.1 is outside"),
        ({"sources": ()}, "no sources given"),
        ({"tokenizer": "bpe", "vocab_size": 256}, r"vocab_size 256 is outside 257..65535"),
        ({"tokenizer": "bpe", "vocab_size": 65536}, r"vocab_size 65536 is outside 257..65535"),
        ({"vocab_size": 4096}, "vocab_size 4096 needs --tokenizer bpe"),
        ({"tokenizer": "words"}, "tokenizer 'words' is unknown"),
        ({"text_field": ""}, "text_field is empty"),
        ({"tokenizer": "bpe", "bpe_train_bytes": 0}, "bpe_train_bytes 0 must be at least 1"),
    ],
)
def test_bad_config_is_refused(tmp_path, changes, message):
    fields = {"sources": ("stdlib",), "out": tmp_path / "data", **changes}
    with pytest.raises(DataError, match=message):
        PrepareConfig(**fields)


def _bpe(corpus, out, **changes):
    fields = dict(shard_tokens=1024, tokenizer="bpe", vocab_size=300, **changes)
    return prepare_data(PrepareConfig((str(corpus),), out, **fields))


def _bpe_documents(folder, manifest):
    """Every document of a BPE data folder, decoded through the manifest's tokenizer."""
    tokenizer = load_tokenizer(
        manifest.tokenizer, folder / manifest.tokenizer_file, manifest.tokenizer_sha256
    )
    documents = []
    for split in ("train", "val"):
        tokens = np.concatenate(
            [read_shard(folder / s.file, s) for s in manifest.shards if s.split == split]
        )
        assert tokens.dtype == np.uint16 and tokens[-1] == tokenizer.eod_id
        ends = np.flatnonzero(tokens == tokenizer.eod_id)
        starts = np.concatenate([[0], ends[:-1] + 1])
        documents += [tokenizer.decode(tokens[a:b]) for a, b in zip(starts, ends, strict=True)]
    return documents


def test_bpe_round_trips_and_counts_bytes(corpus, tmp_path):
    out = tmp_path / "data"
    manifest = _bpe(corpus, out)
    assert (manifest.tokenizer, manifest.vocab_size, manifest.dtype) == ("bpe", 300, "uint16")
    assert manifest.tokenizer_file == "tokenizer.json"
    assert manifest.tokenizer_sha256 == sha256_file(out / "tokenizer.json")
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["manifest.json", "tokenizer.json", *(s.file for s in manifest.shards)]
    )
    assert sorted(_bpe_documents(out, manifest)) == sorted(TEXTS.values())

    # num_bytes: the text behind each shard's tokens, every end of document one byte.
    lengths = BPETokenizer.from_file(out / "tokenizer.json").token_num_bytes()
    for shard in manifest.shards:
        assert shard.num_bytes == lengths[read_shard(out / shard.file, shard)].sum()
        assert shard.num_bytes > shard.num_tokens
    assert sum(s.num_bytes for s in manifest.shards) == sum(
        len(t.encode()) + 1 for t in TEXTS.values()
    )
    (val,) = manifest.val_shards
    assert val.num_bytes == len(TEXTS["sub/e.txt"]) + 1  # same split as bytes: by key and size


def test_bpe_is_deterministic_across_runs_processes_and_threads(corpus, tmp_path):
    first = _bpe(corpus, tmp_path / "one")
    assert _bpe(corpus, tmp_path / "two").hash == first.hash
    # Another process (other hash seeds) on one thread writes the same bytes.
    env = {**os.environ, "RAYON_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "crowdtrain.coordinator.cli", "prepare-data"]
    command += ["--source", str(corpus), "--out", str(tmp_path / "three"), "--shard-tokens"]
    command += ["1024", "--tokenizer", "bpe", "--vocab-size", "300"]
    subprocess.run(command, env=env, check=True, capture_output=True)
    for name in ["manifest.json", "tokenizer.json", *(s.file for s in first.shards)]:
        expected = (tmp_path / "one" / name).read_bytes()
        assert (tmp_path / "two" / name).read_bytes() == expected
        assert (tmp_path / "three" / name).read_bytes() == expected


def test_bpe_trains_on_the_first_bytes_of_the_corpus_only(corpus, tmp_path):
    first = TEXTS["a.txt"]  # the first document in corpus order
    manifest = _bpe(corpus, tmp_path / "data", bpe_train_bytes=len(first))
    expected = BPETokenizer.train(iter([first]), vocab_size=300)
    expected.save(tmp_path / "expected.json")
    data = tmp_path / "data" / "tokenizer.json"
    assert data.read_bytes() == (tmp_path / "expected.json").read_bytes()
    assert manifest.vocab_size == expected.vocab_size < 300  # one short text: few merges
    assert sorted(_bpe_documents(tmp_path / "data", manifest)) == sorted(TEXTS.values())


def test_vocab_bounds_match_the_tokenizer():
    assert MIN_BPE_VOCAB_SIZE == tokenizer_module.MIN_BPE_VOCAB_SIZE == 257
    assert MAX_BPE_VOCAB_SIZE == tokenizer_module.MAX_BPE_VOCAB_SIZE == 65535


def test_output_of_an_older_crowdtrain_is_replaced(corpus, tmp_path):
    out = tmp_path / "data"
    manifest = prepare_data(PrepareConfig((str(corpus),), out, shard_tokens=1024))
    old = json.loads((out / "manifest.json").read_text())
    old["version"] = 1
    (out / "manifest.json").write_text(json.dumps(old))
    (out / "train-00099.bin").write_bytes(b"old")
    old["shards"].append({**old["shards"][0], "file": "train-00099.bin", "id": "train-00099"})
    (out / "manifest.json").write_text(json.dumps(old))
    assert prepare_data(PrepareConfig((str(corpus),), out, shard_tokens=1024)) == manifest
    assert not (out / "train-00099.bin").exists()


def test_command_line_takes_the_new_flags(corpus, tmp_path, capsys):
    out = tmp_path / "data"
    argv = ["prepare-data", "--source", str(corpus), "--out", str(out), "--shard-tokens", "1024"]
    argv += ["--tokenizer", "bpe", "--vocab-size", "300", "--bpe-train-bytes", "100000"]
    argv += ["--max-val-tokens", "5000", "--text-field", "body", "--split", "train"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert f"prepared {out}:" in printed and "bpe tokenizer (300 ids)" in printed
    assert load_manifest(out).tokenizer == "bpe"

    assert cli.main([*argv[:5], "--vocab-size", "70000", "--tokenizer", "bpe"]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "vocab_size 70000 is outside 257..65535" in error
