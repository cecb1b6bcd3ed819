"""LeaseBook on a real SQLite store, with a fake monotonic clock: no test sleeps."""

import dataclasses

import pytest

from crowdtrain.coordinator.records import get_run
from crowdtrain.coordinator.runs.leases import LeaseBook, ReceiptError
from crowdtrain.coordinator.runs.publish import epoch_order, prepare_publication, publish
from crowdtrain.coordinator.store import Store
from crowdtrain.protocol.errors import CrowdtrainError
from crowdtrain.protocol.messages import ReceiptPayload
from tests.coordinator.conftest import NUM_SHARDS
from tests.coordinator.registration import COORDINATOR_KEY
from tests.coordinator.registration import join_peer as _join
from tests.specs import small_spec

LEASE_S = 10.0

SPEC = small_spec(run={"id": "lease-run", "seed": 7}, data={"lease_s": LEASE_S})


class FakeClock:
    """A monotonic clock that moves only when a test advances it."""

    def __init__(self, now_s=1000.0):
        self.now_s = now_s

    def __call__(self):
        return self.now_s

    def advance(self, seconds):
        self.now_s += seconds


@pytest.fixture
def run(store, prepared, tmp_path):
    spec_path = tmp_path / "run.toml"
    spec_path.write_text(SPEC, encoding="utf-8")
    result = publish(store, prepare_publication(spec_path, prepared), COORDINATOR_KEY)
    run = get_run(store, result.run_id)
    assert run.spec.data.lease_s == LEASE_S
    return run


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def book(store, clock):
    return LeaseBook(store, clock=clock)


def _receipt(shard_id, epoch=0):
    return ReceiptPayload(
        shard_id=shard_id,
        epoch=epoch,
        num_sequences=31,
        num_tokens=992,
        loss_sum=90.0,
        started=1000.0,
        finished=1010.0,
    )


def _shards(book, run, epoch=None):
    """Coverage of an epoch as {shard id: (state, holder, num_completions)}."""
    return {
        s["shard"]: (s["state"], s["holder"], s["num_completions"])
        for s in book.coverage(run, epoch)["shards"]
    }


def _ids(granted):
    return [lease.shard_id for lease in granted]


def test_two_peers_get_distinct_shards(run, store, book):
    first = _join(store, run.id, name="one")
    second = _join(store, run.id, name="two")
    one = book.grant(run, first, max_shards=3)
    two = book.grant(run, second, max_shards=3)
    assert len(one) == len(two) == 3
    assert not set(_ids(one)) & set(_ids(two))
    assert all(lease.epoch == 0 and lease.expires_in_s == LEASE_S for lease in one + two)
    shards = _shards(book, run)
    assert {s for s, v in shards.items() if v == ("leased", first.peer_id, 0)} == set(_ids(one))
    assert {s for s, v in shards.items() if v == ("leased", second.peer_id, 0)} == set(_ids(two))
    assert sum(v[0] == "pending" for v in shards.values()) == NUM_SHARDS - 6


def test_unrenewed_lease_expires_and_goes_to_the_next_peer(run, store, book, clock):
    holder = _join(store, run.id, name="holder")
    [lease] = book.grant(run, holder, max_shards=1)

    clock.advance(LEASE_S - 1)
    early = _join(store, run.id, name="early")
    [other] = book.grant(run, early, max_shards=1)
    assert other.shard_id != lease.shard_id
    assert _shards(book, run)[lease.shard_id] == ("leased", holder.peer_id, 0)

    clock.advance(2)
    assert _shards(book, run)[lease.shard_id] == ("pending", None, 0)
    late = _join(store, run.id, name="late")
    [taken] = book.grant(run, late, max_shards=1)
    assert taken.shard_id == lease.shard_id
    assert _shards(book, run)[lease.shard_id] == ("leased", late.peer_id, 0)


def test_renewed_lease_is_kept(run, store, book, clock):
    holder = _join(store, run.id, name="holder")
    [lease] = book.grant(run, holder, max_shards=1)
    for _ in range(3):
        clock.advance(0.8 * LEASE_S)
        book.renew(run, holder)
    other = _join(store, run.id, name="other")
    assert lease.shard_id not in _ids(book.grant(run, other, max_shards=8))
    assert _shards(book, run)[lease.shard_id] == ("leased", holder.peer_id, 0)

    # Renewal runs from the last heartbeat: without one, the lease still ends.
    clock.advance(LEASE_S + 1)
    assert _shards(book, run)[lease.shard_id][:2] == ("pending", None)


