"""The node's background link to its coordinator.

Two daemon threads. The heartbeat thread reports counters and evaluations,
renews leases and sends shard receipts every interval. The prefetch thread
keeps the next shards leased, downloaded and verified before training needs
them, woken as soon as training takes a shard. Neither ever blocks training:
when the coordinator is unreachable they log once, keep what they have to
send, and try again; when the session expired they register again.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from crowdtrain.node.data import LeasedShard, ShardCache, ShardStream
from crowdtrain.node.link.errors import CoordinatorError
from crowdtrain.node.link.grpc import CoordinatorClient
from crowdtrain.protocol.errors import CrowdtrainError

logger = logging.getLogger(__name__)

# As many as a heartbeat may carry (see HeartbeatPayload).
_MAX_EVALUATIONS = 32


class CoordinatorLink:
    """Heartbeats, receipts and shard prefetch."""

    def __init__(
        self,
        client: CoordinatorClient,
        register: Callable[[], str],
        token: str,
        interval_s: float,
        stats: Callable[[], dict[str, Any]],
        cache: ShardCache,
        on_fatal: Callable[[CrowdtrainError], None],
        prefetch: int = 2,
        on_reply: Callable[[Any], None] | None = None,
    ):
        self.client = client
        self._register = register
        self.token = token
        self.interval_s = interval_s
        self._stats = stats
        self.cache = cache
        self._on_fatal = on_fatal
        self.prefetch = prefetch
        self._on_reply = on_reply
        self.stream: ShardStream | None = None
        self.connected = True
        self._receipts: deque[dict[str, Any]] = deque()
        # Leased but not yet downloaded and verified (a download failed): fetched
        # again before any new lease is asked for, and renewed meanwhile.
        self._unfetched: deque[Any] = deque()
        self._unfetched_lock = threading.Lock()
        self._evaluations: deque[dict[str, Any]] = deque()
        self._stop = threading.Event()
        self._want_shards = threading.Event()
        self._token_lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._beat_loop, name="coordinator-heartbeat", daemon=True),
            threading.Thread(target=self._prefetch_loop, name="shard-prefetch", daemon=True),
        ]

    def start(self, stream: ShardStream) -> None:
        self.stream = stream
        for thread in self._threads:
            thread.start()

    def want_shards(self) -> None:
        """Training took a queued shard: top the queue up now."""
        self._want_shards.set()

    def send_receipt(self, receipt: dict[str, Any]) -> None:
        self._receipts.append(receipt)

    def send_evaluation(self, evaluation: dict[str, Any]) -> None:
        self._evaluations.append(evaluation)

    def lease_and_fetch(self, stream: ShardStream, max_shards: int, resume: bool = False) -> int:
        """Lease shards and queue each once verified on disk; returns how many.

        A lease whose download fails stays owed: it is fetched on the next call.
        """
        if not self._unfetched:
            granted = self._with_session(lambda token: self.client.lease(token, max_shards, resume))
            with self._unfetched_lock:
                self._unfetched.extend(granted)
        with self._unfetched_lock:
            leases = list(self._unfetched)
        for lease in leases:
            path = self.cache.fetch(lease.shard_id)
            with self._unfetched_lock:
                self._unfetched.popleft()
            stream.offer(
                LeasedShard(
                    shard_id=lease.shard_id,
                    epoch=lease.epoch,
                    path=path,
                    entry=self.cache.entry(lease.shard_id),
                )
            )
        if leases:
            self.cache.evict(keep=stream.pinned() | {s.id for s in self.cache.manifest.val_shards})
        return len(leases)

    def _held(self) -> list[dict[str, Any]]:
        held = self.stream.held() if self.stream is not None else []
        with self._unfetched_lock:
            held += [(lease.shard_id, lease.epoch) for lease in self._unfetched]
        return [{"shard_id": s, "epoch": e} for s, e in held[:64]]

    def _with_session(self, call: Callable[[str], Any]) -> Any:
        token = self.token
        try:
            return call(token)
        except CoordinatorError as e:
            if not e.unauthenticated:
                raise
            with self._token_lock:
                if self.token == token:
                    logger.info("session expired; registering again")
                    self.token = self._register()
            return call(self.token)

    def _guarded(self, what: Callable[[], None]) -> bool:
        """Run one round; False when the link must stop (a fatal error)."""
        try:
            what()
            if not self.connected:
                logger.info("coordinator reachable again")
            self.connected = True
        except CoordinatorError as e:
            if e.denied:  # banned, or no longer admitted: nothing to retry
                self._on_fatal(CoordinatorError(f"the coordinator refused this node: {e}"))
                return False
            if self.connected:
                logger.warning("lost the coordinator (%s); training goes on", e)
            self.connected = False
        except CrowdtrainError as e:
            self._on_fatal(e)
            return False
        except Exception:  # the link must never take training down
            logger.exception("coordinator link failed; retrying")
        return True

    def _beat_loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            if not self._guarded(self._beat):
                return

    def _beat(self) -> None:
        payload = self._stats()
        pending = list(self._evaluations)[:_MAX_EVALUATIONS]
        payload["evaluations"] = pending
        payload["leases"] = self._held()
        reply = self._with_session(lambda token: self.client.heartbeat(token, payload))
        if self._on_reply is not None:
            self._on_reply(reply)
        for _ in pending:
            self._evaluations.popleft()
        while self._receipts:
            receipt = self._receipts[0]
            try:
                self._with_session(lambda token, r=receipt: self.client.report(token, r))
                logger.info(
                    "receipt for shard %s (epoch %d) accepted",
                    receipt["shard_id"],
                    receipt["epoch"],
                )
            except CoordinatorError as e:
                if e.unreachable or e.denied:
                    raise
                logger.warning("receipt for shard %s refused: %s", receipt["shard_id"], e)
            self._receipts.popleft()

    def _prefetch_loop(self) -> None:
        assert self.stream is not None
        stream = self.stream
        while not self._stop.is_set():
            self._want_shards.wait(self.interval_s)
            self._want_shards.clear()
            if self._stop.is_set():
                return
            missing = self.prefetch - stream.num_queued
            if missing > 0 and not self._guarded(lambda n=missing: self.lease_and_fetch(stream, n)):
                return

    def shutdown(self, leave: bool = True) -> None:
        """Stop the threads, flush what can be sent, and leave the run."""
        self._stop.set()
        self._want_shards.set()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout=2 * self.interval_s + 15)
        if not leave:
            return
        try:
            payload = self._stats()
            payload["evaluations"] = list(self._evaluations)[-_MAX_EVALUATIONS:]
            payload["leases"] = self._held()
            self.client.heartbeat(self.token, payload)
            for receipt in self._receipts:
                self.client.report(self.token, receipt)
            self.client.leave(self.token)
        except CoordinatorError as e:
            logger.warning("could not tell the coordinator we left: %s", e)
