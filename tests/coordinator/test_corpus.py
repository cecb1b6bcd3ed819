"""Every kind of source prepares into the same shards; bad input is named, counted, never written."""

import hashlib
import json
import logging
import re
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Dataset, DatasetDict

from crowdtrain.coordinator.data.prepare import PrepareConfig, prepare_data
from crowdtrain.protocol.errors import DataError
from crowdtrain.protocol.shards import read_shard

TEXTS = [f"document {i}: {'ünïcödé text, ' * (i + 3)}\n" for i in range(12)]


def _documents(folder, manifest):
    """Every document of a byte-level data folder, train then validation."""
    documents = []
    for split in ("train", "val"):
        tokens = np.concatenate(
            [read_shard(folder / s.file, s) for s in manifest.shards if s.split == split]
        )
        assert tokens[-1] == 0
        documents += [part.decode() for part in tokens[:-1].tobytes().split(b"\0")]
    return documents


@pytest.fixture(autouse=True)
def _log_info(caplog):
    caplog.set_level(logging.INFO)


def _prepare(tmp_path, *sources, out="data", **changes):
    config = PrepareConfig(tuple(map(str, sources)), tmp_path / out, **changes)
    return prepare_data(config)


def _summary(caplog):
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("prepared")][-1]


def _refused(tmp_path, message, *sources, **changes):
    """Preparing fails with ``message`` and leaves nothing behind."""
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(DataError, match=re.escape(message)) as refused:
        _prepare(tmp_path, *sources, out="refused", **changes)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    return refused.value


def _write_jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_jsonl_round_trip_skips_and_counts_bad_lines(tmp_path, caplog):
    lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(TEXTS)]
    lines[2:2] = [
        "{not json",
        "[1, 2]",
        json.dumps({"id": 99}),
        json.dumps({"text": 7}),
        json.dumps({"text": ""}),
        "",
    ]
    path = _write_jsonl(tmp_path / "docs.jsonl", lines)
    manifest = _prepare(tmp_path, path)
    assert sorted(_documents(tmp_path / "data", manifest)) == sorted(TEXTS)
    assert manifest.source.startswith("12 documents from ")
    warnings = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert f"{path} line 3: it is not JSON" in warnings
    assert f"{path} line 4: it is a JSON list, not an object" in warnings
    assert f"{path} line 5: the record has no field 'text'" in warnings
    assert f"{path} line 6: field 'text' is a number, not a string" in warnings
    assert "docs.jsonl:7: it is empty" in caplog.text
    assert (
        "12 documents (5 skipped: 1 empty, 2 not a JSON object, 1 not a string, "
        "1 without 'text')" in _summary(caplog)
    )


def test_jsonl_reads_the_text_field_asked_for(tmp_path):
    path = _write_jsonl(tmp_path / "docs.jsonl", [json.dumps({"body": t}) for t in TEXTS])
    manifest = _prepare(tmp_path, path, text_field="body")
    assert sorted(_documents(tmp_path / "data", manifest)) == sorted(TEXTS)


def test_jsonl_split_is_chosen_by_path_and_line(tmp_path):
    lines = [json.dumps({"text": f"line {i}\n" * 10}) for i in range(300)]
    path = _write_jsonl(tmp_path / "docs.jsonl", lines)
    manifest = _prepare(tmp_path, path, val_fraction=0.1)
    (val,) = manifest.val_shards
    held_out = [
        i
        for i in range(300)
        if int(hashlib.sha256(f"docs.jsonl:{i + 1}".encode()).hexdigest()[:8], 16) / 2**32 < 0.1
    ]
    assert val.num_tokens == sum(len(f"line {i}\n" * 10) + 1 for i in held_out)


def test_jsonl_without_the_field_in_any_record_is_refused(tmp_path):
    path = _write_jsonl(tmp_path / "docs.jsonl", [json.dumps({"body": t, "id": 1}) for t in TEXTS])
    _refused(
        tmp_path,
        f"{path}: no record has the field 'text' (fields found: 'body', 'id'); "
        "pass --text-field with the field that holds the text",
        path,
    )


