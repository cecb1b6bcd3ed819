import json
import re

import numpy as np
import pytest

from crowdtrain.protocol.errors import ShardError
from crowdtrain.protocol.shards import (
    HEADER_SIZE,
    ShardEntry,
    ShardManifest,
    load_manifest,
    read_shard,
    sha256_file,
    verify_shard,
    write_shard,
)


def _shard(tmp_path):
    """A uint16 shard of 1000 tokens and its manifest entry."""
    path = tmp_path / "train-00000.bin"
    size_bytes, sha256 = write_shard(path, np.arange(1000), "uint16")
    return path, ShardEntry("train-00000", path.name, "train", 1000, size_bytes, sha256, 3000)


def _manifest(**changes):
    fields = dict(
        version=2,
        tokenizer="byte",
        vocab_size=256,
        dtype="uint8",
        shards=(
            ShardEntry("train-00000", "train-00000.bin", "train", 1000, 1024, "a" * 64, 1000),
            ShardEntry("train-00001", "train-00001.bin", "train", 10, 34, "b" * 64, 10),
            ShardEntry("val-00000", "val-00000.bin", "val", 100, 124, "c" * 64, 100),
        ),
        source="3 documents from tests",
    )
    fields.update(changes)
    return ShardManifest(**fields)


@pytest.mark.parametrize("dtype, high", [("uint8", 255), ("uint16", 65535), ("uint32", 2**32 - 1)])
def test_shard_round_trip_for_each_dtype(tmp_path, dtype, high):
    tokens = np.array([0, 1, 2, high, high - 1, 7], dtype=np.int64)
    path = tmp_path / "s.bin"
    size_bytes, sha256 = write_shard(path, tokens, dtype)
    assert size_bytes == path.stat().st_size == HEADER_SIZE + len(tokens) * np.dtype(dtype).itemsize
    assert sha256 == sha256_file(path)
    entry = ShardEntry("s", "s.bin", "train", len(tokens), size_bytes, sha256, len(tokens))
    for expected in (None, entry):
        read = read_shard(path, expected)
        assert read.dtype == np.dtype(dtype)
        assert read.tolist() == tokens.tolist()
        assert not read.flags.writeable


def test_empty_shard_round_trips(tmp_path):
    path = tmp_path / "e.bin"
    write_shard(path, np.array([], dtype=np.uint8), "uint8")
    assert read_shard(path).size == 0


def test_token_that_does_not_fit_is_refused(tmp_path):
    with pytest.raises(ShardError, match="256 does not fit in uint8"):
        write_shard(tmp_path / "s.bin", np.array([1, 256]), "uint8")


def test_wrong_magic_names_the_file(tmp_path):
    path, _ = _shard(tmp_path)
    path.write_bytes(b"NOTASHRD" + path.read_bytes()[8:])
    with pytest.raises(ShardError, match=f"{path} is not a crowdtrain shard"):
        read_shard(path)


@pytest.mark.parametrize("cut", [10, HEADER_SIZE + 3])
def test_truncated_shard_names_the_file(tmp_path, cut):
    path, _ = _shard(tmp_path)
    path.write_bytes(path.read_bytes()[:cut])
    with pytest.raises(ShardError, match=f"shard {path} is truncated"):
        read_shard(path)


def test_over_long_shard_names_the_file(tmp_path):
    path, _ = _shard(tmp_path)
    path.write_bytes(path.read_bytes() + b"\0\0")
    with pytest.raises(ShardError, match=f"shard {path} is longer than its header says"):
        read_shard(path)


def test_unknown_version_and_dtype_are_refused(tmp_path):
    path, _ = _shard(tmp_path)
    good = path.read_bytes()
    path.write_bytes(good[:8] + b"\x02\x00" + good[10:])
    with pytest.raises(ShardError, match="format version 2"):
        read_shard(path)
    path.write_bytes(good[:10] + b"\x03" + good[11:])
    with pytest.raises(ShardError, match="unknown dtype code 3"):
        read_shard(path)


def test_tampered_shard_fails_its_checksum(tmp_path):
    path, entry = _shard(tmp_path)
    data = bytearray(path.read_bytes())
    data[HEADER_SIZE + 100] ^= 0x01
    path.write_bytes(bytes(data))
    actual = sha256_file(path)
    with pytest.raises(ShardError) as info:
        read_shard(path, entry)
    message = str(info.value)
    assert str(path) in message and "'train-00000'" in message
    assert entry.sha256[:12] in message and actual[:12] in message
    with pytest.raises(ShardError, match="fails its checksum"):
        verify_shard(path, entry)


def test_verify_shard_reports_a_missing_file(tmp_path):
    path, entry = _shard(tmp_path)
    path.unlink()
    with pytest.raises(ShardError, match="'train-00000' is missing"):
        verify_shard(path, entry)


def test_manifest_json_round_trip_and_stable_hash():
    manifest = _manifest()
    text = manifest.to_json()
    again = ShardManifest.from_json(text)
    assert again == manifest
    assert again.to_json() == text
    assert again.hash == manifest.hash == _manifest().hash
    assert len(manifest.hash) == 64
    assert text == json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"))
    pretty = json.dumps(json.loads(text), indent=4)
    assert ShardManifest.from_json(pretty).hash == manifest.hash
    assert [s.id for s in manifest.train_shards] == ["train-00000", "train-00001"]
    assert [s.id for s in manifest.val_shards] == ["val-00000"]
    assert manifest.num_train_tokens == 1010
    assert _manifest(source="other").hash != manifest.hash


def _edited(edit):
    data = json.loads(_manifest().to_json())
    edit(data)
    return json.dumps(data)


