"""Shard leases, their expiry, receipts and coverage.

A node leases shards of the current epoch; a lease lasts ``[data] lease_s``
from its grant or its holder's last heartbeat, measured on this process's
monotonic clock (never a node's clock, never wall time). Deadlines live in
memory; after a restart every stored lease gets a fresh ``lease_s``, so a
restart never takes a shard from a live node. A receipt completes its shard;
when every shard of an epoch is done, the next epoch starts in a fresh order.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from crowdtrain.coordinator.ledger.ledger import Judgement
from crowdtrain.coordinator.records import PublishedRun, Session
from crowdtrain.coordinator.runs.publish import epoch_order
from crowdtrain.coordinator.store import Store
from crowdtrain.protocol.errors import CrowdtrainError
from crowdtrain.protocol.messages import ReceiptPayload

logger = logging.getLogger(__name__)

MAX_SHARDS_PER_LEASE = 8


class ReceiptError(CrowdtrainError):
    """A receipt that does not match a lease the peer holds or held."""


@dataclass(frozen=True)
class Lease:
    shard_id: str
    epoch: int
    expires_in_s: float


_Key = tuple[str, int, str, str]  # run, epoch, shard, peer


class LeaseBook:
    """All leases of one coordinator process, with their deadlines."""

    def __init__(self, store: Store, clock: Any = time.monotonic):
        self.store = store
        self._clock = clock
        self._started = clock()
        self._deadlines: dict[_Key, float] = {}
        self._lock = threading.RLock()

    def _deadline(self, run: PublishedRun) -> float:
        return self._clock() + run.spec.data.lease_s

    def _expire_overdue(self, run: PublishedRun) -> None:
        now = self._clock()
        for row in self.store.active_leases(run.id):
            key = (run.id, row["epoch"], row["shard_id"], row["peer_id"])
            deadline = self._deadlines.get(key)
            if deadline is None:
                # Granted before this process started: the holder gets a full lease_s
                # from the start, as if it had just renewed.
                self._deadlines[key] = deadline = self._started + run.spec.data.lease_s
            if deadline < now:
                logger.info(
                    "lease of %s (epoch %d) by %s expired",
                    row["shard_id"],
                    row["epoch"],
                    row["peer_id"],
                )
                self.store.expire_lease(run.id, row["epoch"], row["shard_id"], row["peer_id"])
                del self._deadlines[key]

    def current_epoch(self, run: PublishedRun) -> int:
        """The epoch being handed out; starts the next one when this one is done."""
        with self._lock:
            epoch = self.store.current_epoch(run.id) or 0
            counts = self.store.epoch_counts(run.id, epoch)
            if counts and set(counts) == {"done"}:
                epoch += 1
                self.store.ensure_epoch(run.id, epoch, epoch_order(run.spec, run.manifest, epoch))
                logger.info("run %s: epoch %d complete; epoch %d starts", run.id, epoch - 1, epoch)
            return epoch

    def grant(
        self, run: PublishedRun, session: Session, max_shards: int, resume: bool = False
    ) -> list[Lease]:
        """Lease up to ``max_shards`` shards to a peer.

        With ``resume`` (a node that just started), the peer's own live leases
        come first, so it can finish what it was training before a restart.
        A peer that already holds shards gets nothing more while every shard of
        the open epochs is held by live peers; it keeps training on what it has.
        """
        max_shards = max(1, min(max_shards, MAX_SHARDS_PER_LEASE))
        with self._lock:
            self._expire_overdue(run)
            leases: list[Lease] = []
            if resume:
                for row in self.store.peer_leases(run.id, session.peer_id)[:max_shards]:
                    key = (run.id, row["epoch"], row["shard_id"], session.peer_id)
                    self._deadlines[key] = self._deadline(run)
                    leases.append(Lease(row["shard_id"], row["epoch"], run.spec.data.lease_s))
            wanted = max_shards - len(leases)
            if wanted > 0:
                holds_some = bool(leases) or bool(self.store.peer_leases(run.id, session.peer_id))
                leases += self._grant_pending(run, session, wanted, may_open=not holds_some)
            return leases

    def _grant_pending(
        self, run: PublishedRun, session: Session, wanted: int, may_open: bool
    ) -> list[Lease]:
        """Pending shards, oldest unfinished epoch first.

        When every shard of every open epoch is leased or done, the next epoch
        opens early for a peer that would otherwise get nothing: a node joining
        while the last shards of an epoch are held by others still gets data,
        and the epoch still ends only when all its shards are done.
        """
        epoch = self.current_epoch(run)
        latest = self.store.latest_epoch(run.id) or 0
        granted: list[Lease] = []
        while wanted > 0:
            shard_ids = self.store.pending_shards(run.id, epoch, wanted, session.peer_id)
            self.store.grant_leases(run.id, epoch, session.peer_id, shard_ids)
            for shard_id in shard_ids:
                self._deadlines[(run.id, epoch, shard_id, session.peer_id)] = self._deadline(run)
                granted.append(Lease(shard_id, epoch, run.spec.data.lease_s))
            wanted -= len(shard_ids)
            if epoch < latest:
                epoch += 1
            elif granted or wanted == 0 or not may_open:
                break
            else:
                epoch = latest = latest + 1
                self.store.ensure_epoch(run.id, epoch, epoch_order(run.spec, run.manifest, epoch))
                logger.info("run %s: every shard is leased; epoch %d opens early", run.id, epoch)
        return granted

    def renew(
        self, run: PublishedRun, session: Session, held: set[tuple[str, int]] | None = None
    ) -> None:
        """A heartbeat: the peer's leases it says it ``held`` ((shard, epoch); all when
        None) run for lease_s from now. A lease the node no longer knows of (lost
        in a crash between grant and download, say) is left to expire."""
        with self._lock:
            self._expire_overdue(run)
            deadline = self._deadline(run)
            for key in self._deadlines:
                if key[0] != run.id or key[3] != session.peer_id:
                    continue
                if held is None or (key[2], key[1]) in held:
                    self._deadlines[key] = deadline

    def release(self, session: Session) -> None:
        """A peer left on purpose: its leases return at once."""
        with self._lock:
            for key in [
                k for k in self._deadlines if k[0] == session.run_id and k[3] == session.peer_id
            ]:
                del self._deadlines[key]
            self.store.return_leases(session.run_id, session.peer_id)

    def forget(self, run_id: str, peer_id: str) -> None:
        """Drop a peer's deadlines (its leases were returned in the store, e.g. by a ban)."""
        with self._lock:
            for key in [k for k in self._deadlines if k[0] == run_id and k[3] == peer_id]:
                del self._deadlines[key]

    def complete(
        self,
        run: PublishedRun,
        session: Session,
        receipt: ReceiptPayload,
        judge: Callable[[dict[str, Any]], Judgement] | None = None,
    ) -> Judgement | None:
        """Record a receipt for a shard the peer holds, or held until its lease expired.

        ``judge`` (the ledger's) makes the receipt's check from its lease row: it is
        stored in the same transaction as the receipt, with what it says of the shard and
        the peer's flag, and returned."""
        if receipt.finished < receipt.started:
            raise ReceiptError("receipt finishes before it starts")
        with self._lock:
            self._expire_overdue(run)
            lease = self.store.get_lease(run.id, receipt.epoch, receipt.shard_id, session.peer_id)
            if lease is None:
                raise ReceiptError(
                    f"shard {receipt.shard_id!r} of epoch {receipt.epoch} was never leased to "
                    "this peer"
                )
            if lease["state"] == "completed":
                raise ReceiptError(
                    f"shard {receipt.shard_id!r} of epoch {receipt.epoch} was already receipted"
                )
            if lease["state"] == "returned":
                raise ReceiptError(f"the lease on shard {receipt.shard_id!r} was given back")
            judged = judge(lease) if judge is not None else None
            self.store.complete_shard(
                {
                    "run_id": run.id,
                    "peer_id": session.peer_id,
                    "shard_id": receipt.shard_id,
                    "epoch": receipt.epoch,
                    "num_sequences": receipt.num_sequences,
                    "num_tokens": receipt.num_tokens,
                    "loss_sum": receipt.loss_sum,
                    "started": receipt.started,
                    "finished": receipt.finished,
                    "received_at": time.time(),
                },
                judged.check if judged is not None else None,
                trained=judged is None or judged.trained,
                flag=judged.flag if judged is not None else None,
            )
            self._deadlines.pop((run.id, receipt.epoch, receipt.shard_id, session.peer_id), None)
            return judged

    def coverage(self, run: PublishedRun, epoch: int | None = None) -> dict[str, Any]:
        """Each shard of an epoch (the current one by default): pending, leased or done."""
        with self._lock:
            self._expire_overdue(run)
            current = self.store.current_epoch(run.id) or 0
            epoch = current if epoch is None else epoch
            if not 0 <= epoch <= current:
                raise CrowdtrainError(
                    f"epoch {epoch} has not started; the current one is {current}"
                )
            return {
                "epoch": epoch,
                "shards": [
                    {
                        "shard": row["shard_id"],
                        "state": row["state"],
                        "holder": row["holder"],
                        "num_completions": row["num_completions"],
                    }
                    for row in self.store.epoch_shards(run.id, epoch)
                ],
            }