def test_jsonl_of_binary_garbage_is_skipped_and_counted(tmp_path, caplog):
    good = _write_jsonl(tmp_path / "good.jsonl", [json.dumps({"text": t}) for t in TEXTS])
    (tmp_path / "garbage.jsonl").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    (tmp_path / "empty.jsonl").write_bytes(b"")
    sources = [tmp_path / name for name in ("garbage.jsonl", "latin1.jsonl", "empty.jsonl")]
    manifest = _prepare(tmp_path, *sources, good)
    assert sorted(_documents(tmp_path / "data", manifest)) == sorted(TEXTS)
    assert f"{sources[0]}: it contains NUL bytes, so it is not text" in caplog.text
    assert f"{sources[1]} line 1: byte 13 is not UTF-8; save it as UTF-8" in caplog.text
    assert "12 documents (3 skipped: 1 empty, 1 not UTF-8, 1 with NUL bytes)" in _summary(caplog)


def _write_parquet(path, column, values, row_group_size=4):
    pq.write_table(
        pa.table({column: values, "n": list(range(len(values)))}),
        path,
        row_group_size=row_group_size,
    )
    return path


def test_parquet_round_trip_in_row_groups(tmp_path, caplog):
    path = _write_parquet(tmp_path / "docs.parquet", "text", [*TEXTS[:5], None, *TEXTS[5:]])
    assert pq.ParquetFile(path).num_row_groups == 4
    manifest = _prepare(tmp_path, path)
    assert sorted(_documents(tmp_path / "data", manifest)) == sorted(TEXTS)
    assert f"{path} row 5: field 'text' is null, not a string" in caplog.text
    assert "12 documents (1 skipped: 1 not a string)" in _summary(caplog)


def test_parquet_without_the_column_is_refused(tmp_path):
    path = _write_parquet(tmp_path / "docs.parquet", "body", TEXTS)
    _refused(
        tmp_path,
        f"{path}: no column 'text' (columns: 'body', 'n'); pass --text-field with the column",
        path,
    )
    _refused(tmp_path, f"{path}: column 'n' holds int64, not text", path, text_field="n")


def test_parquet_that_is_not_parquet_is_skipped_and_counted(tmp_path, caplog):
    good = _write_parquet(tmp_path / "good.parquet", "text", TEXTS)
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 but not really" * 10)
    manifest = _prepare(tmp_path, tmp_path)
    assert sorted(_documents(tmp_path / "data", manifest)) == sorted(TEXTS)
    assert f"skipping {tmp_path / 'bad.parquet'}: it is not a Parquet file" in caplog.text
    assert "12 documents (1 skipped: 1 not Parquet)" in _summary(caplog)
    assert good.exists()


def test_folder_mixes_text_jsonl_and_parquet(tmp_path):
    root = tmp_path / "mixed"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text(TEXTS[0])
    _write_jsonl(root / "sub" / "b.jsonl", [json.dumps({"text": t}) for t in TEXTS[1:6]])
    _write_parquet(root / "c.parquet", "text", TEXTS[6:])
    manifest = _prepare(tmp_path, root)
    assert sorted(_documents(tmp_path / "data", manifest)) == sorted(TEXTS)


def test_datasets_folder_round_trip_in_order(tmp_path, caplog):
    dataset = Dataset.from_dict({"text": [*TEXTS, None], "n": list(range(13))})
    dataset.save_to_disk(tmp_path / "ds", num_shards=3)
    assert len(list((tmp_path / "ds").glob("*.arrow"))) == 3
    manifest = _prepare(tmp_path, tmp_path / "ds")
    documents = _documents(tmp_path / "data", manifest)
    assert sorted(documents) == sorted(TEXTS)
    assert documents[:-1] == [t for t in TEXTS if t != documents[-1]]  # train, in order
    assert "12 documents (1 skipped: 1 not a string)" in _summary(caplog)


def test_datasets_dict_folder_takes_the_split(tmp_path):
    splits = {"train": TEXTS[:8], "test": TEXTS[8:]}
    DatasetDict({k: Dataset.from_dict({"text": v}) for k, v in splits.items()}).save_to_disk(
        tmp_path / "dd"
    )
    manifest = _prepare(tmp_path, tmp_path / "dd")
    assert sorted(_documents(tmp_path / "data", manifest)) == sorted(splits["train"])
    manifest = _prepare(tmp_path, tmp_path / "dd", split="test")
    assert sorted(_documents(tmp_path / "data", manifest)) == sorted(splits["test"])
    _refused(
        tmp_path,
        f"{tmp_path / 'dd'} has no split 'validation' (splits: 'test', 'train'); pass --split",
        tmp_path / "dd",
        split="validation",
    )


