"""Fixtures the coordinator's unit tests share: a small prepared corpus and a store."""

import pytest

from crowdtrain.coordinator.runs.leases import LeaseBook
from crowdtrain.coordinator.store import Store
from crowdtrain.coordinator.swarm.dht import ProgressHistory
from crowdtrain.protocol.shards import load_manifest
from tests.coordinator.ledger_support import prepare_small_data, publish_run

NUM_SHARDS = 20


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A prepared data folder of 20 train shards (the last 501 tokens) and one val shard."""
    out = prepare_small_data(tmp_path_factory.mktemp("prepared"))
    manifest = load_manifest(out)
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