def test_a_lease_the_node_no_longer_reports_runs_out(run, store, book, clock):
    """A node that lost a lease (say, a download cut by a coordinator crash) does not
    keep it alive by heartbeating: only the leases it reports are renewed."""
    holder = _join(store, run.id, name="holder")
    kept, lost = book.grant(run, holder, max_shards=2)
    for _ in range(3):
        clock.advance(0.8 * LEASE_S)
        book.renew(run, holder, {(kept.shard_id, kept.epoch)})
    shards = _shards(book, run)
    assert shards[kept.shard_id] == ("leased", holder.peer_id, 0)
    assert shards[lost.shard_id][:2] == ("pending", None)


def test_late_receipt_of_an_expired_lease_counts_as_a_second_completion(run, store, book, clock):
    slow = _join(store, run.id, name="slow")
    fast = _join(store, run.id, name="fast")
    [lease] = book.grant(run, slow, max_shards=1)
    clock.advance(LEASE_S + 1)
    [again] = book.grant(run, fast, max_shards=1)
    assert again.shard_id == lease.shard_id

    book.complete(run, slow, _receipt(lease.shard_id))
    assert _shards(book, run)[lease.shard_id] == ("done", None, 1)
    book.complete(run, fast, _receipt(lease.shard_id))
    assert _shards(book, run)[lease.shard_id] == ("done", None, 2)

    receipts = store.list_receipts(run.id)
    assert sorted(r["peer_id"] for r in receipts) == sorted([slow.peer_id, fast.peer_id])
    assert all(n <= 1 for s, (_, _, n) in _shards(book, run).items() if s != lease.shard_id)
    assert lease.shard_id not in _ids(book.grant(run, slow, max_shards=8))


def test_replayed_receipt_is_refused(run, store, book):
    session = _join(store, run.id)
    [lease] = book.grant(run, session, max_shards=1)
    book.complete(run, session, _receipt(lease.shard_id))
    with pytest.raises(ReceiptError, match=f"shard '{lease.shard_id}' .* already receipted"):
        book.complete(run, session, _receipt(lease.shard_id))
    assert len(store.list_receipts(run.id)) == 1
    assert _shards(book, run)[lease.shard_id] == ("done", None, 1)


def test_receipt_from_a_peer_that_never_held_the_shard_changes_nothing(run, store, book):
    holder = _join(store, run.id, name="holder")
    stranger = _join(store, run.id, name="stranger")
    [lease] = book.grant(run, holder, max_shards=1)
    before = book.coverage(run)
    with pytest.raises(ReceiptError, match="was never leased to this peer"):
        book.complete(run, stranger, _receipt(lease.shard_id))
    assert store.list_receipts(run.id) == []
    assert book.coverage(run) == before
    assert _shards(book, run)[lease.shard_id] == ("leased", holder.peer_id, 0)


def test_release_returns_shards_to_pending_at_once(run, store, book):
    leaving = _join(store, run.id, name="leaving")
    staying = _join(store, run.id, name="staying")
    held = _ids(book.grant(run, leaving, max_shards=3))
    [kept] = _ids(book.grant(run, staying, max_shards=1))
    book.release(leaving)
    shards = _shards(book, run)
    assert all(shards[s] == ("pending", None, 0) for s in held)
    assert shards[kept] == ("leased", staying.peer_id, 0)
    newcomer = _join(store, run.id, name="newcomer")
    assert _ids(book.grant(run, newcomer, max_shards=3)) == held


def test_resume_hands_back_the_peers_own_live_leases_first(run, store, book):
    session = _join(store, run.id)
    held = _ids(book.grant(run, session, max_shards=2))

    resumed = book.grant(run, session, max_shards=2, resume=True)
    assert _ids(resumed) == held
    assert all(lease.expires_in_s == LEASE_S for lease in resumed)
    assert sum(v[0] == "leased" for v in _shards(book, run).values()) == 2

    topped_up = _ids(book.grant(run, session, max_shards=3, resume=True))
    assert topped_up[:2] == held and topped_up[2] not in held

    fresh = _ids(book.grant(run, session, max_shards=2))
    assert len(fresh) == 2 and not set(fresh) & set(topped_up)


def test_finished_epoch_starts_the_next_in_a_new_order(run, store, book):
    session = _join(store, run.id)
    epoch_0 = [s["shard"] for s in book.coverage(run)["shards"]]
    while any(v[0] != "done" for v in _shards(book, run, 0).values()):
        for lease in book.grant(run, session, max_shards=8):
            assert lease.epoch == 0
            book.complete(run, session, _receipt(lease.shard_id))

    # Epoch 1 starts when the next shard is asked for, not when the last receipt lands.
    assert book.coverage(run)["epoch"] == 0
    assert book.current_epoch(run) == 1
    [lease] = book.grant(run, session, max_shards=1)
    assert lease.epoch == 1
    epoch_1 = [s["shard"] for s in book.coverage(run)["shards"]]
    assert book.coverage(run)["epoch"] == 1
    assert lease.shard_id == epoch_1[0]
    assert sorted(epoch_1) == sorted(epoch_0) and epoch_1 != epoch_0
    # The order is a function of (run seed, epoch): reproducible, and another seed differs.
    assert epoch_0 == epoch_order(run.spec, run.manifest, 0)
    assert epoch_1 == epoch_order(run.spec, run.manifest, 1)
    reseeded = dataclasses.replace(run.spec, run=dataclasses.replace(run.spec.run, seed=8))
    assert epoch_order(reseeded, run.manifest, 1) != epoch_1

    past = book.coverage(run, epoch=0)
    assert past["epoch"] == 0
    assert all(s["state"] == "done" and s["num_completions"] == 1 for s in past["shards"])