def test_datasets_folder_without_the_field_is_refused(tmp_path):
    Dataset.from_dict({"body": TEXTS, "n": list(range(12))}).save_to_disk(tmp_path / "ds")
    _refused(
        tmp_path,
        f"{tmp_path / 'ds'}: no field 'text' (fields: 'body', 'n'); pass --text-field",
        tmp_path / "ds",
    )
    _refused(tmp_path, "field 'n' holds Value(", tmp_path / "ds", text_field="n")


class _FakeHub:
    """Stands in for ``datasets.load_dataset``: the tests never reach the network."""

    def __init__(self, records):
        self.records = records
        self.calls = []

    def __call__(self, name, split, streaming):
        self.calls.append((name, split, streaming))
        stream = Dataset.from_list(self.records).to_iterable_dataset()
        return stream


def test_hub_dataset_is_streamed_once(tmp_path, monkeypatch):
    hub = _FakeHub([{"text": t} for t in TEXTS])
    monkeypatch.setattr("datasets.load_dataset", hub)
    manifest = _prepare(tmp_path, "hf:someone/corpus", split="train")
    assert hub.calls == [("someone/corpus", "train", True)]
    assert sorted(_documents(tmp_path / "data", manifest)) == sorted(TEXTS)
    assert manifest.source == "12 documents from hf:someone/corpus"
    again = _prepare(tmp_path, "hf:someone/corpus:test", out="again")
    assert hub.calls[1] == ("someone/corpus", "test", True)
    assert again.shards == manifest.shards  # keys name the split, so the split may differ
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "data"]  # no spool left


def test_hub_dataset_without_the_field_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr("datasets.load_dataset", _FakeHub([{"body": t} for t in TEXTS]))
    _refused(tmp_path, "hf:corpus: no field 'text' (fields: 'body')", "hf:corpus")


def test_hub_dataset_that_cannot_be_opened_is_refused(tmp_path, monkeypatch):
    def offline(name, split, streaming):
        raise ConnectionError("no network")

    monkeypatch.setattr("datasets.load_dataset", offline)
    _refused(
        tmp_path, "cannot open hf:corpus split 'train' (no network); check the name", "hf:corpus"
    )


def _without_the_corpus_extra(monkeypatch):
    for module in ("pyarrow", "pyarrow.parquet", "datasets"):
        monkeypatch.setitem(sys.modules, module, None)  # importing it raises ImportError


@pytest.mark.parametrize(
    ("kind", "needs"),
    [
        ("parquet", "reading Parquet needs pyarrow"),
        ("datasets folder", "reading a datasets folder needs datasets"),
        ("hub", "reading a hub dataset needs datasets"),
    ],
)
def test_arrow_source_without_the_corpus_extra_names_it(tmp_path, monkeypatch, kind, needs):
    if kind == "parquet":
        source = _write_parquet(tmp_path / "docs.parquet", "text", TEXTS)
    elif kind == "datasets folder":
        source = tmp_path / "ds"
        Dataset.from_dict({"text": TEXTS}).save_to_disk(source)
    else:
        source = "hf:someone/corpus"
    _without_the_corpus_extra(monkeypatch)
    message = f"{needs}: pip install 'crowdtrain[corpus]'"
    assert str(_refused(tmp_path, message, source)) == message


def test_text_and_jsonl_need_no_corpus_extra(tmp_path, monkeypatch):
    _without_the_corpus_extra(monkeypatch)
    (tmp_path / "a.txt").write_text(TEXTS[0])
    path = _write_jsonl(tmp_path / "b.jsonl", [json.dumps({"text": t}) for t in TEXTS[1:]])
    manifest = _prepare(tmp_path, tmp_path / "a.txt", path)
    assert sorted(_documents(tmp_path / "data", manifest)) == sorted(TEXTS)


def test_corpus_of_bad_records_only_is_refused_with_the_counts(tmp_path):
    path = _write_jsonl(
        tmp_path / "bad.jsonl", ["[1]", "{oops", json.dumps({"text": None}), json.dumps({})]
    )
    _refused(
        tmp_path,
        f"no text found in {path} (4 skipped: 2 not a JSON object, 1 not a string, "
        "1 without 'text'); pass --source",
        path,
    )
