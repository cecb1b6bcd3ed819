import logging

import numpy as np
import pytest

from crowdtrain.coordinator.prepare import PrepareConfig, prepare_data
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
    for shard in manifest.shards:
        verify_shard(out / shard.file, shard)
        assert sha256_file(out / shard.file) == shard.sha256
    assert load_manifest(out) == manifest
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["manifest.json", *(s.file for s in manifest.shards)]
    )

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "bad.txt: it is not valid UTF-8" in warnings[0]
    assert "nul.txt: it contains NUL bytes" in warnings[1]
    assert "5 documents (3 skipped)" in caplog.records[-1].getMessage()


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
    with pytest.raises(DataError, match=f"no text found in {tmp_path}; pass --source"):
        prepare_data(PrepareConfig((str(tmp_path),), tmp_path / "data"))
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"shard_tokens": 1000}, "shard_tokens 1000 is too small"),
        ({"val_fraction": 0.5}, r"val_fraction 0.5 is outside \[0, 0.5\)"),
        ({"val_fraction": -0.1}, "val_fraction -0.1 is outside"),
        ({"sources": ()}, "no sources given"),
    ],
)
def test_bad_config_is_refused(tmp_path, changes, message):
    fields = {"sources": ("stdlib",), "out": tmp_path / "data", **changes}
    with pytest.raises(DataError, match=message):
        PrepareConfig(**fields)
