"""Fixtures the coordinator's unit tests share: a small prepared corpus and a store."""

import pytest

from crowdtrain.coordinator.data.prepare import PrepareConfig, prepare_data
from crowdtrain.coordinator.store import Store

NUM_SHARDS = 20


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A prepared data folder of 20 train shards (the last 501 tokens) and one val shard."""
    root = tmp_path_factory.mktemp("prepared")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(10):
        line = f"document {i}: the quick brown fox jumps over the lazy dog.\n"
        (corpus / f"doc{i:02d}.txt").write_text(line * 50, encoding="utf-8")
    out = root / "data"
    manifest = prepare_data(
        PrepareConfig(sources=(corpus,), out=out, shard_tokens=1024, val_fraction=0.2)
    )
    assert len(manifest.train_shards) == NUM_SHARDS and len(manifest.val_shards) == 1
    assert min(s.num_tokens for s in manifest.shards) == 501
    return out


@pytest.fixture
def store(tmp_path):
    store = Store(tmp_path / "coordinator")
    yield store
    store.close()
