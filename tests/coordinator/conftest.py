"""Fixtures the coordinator's unit tests share: a small prepared corpus and a store."""

import pytest

from crowdtrain.coordinator.data.prepare import PrepareConfig, prepare_data
from crowdtrain.coordinator.runs.leases import LeaseBook
from crowdtrain.coordinator.store import Store
from crowdtrain.coordinator.swarm.dht import ProgressHistory
from tests.coordinator.ledger_support import publish_run

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


# the ledger's and the spot checks' tests (a module may define its own run or book)


@pytest.fixture
def run(store, prepared, tmp_path):
    return publish_run(store, prepared, tmp_path, "ledger-run", 0.0)


@pytest.fixture
def spot_run(store, prepared, tmp_path):
    return publish_run(store, prepared, tmp_path, "spot-run", 1.0)


@pytest.fixture
def pick_run(store, prepared, tmp_path):
    """Spot checks of 2 of a micro-batch's 4 sequences."""
    return publish_run(store, prepared, tmp_path, "pick-run", 1.0, spot_check_sequences=2)


@pytest.fixture
def history():
    return ProgressHistory()


@pytest.fixture
def book(store):
    return LeaseBook(store)