@pytest.mark.parametrize(
    "edit, key",
    [
        (lambda d: d.update(colour="red"), "'colour'"),
        (lambda d: d.pop("vocab_size"), "'vocab_size'"),
        (lambda d: d["shards"][1].update(extra=1), "'shards[1].extra'"),
        (lambda d: d["shards"][0].pop("sha256"), "'shards[0].sha256'"),
        (lambda d: d.update(vocab_size="256"), "'vocab_size' must be an integer"),
        (lambda d: d["shards"][2].update(num_tokens=True), "'shards[2].num_tokens' must be"),
        (lambda d: d["shards"][0].update(sha256="xyz"), "bad sha256"),
        (lambda d: d["shards"][0].update(file="../etc/passwd"), "bad file"),
        (lambda d: d["shards"][0].update(size_bytes=5), "bad size_bytes"),
        (lambda d: d["shards"][0].update(split="test"), "bad split"),
        (lambda d: d.update(dtype="int8"), "'dtype'"),
        (lambda d: d["shards"][0].pop("num_bytes"), "'shards[0].num_bytes'"),
        (lambda d: d["shards"][0].update(num_bytes=-1), "bad num_bytes: -1 < 0"),
        (lambda d: d["shards"][0].update(num_bytes=999), "bad num_bytes: 1000 byte tokens"),
        (lambda d: d.pop("tokenizer_file"), "'tokenizer_file'"),
        (lambda d: d.update(tokenizer_sha256=5), "'tokenizer_sha256' must be a string or null"),
        (lambda d: d.update(tokenizer="wordpiece"), "'tokenizer' is 'wordpiece'"),
        (lambda d: d.update(tokenizer_file="tokenizer.json"), "must be null for the byte"),
    ],
)
def test_bad_manifest_key_is_named(edit, key):
    with pytest.raises(ShardError, match=key.replace("[", r"\[").replace("]", r"\]")):
        ShardManifest.from_json(_edited(edit))


def test_newer_manifest_version_asks_for_an_upgrade():
    text = _edited(lambda d: d.update(version=3, new_key=1))
    with pytest.raises(ShardError, match="version 3 is not supported.*upgrade crowdtrain"):
        ShardManifest.from_json(text)


def test_version_1_manifest_asks_to_prepare_again(tmp_path):
    def to_v1(data):
        data.update(version=1)
        del data["tokenizer_file"], data["tokenizer_sha256"]
        for shard in data["shards"]:
            del shard["num_bytes"]

    (tmp_path / "manifest.json").write_text(_edited(to_v1))
    with pytest.raises(ShardError) as info:
        load_manifest(tmp_path)
    message = str(info.value)
    assert "manifest version 1 was prepared by an older crowdtrain" in message
    assert "run `crowdtrain-coordinator prepare-data` again" in message


def _bpe_manifest(**changes):
    fields = dict(
        tokenizer="bpe",
        vocab_size=4096,
        dtype="uint16",
        shards=(
            ShardEntry("train-00000", "train-00000.bin", "train", 1000, 2024, "a" * 64, 3400),
            ShardEntry("val-00000", "val-00000.bin", "val", 100, 224, "c" * 64, 350),
        ),
        tokenizer_file="tokenizer.json",
        tokenizer_sha256="d" * 64,
    )
    fields.update(changes)
    return _manifest(**fields)


def test_bpe_manifest_pins_its_tokenizer_file():
    manifest = _bpe_manifest()
    assert ShardManifest.from_json(manifest.to_json()) == manifest
    data = json.loads(manifest.to_json())
    assert (data["tokenizer_file"], data["tokenizer_sha256"]) == ("tokenizer.json", "d" * 64)
    assert [s["num_bytes"] for s in data["shards"]] == [3400, 350]
    assert _bpe_manifest(tokenizer_sha256="e" * 64).hash != manifest.hash
    byte = json.loads(_manifest().to_json())
    assert byte["tokenizer_file"] is None and byte["tokenizer_sha256"] is None


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"tokenizer_file": None}, "'tokenizer_file' and 'tokenizer_sha256' must be set for"),
        ({"tokenizer_file": "../tokenizer.json"}, "use a plain file name"),
        ({"tokenizer_file": "train-00000.bin"}, "file 'train-00000.bin' more than once"),
        ({"tokenizer_sha256": None}, "'tokenizer_sha256' must be set for the bpe tokenizer"),
        ({"tokenizer_sha256": "D" * 64}, "use 64 lowercase hex digits"),
        ({"vocab_size": 70000}, "'vocab_size' is 70000, which uint16 cannot hold"),
    ],
)
def test_bad_bpe_manifest_is_refused(changes, message):
    text = json.dumps({**json.loads(_bpe_manifest().to_json()), **changes})
    with pytest.raises(ShardError, match=re.escape(message)):
        ShardManifest.from_json(text)


def test_manifest_that_is_not_json_is_refused():
    with pytest.raises(ShardError, match="not valid JSON"):
        ShardManifest.from_json("{")
    with pytest.raises(ShardError, match="must be a JSON object"):
        ShardManifest.from_json("[]")


def test_load_manifest_without_one_says_how_to_make_one(tmp_path):
    with pytest.raises(ShardError) as info:
        load_manifest(tmp_path)
    assert str(info.value) == (
        f"{tmp_path} is not a crowdtrain data folder: no manifest.json; "
        "create one with `crowdtrain-coordinator prepare-data`"
    )


def test_load_manifest_names_the_file_of_a_bad_one(tmp_path):
    (tmp_path / "manifest.json").write_text(_edited(lambda d: d.pop("source")))
    with pytest.raises(ShardError, match=r"manifest\.json: manifest is missing key 'source'"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(_manifest().to_json())
    assert load_manifest(tmp_path) == _manifest()
