"""The node's background link to its coordinator: heartbeats, receipts, evaluations, leaving.

:class:`CoordinatorLink` runs two daemon threads once started: the heartbeat
thread reports the node's counters and evaluations, renews its leases and
sends shard receipts every interval; the :class:`~crowdtrain.node.link.supply.ShardSupply`'s
thread keeps the next shards leased and verified. Neither ever blocks
training: when the coordinator is unreachable they log once, keep what they
have to send, and try again; when the session expired they register again
(:class:`~crowdtrain.node.link.session.CoordinatorSession`). Everything sent
is a :mod:`crowdtrain.protocol.messages` model. Knows nothing about what the
counters mean: :class:`Reports` (the node) supplies them.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass
from typing import Protocol

from crowdtrain.node.link.errors import CoordinatorError
from crowdtrain.node.link.session import CoordinatorSession
from crowdtrain.node.link.supply import ShardSupply
from crowdtrain.protocol import coordinator_pb2 as pb
from crowdtrain.protocol.messages import Evaluation, HeartbeatPayload, HeldLease, ReceiptPayload

logger = logging.getLogger(__name__)

# As many as a heartbeat may carry (see HeartbeatPayload).
_MAX_EVALUATIONS = 32
_MAX_LEASES = 64


@dataclass(frozen=True)
class LinkConfig:
    """How the link paces itself: ``interval_s`` between heartbeats (the coordinator says,
    at registration) and ``prefetch_shards`` kept queued ahead of training."""

    interval_s: float
    prefetch_shards: int = 2


class Reports(Protocol):
    """What the link reports each heartbeat, and who hears the coordinator's reply."""

    def heartbeat(self, evaluations: list[Evaluation], leases: list[HeldLease]) -> HeartbeatPayload:
        """The node's counters now, with these evaluations and held leases."""
        ...

    def on_reply(self, reply: pb.HeartbeatReply) -> None:
        """The coordinator's answer to a heartbeat (its step, credit and roster)."""
        ...


class CoordinatorLink:
    """Heartbeats, receipts, evaluations and shard prefetch; :meth:`start`, then
    :meth:`shutdown`, which sends the last counters and receipts and leaves the run."""

    def __init__(
        self,
        session: CoordinatorSession,
        supply: ShardSupply,
        config: LinkConfig,
        reports: Reports,
    ):
        self.session = session
        self.supply = supply
        self.config = config
        self._reports = reports
        self._receipts: deque[ReceiptPayload] = deque()
        self._evaluations: deque[Evaluation] = deque()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._beat_loop, name="coordinator-heartbeat", daemon=True
        )

    @property
    def connected(self) -> bool:
        """Whether the coordinator answered the last call."""
        return self.session.connected

    def start(self) -> None:
        """Start heartbeating and prefetching shards."""
        self._thread.start()
        self.supply.start(self.config.prefetch_shards, self.config.interval_s)

    def send_receipt(self, receipt: ReceiptPayload) -> None:
        """Queue a shard's receipt for the next heartbeat."""
        self._receipts.append(receipt)

    def send_evaluation(self, evaluation: Evaluation) -> None:
        """Queue a validation measurement for the next heartbeat."""
        self._evaluations.append(evaluation)

    def _held(self) -> list[HeldLease]:
        held = self.supply.held()[:_MAX_LEASES]
        return [HeldLease(shard_id=shard_id, epoch=epoch) for shard_id, epoch in held]

    def _beat_loop(self) -> None:
        while not self._stop.wait(self.config.interval_s):
            if not self.session.run_round(self._beat):
                return

    def _beat(self) -> None:
        pending = list(self._evaluations)[:_MAX_EVALUATIONS]
        payload = self._reports.heartbeat(pending, self._held())
        client = self.session.client
        reply = self.session.call(lambda token: client.heartbeat(token, payload))
        self._reports.on_reply(reply)
        for _ in pending:
            self._evaluations.popleft()
        while self._receipts:
            receipt = self._receipts[0]
            try:
                self.session.call(lambda token, r=receipt: client.report(token, r))
                logger.info(
                    "receipt for shard %s (epoch %d) accepted", receipt.shard_id, receipt.epoch
                )
            except CoordinatorError as e:
                if e.unreachable or e.denied:
                    raise
                logger.warning("receipt for shard %s refused: %s", receipt.shard_id, e)
            self._receipts.popleft()

    def shutdown(self) -> None:
        """Stop the threads, send the last counters and receipts, and leave the run."""
        self._stop.set()
        timeout_s = 2 * self.config.interval_s + 15
        self.supply.shutdown(timeout_s)
        if self._thread.is_alive():
            self._thread.join(timeout=timeout_s)
        client, token = self.session.client, self.session.token
        try:
            evaluations = list(self._evaluations)[-_MAX_EVALUATIONS:]
            client.heartbeat(token, self._reports.heartbeat(evaluations, self._held()))
            for receipt in self._receipts:
                client.report(token, receipt)
            client.leave(token)
        except CoordinatorError as e:
            logger.warning("could not tell the coordinator we left: %s", e)


__all__ = ["CoordinatorLink", "LinkConfig", "Reports"]
