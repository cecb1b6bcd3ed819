"""The node's background link to its coordinator.

One thread that heartbeats, sends shard receipts, and keeps the next shard
leased, downloaded and verified before training needs it. It never blocks
training: when the coordinator is unreachable it logs once, keeps what it
has to send, and tries again every interval; when the session expired it
registers again.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from crowdtrain.node.client import CoordinatorClient, CoordinatorError
from crowdtrain.node.data import LeasedShard, ShardCache, ShardStream
from crowdtrain.protocol.errors import CrowdtrainError

logger = logging.getLogger(__name__)

# As many as a heartbeat may carry (see HeartbeatPayload).
_MAX_EVALUATIONS = 32


class CoordinatorLink:
    """Heartbeats, receipts and shard prefetch in one daemon thread."""

    def __init__(
        self,
        client: CoordinatorClient,
        register: Callable[[], str],
        token: str,
        interval_s: float,
        stats: Callable[[], dict[str, Any]],
        stream: ShardStream,
        cache: ShardCache,
        on_fatal: Callable[[CrowdtrainError], None],
        prefetch: int = 1,
    ):
        self.client = client
        self._register = register
        self.token = token
        self.interval_s = interval_s
        self._stats = stats
        self.stream = stream
        self.cache = cache
        self._on_fatal = on_fatal
        self.prefetch = prefetch
        self.connected = True
        self.swarm_step = 0
        self.num_peers = 0
        self._receipts: deque[dict[str, Any]] = deque()
        self._evaluations: deque[dict[str, Any]] = deque()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="coordinator-link", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def send_receipt(self, receipt: dict[str, Any]) -> None:
        self._receipts.append(receipt)

    def send_evaluation(self, evaluation: dict[str, Any]) -> None:
        self._evaluations.append(evaluation)

    def lease_and_fetch(self, max_shards: int = 1) -> int:
        """Lease shards and queue them once verified on disk; returns how many."""
        leases = self._with_session(lambda token: self.client.lease(token, max_shards))
        for lease in leases:
            path = self.cache.fetch(lease.shard_id)
            self.stream.offer(
                LeasedShard(
                    shard_id=lease.shard_id,
                    epoch=lease.epoch,
                    path=path,
                    entry=self.cache.entry(lease.shard_id),
                )
            )
        return len(leases)

    def _with_session(self, call: Callable[[str], Any]) -> Any:
        try:
            return call(self.token)
        except CoordinatorError as e:
            if not e.unauthenticated:
                raise
            logger.info("session expired; registering again")
            self.token = self._register()
            return call(self.token)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._tick()
                if not self.connected:
                    logger.info("coordinator reachable again")
                self.connected = True
            except CoordinatorError as e:
                if self.connected:
                    logger.warning("lost the coordinator (%s); training goes on", e)
                self.connected = False
            except CrowdtrainError as e:
                self._on_fatal(e)
                return
            except Exception:  # the link must never take training down
                logger.exception("coordinator link failed; retrying")

    def _tick(self) -> None:
        payload = self._stats()
        pending = list(self._evaluations)[:_MAX_EVALUATIONS]
        payload["evaluations"] = pending
        reply = self._with_session(lambda token: self.client.heartbeat(token, payload))
        for _ in pending:
            self._evaluations.popleft()
        self.swarm_step, self.num_peers = reply.step, reply.num_peers
        while self._receipts:
            receipt = self._receipts[0]
            try:
                self._with_session(lambda token, r=receipt: self.client.report(token, r))
            except CoordinatorError as e:
                if e.unreachable:
                    raise
                logger.warning("receipt for shard %s refused: %s", receipt["shard_id"], e)
            self._receipts.popleft()
        if self.stream.num_queued < self.prefetch:
            self.lease_and_fetch(1)

    def shutdown(self, leave: bool = True) -> None:
        """Stop the thread, flush what can be sent, and leave the run."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2 * self.interval_s + 15)
        if not leave:
            return
        try:
            payload = self._stats()
            payload["evaluations"] = list(self._evaluations)[-_MAX_EVALUATIONS:]
            self.client.heartbeat(self.token, payload)
            for receipt in self._receipts:
                self.client.report(self.token, receipt)
            self.client.leave(self.token)
        except CoordinatorError as e:
            logger.warning("could not tell the coordinator we left: %s", e)
