"""Shards for training: leased from the coordinator, downloaded, verified and queued.

:class:`ShardSupply` leases shards through the node's session, fetches each
into the :class:`~crowdtrain.node.data.ShardCache` and offers it to the
:class:`~crowdtrain.node.data.ShardStream`; once started, a background
thread keeps the next shards ready before training needs them, woken as soon
as training takes one. Knows nothing about heartbeats or receipts.
"""

from __future__ import annotations

import logging
import threading
from collections import deque

from crowdtrain.node.data import LeasedShard, ShardCache, ShardStream
from crowdtrain.node.link.session import CoordinatorSession
from crowdtrain.protocol import coordinator_pb2 as pb

logger = logging.getLogger(__name__)


class ShardSupply:
    """Leases shards and queues each once verified on disk.

    ``wanted`` is set when training took a queued shard (pass its ``set`` as
    the stream's ``on_shard_taken``): the background thread tops the queue
    up to ``prefetch`` shards then, and at least every ``interval_s``.
    """

    def __init__(
        self,
        session: CoordinatorSession,
        cache: ShardCache,
        stream: ShardStream,
        wanted: threading.Event,
    ):
        self.session = session
        self.cache = cache
        self.stream = stream
        self._wanted = wanted
        # Leased but not yet downloaded and verified (a download failed): fetched
        # again before any new lease is asked for, and renewed meanwhile.
        self._unfetched: deque[pb.Lease] = deque()
        self._unfetched_lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def lease_and_fetch(self, max_shards: int, resume: bool = False) -> int:
        """Lease shards and queue each once verified on disk; returns how many.

        A lease whose download fails stays owed: it is fetched on the next call.
        """
        if not self._unfetched:
            granted = self.session.call(
                lambda token: self.session.client.lease(token, max_shards, resume)
            )
            with self._unfetched_lock:
                self._unfetched.extend(granted)
        with self._unfetched_lock:
            leases = list(self._unfetched)
        for lease in leases:
            path = self.cache.fetch(lease.shard_id)
            with self._unfetched_lock:
                self._unfetched.popleft()
            self.stream.offer(
                LeasedShard(
                    shard_id=lease.shard_id,
                    epoch=lease.epoch,
                    path=path,
                    entry=self.cache.entry(lease.shard_id),
                )
            )
        if leases:
            val_shards = {s.id for s in self.cache.manifest.val_shards}
            self.cache.evict(keep=self.stream.pinned() | val_shards)
        return len(leases)

    def held(self) -> list[tuple[str, int]]:
        """(shard, epoch) of every lease held: queued, being trained, or still to fetch."""
        held = self.stream.held()
        with self._unfetched_lock:
            held += [(lease.shard_id, lease.epoch) for lease in self._unfetched]
        return held

    def start(self, prefetch: int, interval_s: float) -> None:
        """Keep ``prefetch`` shards queued from now on, in a background thread."""
        thread = threading.Thread(
            target=self._prefetch_loop,
            args=(prefetch, interval_s),
            name="shard-prefetch",
            daemon=True,
        )
        self._threads.append(thread)
        thread.start()

    def _prefetch_loop(self, prefetch: int, interval_s: float) -> None:
        while not self._stop.is_set():
            self._wanted.wait(interval_s)
            self._wanted.clear()
            if self._stop.is_set():
                return
            missing = prefetch - self.stream.num_queued
            if missing > 0 and not self.session.run_round(
                lambda n=missing: self.lease_and_fetch(n)
            ):
                return

    def shutdown(self, timeout_s: float) -> None:
        """Stop the background thread (waiting up to ``timeout_s`` for a download)."""
        self._stop.set()
        self._wanted.set()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout=timeout_s)


__all__ = ["ShardSupply"]
