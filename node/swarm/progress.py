"""The swarm's progress as peers publish it in the DHT, without the records nobody backs.

hivemind's ProgressTracker takes the swarm's epoch to be the highest any peer
publishes: one record with a higher epoch (any DHT peer may write one) makes sync
peers reload state and throw their gradients away at every step, ends every DiLoCo
round after one inner step, and an epoch near 2**62 keeps hivemind's scheduler
looping. :class:`PlausibleProgressTracker` leaves out, before hivemind reads them,
records whose epoch is ahead of what the swarm can have reached
(:func:`epoch_limit`); the sync optimizer and every DiLoCo participant use it.
It also gives each read of the swarm's progress a deadline: hivemind's waits for
ever, and one read that never returned left a peer blind to the swarm for good.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

from hivemind.optim.progress_tracker import GlobalTrainingProgress, ProgressTracker
from hivemind.utils import ValueWithExpiration, enter_asynchronously, get_dht_time

logger = logging.getLogger(__name__)

TRUSTED_TTL_S = 10.0  # how long the coordinator's view of the epoch is reused
# A read of the swarm's progress takes well under a second on a live DHT; one that has
# not returned by then never will. (The keeper's follower once saw "2 peers, 0 of 80
# samples at round 0" for minutes in fresh-clone CI; that was its readiness with
# client-mode nodes, RoundFollower.run, not a hung read, but a read with no deadline
# would freeze a peer's view for good just the same.)
FETCH_TIMEOUT_S = 20.0
RETRY_PAUSE_S = 1.0  # after a read that failed or timed out


def epoch_limit(own: int, others: Sequence[int], trusted: int | None = None) -> int:
    """The highest epoch a peer's progress record may claim and be believed.

    One ahead of ours (a peer that ended the epoch first); as far as more than half of
    the other peers that publish records are, plus one (a newcomer or a peer that
    slept catches up with the swarm: with one other peer, that peer); and, when known,
    ``trusted`` (the coordinator's view of the swarm's epoch, which peers' claims do
    not move). A single record far ahead of the others is nobody's epoch but its own.
    """
    limit = own + 1
    if others:
        ordered = sorted(others, reverse=True)
        limit = max(limit, ordered[len(ordered) // 2] + 1)
    if trusted is not None:
        limit = max(limit, trusted)
    return limit


def _epoch_of(entry: Any) -> int | None:
    value = getattr(entry, "value", None)
    epoch = value.get("epoch") if isinstance(value, dict) else None
    return epoch if isinstance(epoch, int) and not isinstance(epoch, bool) else None


def _peer_of(entry: Any) -> Any:
    value = getattr(entry, "value", None)
    return value.get("peer_id") if isinstance(value, dict) else None


class PlausibleProgressTracker(ProgressTracker):
    """hivemind's progress tracker, reading only records within :func:`epoch_limit`.

    ``trusted_epoch()`` (None: unknown) is the coordinator's view, set after
    construction by participants that have one.

    With ``counts_itself``, ``global_progress.num_peers`` counts this peer whether or
    not its own record was read: hivemind publishes a peer's record only once it has
    reported samples, so a newcomer that has just loaded the swarm's state reads one
    peer (the one it loaded from), takes itself to be alone and steps with its own
    gradients, while that peer, whose view is older than the newcomer, does the same:
    two peers at one step with different parameters. Counting itself, the newcomer
    joins a round instead, and if the other stepped alone, the newcomer's round fails
    and it loads that peer's state (strict steps).
    """

    trusted_epoch: Callable[[], int | None] = staticmethod(lambda: None)  # type: ignore[assignment]

    def __init__(self, *args: Any, counts_itself: bool = False, **kwargs: Any):
        self.counts_itself = counts_itself  # (before hivemind's fetcher starts)
        self._ignored: dict[Any, int] = {}  # record key -> the epoch it claimed, logged once
        self._trusted_value: int | None = None
        self._trusted_at = -math.inf
        super().__init__(*args, **kwargs)

    fetch_timeout_s = FETCH_TIMEOUT_S
    global_progress: GlobalTrainingProgress  # (hivemind's, untyped)

    async def _progress_fetcher(self) -> None:
        """hivemind's loop that reads the swarm's progress when it is due, with a deadline
        on each read and a retry after one that failed (hivemind's waits for ever, and
        an error ends its loop: either leaves the peer's view of the swarm frozen)."""
        loop = asyncio.get_event_loop()
        shutdown = loop.run_in_executor(None, self.shutdown_triggered.wait)
        try:
            while not self.shutdown_triggered.is_set():
                wait_s = max(0.0, self.global_progress.next_fetch_time - get_dht_time())
                if await loop.run_in_executor(None, self.global_state_updated.wait, wait_s):
                    self.global_state_updated.clear()
                    continue
                async with enter_asynchronously(self.lock_global_progress):
                    read = asyncio.ensure_future(
                        self.dht.get(self.training_progress_key, latest=True, return_future=True)
                    )
                    done, _ = await asyncio.wait(
                        {read, shutdown},
                        timeout=self.fetch_timeout_s,
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                    if self.shutdown_triggered.is_set():
                        read.cancel()
                        break
                    try:
                        if read not in done:
                            read.cancel()
                            raise TimeoutError(f"no answer in {self.fetch_timeout_s:.0f} s")
                        found = read.result()
                        metadata = found.value if isinstance(found, ValueWithExpiration) else None
                        self.global_progress = self._parse_swarm_progress_data(metadata)
                        self.fetched_global_progress_this_epoch.set()
                        continue
                    except Exception as e:  # never a reason to stop reading
                        # (the record gets text: a record holding the error held this
                        # thread's event loop through its traceback, and whichever thread
                        # dropped the record last aborted the interpreter)
                        why = f"{type(e).__name__}: {e}"
                        logger.warning("reading the swarm's progress failed (%s): retrying", why)
                await asyncio.sleep(RETRY_PAUSE_S)
        finally:
            logger.debug("no longer reading %s", self.training_progress_key)

    def _trusted(self) -> int | None:
        """``trusted_epoch()``, asked at most every TRUSTED_TTL_S (it may be a request)."""
        now = time.monotonic()
        if now - self._trusted_at > TRUSTED_TTL_S:
            try:
                self._trusted_value = self.trusted_epoch()
            except Exception:  # the coordinator's view is a hint: never a reason to stop
                self._trusted_value = None
            self._trusted_at = now
        return self._trusted_value

    def _parse_swarm_progress_data(self, metadata: Any) -> Any:
        kept = self._plausible(metadata)
        progress = super()._parse_swarm_progress_data(kept)
        if self.counts_itself and not has_record_of(kept, self.local_progress.peer_id):
            progress.num_peers += 1
        return progress

    def _plausible(self, metadata: Any) -> Any:
        if not isinstance(metadata, dict) or not metadata:
            return metadata
        kept, ignored = plausible_records(
            metadata, self.local_progress.epoch, self.local_progress.peer_id, self._trusted
        )
        for key, epoch, limit in ignored:
            if self._ignored.get(key) != epoch:  # each claim is logged once
                self._ignored[key] = epoch
                logger.warning(
                    "ignored a progress record claiming epoch %d: the swarm cannot be past "
                    "%d (ours is %d)",
                    epoch,
                    limit,
                    self.local_progress.epoch,
                )
        return kept


def has_record_of(metadata: Any, peer: Any) -> bool:
    """Whether ``peer`` has a record among ``metadata`` (hivemind's subkey -> entry)."""
    return isinstance(metadata, dict) and any(_peer_of(e) == peer for e in metadata.values())


def plausible_records(
    metadata: dict[Any, Any], own: int, own_peer: Any, trusted: Callable[[], int | None]
) -> tuple[dict[Any, Any], list[tuple[Any, int, int]]]:
    """The progress records (hivemind's subkey -> entry) within :func:`epoch_limit`, and
    (key, epoch claimed, limit) for each left out. ``trusted`` is asked only when a
    record claims more than the peers back."""
    epochs = {key: _epoch_of(entry) for key, entry in metadata.items()}
    others = [
        e for key, e in epochs.items() if e is not None and _peer_of(metadata[key]) != own_peer
    ]
    limit = epoch_limit(own, others)
    if any(e is not None and e > limit for e in epochs.values()):
        limit = epoch_limit(own, others, trusted())
    kept, ignored = {}, []
    for key, entry in metadata.items():
        epoch = epochs[key]
        if epoch is not None and epoch > limit:
            ignored.append((key, epoch, limit))
        else:
            kept[key] = entry
    return kept, ignored


__all__ = ["PlausibleProgressTracker", "epoch_limit", "has_record_of", "plausible_records"]
