"""Progress records that claim epochs the swarm cannot have reached are not read
(crowdtrain.node.swarm.progress): one hostile DHT record used to move every peer."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace

import hivemind
import pytest

from crowdtrain.node.swarm.progress import PlausibleProgressTracker, epoch_limit, plausible_records
from crowdtrain.node.swarm.rounds import majority_round


def record(peer: str, epoch: int) -> SimpleNamespace:
    """A DHT entry as hivemind's ProgressTracker reads it."""
    return SimpleNamespace(value={"peer_id": peer.encode(), "epoch": epoch})


def no_view() -> int | None:
    return None


@dataclass
class TwoDHTs:
    """Two connected DHT peers, and the trackers a test made on them (shut down after)."""

    first: hivemind.DHT
    second: hivemind.DHT
    trackers: list[PlausibleProgressTracker] = field(default_factory=list)


@pytest.fixture
def two_dhts() -> Iterator[TwoDHTs]:
    first = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    second = hivemind.DHT(
        start=True,
        host_maddrs=["/ip4/127.0.0.1/tcp/0"],
        initial_peers=[str(m) for m in first.get_visible_maddrs()],
    )
    made = TwoDHTs(first, second)
    try:
        yield made
    finally:
        for tracker in made.trackers:
            tracker.shutdown(5)
        second.shutdown()
        first.shutdown()


@pytest.mark.parametrize(
    ("own", "others", "trusted", "limit"),
    [
        (10, [10, 10], None, 11),  # one ahead of us: a peer that ended the epoch first
        (10, [10, 15], None, 11),  # one record far ahead of the others: nobody's epoch
        (10, [10, 10, 2**62], None, 11),
        (0, [50], None, 51),  # a newcomer with one other peer follows it
        (3, [40, 40, 39], None, 41),  # a peer that slept catches up with the majority
        (3, [40, 41, 2], None, 41),
        (10, [10, 15], 14, 14),  # the coordinator's view backs the swarm's epoch
        (10, [], None, 11),
    ],
)
def test_epoch_limit(own: int, others: list[int], trusted: int | None, limit: int) -> None:
    assert epoch_limit(own, others, trusted) == limit


def test_a_record_far_ahead_is_left_out_and_ours_is_not_a_vote() -> None:
    metadata = {
        b"a": record("honest", 7),
        b"me": record("me", 7),
        b"x": record("hostile", 12),
    }
    asked = []

    def view() -> int | None:
        asked.append(True)
        return 7

    kept, ignored = plausible_records(metadata, 7, b"me", view)
    assert set(kept) == {b"a", b"me"}
    assert ignored == [(b"x", 12, 8)]
    assert asked  # asked only because a record claimed more than the peers back


def test_the_coordinators_view_is_asked_only_when_needed() -> None:
    metadata = {b"a": record("honest", 8), b"me": record("me", 7)}

    def view() -> int | None:
        raise AssertionError("asked")

    kept, ignored = plausible_records(metadata, 7, b"me", view)
    assert set(kept) == {b"a", b"me"} and ignored == []


def test_a_hostile_majority_is_what_the_roster_must_stop() -> None:
    """Two sybils against one honest peer win the vote: what a record says is only as
    good as the peers behind it (the roster bounds them)."""
    metadata = {b"a": record("honest", 7), b"s1": record("s1", 30), b"s2": record("s2", 30)}
    kept, _ = plausible_records(metadata, 7, b"me", no_view)
    assert set(kept) == {b"a", b"s1", b"s2"}


@pytest.mark.parametrize("counts_itself", [True, False])
def test_a_newcomer_that_has_not_reported_counts_itself(
    counts_itself: bool, two_dhts: TwoDHTs
) -> None:
    """hivemind publishes a peer's progress record only once it has reported samples: a
    newcomer that just loaded a peer's state reads that peer's record alone. Counting
    itself, it knows it is not alone (otherwise it steps with its own gradients while
    the other peer, which has not seen it yet, does the same, and the two hold different
    parameters at one step: fresh-clone CI, tests/node/test_strict_steps.py)."""
    options = {"prefix": "counting", "target_batch_size": 16, "min_refresh_period": 0.1}
    old = PlausibleProgressTracker(two_dhts.first, **options, start=True)
    two_dhts.trackers.append(old)
    old.report_local_progress(local_epoch=4, samples_accumulated=4)  # published
    new = PlausibleProgressTracker(
        two_dhts.second, **options, counts_itself=counts_itself, start=True
    )
    two_dhts.trackers.append(new)
    new.report_local_progress(local_epoch=4, samples_accumulated=0)  # not published
    deadline = time.monotonic() + 30
    while new.global_progress.epoch < 4 and time.monotonic() < deadline:  # old's read
        new.global_state_updated.set()  # fetch now
        time.sleep(0.2)
    assert new.global_progress.epoch == 4
    assert new.global_progress.num_peers == (2 if counts_itself else 1)


class FirstReadHangs:
    """A real DHT whose first background read of the progress records never returns."""

    def __init__(self, dht: hivemind.DHT):
        self._dht = dht
        self.hung = 0

    def get(self, key: object, latest: bool = False, return_future: bool = False) -> object:
        if return_future and not self.hung:
            self.hung += 1
            return asyncio.sleep(3600)  # never returns in time
        return self._dht.get(key, latest=latest, return_future=return_future)

    def __getattr__(self, name: str) -> object:
        return getattr(self._dht, name)


def test_a_read_of_the_swarms_progress_that_never_returns_is_given_up(two_dhts: TwoDHTs) -> None:
    """hivemind's tracker waits for ever on each read of the swarm's progress and stops
    reading at an error: one read that never returns freezes a peer's view of the swarm
    for good."""
    options = {"prefix": "hanging", "target_batch_size": 16, "min_refresh_period": 0.1}
    other = PlausibleProgressTracker(two_dhts.first, **options, start=True)
    two_dhts.trackers.append(other)
    proxy = FirstReadHangs(two_dhts.second)
    reader = PlausibleProgressTracker(proxy, **options, start=False)  # type: ignore[arg-type]
    reader.fetch_timeout_s = 2.0
    reader.start()
    two_dhts.trackers.append(reader)
    other.report_local_progress(local_epoch=3, samples_accumulated=5)
    deadline = time.monotonic() + 20
    while reader.global_progress.epoch < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proxy.hung == 1
    assert reader.global_progress.epoch == 3, "the reader's view stayed frozen"
    assert reader.global_progress.samples_accumulated == 5


@pytest.mark.parametrize(
    ("rounds", "expected"),
    [
        ([], None),
        ([7], 7),
        ([8, 8], 8),  # both client-mode nodes began round 7's averaging
        ([8, 7], 7),  # one of two is no majority
        ([8, 8, 3], 8),
        ([2**62, 8, 8], 8),  # one record far ahead moves nothing
        ([2**62, 2**62, 8], 2**62),  # (a hostile majority: the roster's part)
    ],
)
def test_the_round_most_peers_reached(rounds: list[int], expected: int | None) -> None:
    """The keeper's follower joins a round's averaging once most peers report the next
    round, client-mode peers too: hivemind's swarm epoch leaves them out, and client-mode
    nodes, which need the follower as their reducer, failed round after round while it
    waited (make soak)."""
    assert majority_round(rounds) == expected