def test_coverage_of_an_epoch_not_started_is_refused(run, store, book):
    with pytest.raises(CrowdtrainError, match="epoch 1 has not started; the current one is 0"):
        book.coverage(run, epoch=1)
    with pytest.raises(CrowdtrainError, match="epoch -1 has not started"):
        book.coverage(run, epoch=-1)


def test_lease_survives_a_coordinator_restart(run, store, book, clock, tmp_path):
    holder = _join(store, run.id)
    [lease] = book.grant(run, holder, max_shards=1)
    clock.advance(LEASE_S - 1)
    store.close()

    reopened = Store(tmp_path / "coordinator", create=False)
    try:
        # A new process: its monotonic clock has nothing to do with the old one's.
        restarted_clock = FakeClock(now_s=5.0)
        restarted = LeaseBook(reopened, clock=restarted_clock)
        run = get_run(reopened, run.id)
        assert _shards(restarted, run)[lease.shard_id] == ("leased", holder.peer_id, 0)

        restarted_clock.advance(LEASE_S - 1)
        assert _shards(restarted, run)[lease.shard_id] == ("leased", holder.peer_id, 0)
        other = _join(reopened, run.id, name="other")
        assert lease.shard_id not in _ids(restarted.grant(run, other, max_shards=1))

        restarted_clock.advance(2)
        assert _shards(restarted, run)[lease.shard_id][:2] == ("pending", None)
        assert _ids(restarted.grant(run, other, max_shards=1)) == [lease.shard_id]
    finally:
        reopened.close()


def test_lease_of_a_peer_gone_across_a_restart_expires_lease_s_after_the_restart(
    run, store, book, tmp_path
):
    gone = _join(store, run.id, name="gone")
    [lease] = book.grant(run, gone, max_shards=1)
    store.close()

    reopened = Store(tmp_path / "coordinator", create=False)
    try:
        restarted_clock = FakeClock(now_s=5.0)
        restarted = LeaseBook(reopened, clock=restarted_clock)
        run = get_run(reopened, run.id)
        restarted_clock.advance(LEASE_S + 1)
        newcomer = _join(reopened, run.id, name="newcomer")
        assert _ids(restarted.grant(run, newcomer, max_shards=1)) == [lease.shard_id]
    finally:
        reopened.close()


def test_one_epoch_three_peers_every_shard_exactly_once(run, store, book):
    sessions = [_join(store, run.id, name=f"peer-{i}") for i in range(3)]
    granted = []
    turn = 0
    while any(v[0] != "done" for v in _shards(book, run, 0).values()):
        session = sessions[turn % len(sessions)]
        turn += 1
        for lease in book.grant(run, session, max_shards=3):
            assert lease.epoch == 0
            granted.append(lease.shard_id)
            book.complete(run, session, _receipt(lease.shard_id))

    assert sorted(granted) == sorted(s.id for s in run.manifest.train_shards)
    shards = _shards(book, run, 0)
    assert len(shards) == NUM_SHARDS
    assert all(v == ("done", None, 1) for v in shards.values())
    receipts = store.list_receipts(run.id)
    assert len(receipts) == NUM_SHARDS
    assert {r["peer_id"] for r in receipts} == {s.peer_id for s in sessions}


def test_a_peer_with_nothing_gets_the_next_epoch_while_the_last_shards_are_held(run, store, book):
    """A node joining while every remaining shard is leased still gets data; the
    epoch still ends only when its own shards are done."""
    busy = _join(store, run.id, name="busy")
    held = []
    while True:
        granted = book.grant(run, busy, max_shards=8)
        if not granted:
            break
        held += granted
    assert {lease.epoch for lease in held} == {0} and len(held) == NUM_SHARDS

    newcomer = _join(store, run.id, name="newcomer")
    early = book.grant(run, newcomer, max_shards=2)
    assert len(early) == 2 and {lease.epoch for lease in early} == {1}
    assert book.coverage(run)["epoch"] == 0
    assert book.grant(run, newcomer, max_shards=2)  # the newest epoch still has shards

    for lease in held:
        book.complete(run, busy, _receipt(lease.shard_id))
    assert all(v == ("done", None, 1) for v in _shards(book, run, 0).values())
    assert book.coverage(run)["epoch"] == 1
