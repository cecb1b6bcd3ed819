"""Shard leases and receipts.

A node leases shards of the current epoch; a lease lasts ``[data] lease_s``
and is renewed by heartbeats; a receipt completes its shard. When every shard
of an epoch is done, the next epoch starts in a fresh order.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from crowdtrain.coordinator.peers import Session
from crowdtrain.coordinator.runs import PublishedRun, epoch_order
from crowdtrain.coordinator.store import Store
from crowdtrain.protocol.errors import CrowdtrainError
from crowdtrain.protocol.messages import ReceiptPayload

MAX_SHARDS_PER_LEASE = 8


class ReceiptError(CrowdtrainError):
    """A receipt that does not match a lease the peer holds."""


@dataclass(frozen=True)
class Lease:
    shard_id: str
    epoch: int
    expires_in_s: float


def grant(store: Store, run: PublishedRun, session: Session, max_shards: int) -> list[Lease]:
    """Lease up to ``max_shards`` shards; none when every shard is held by live peers."""
    max_shards = max(1, min(max_shards, MAX_SHARDS_PER_LEASE))
    now = time.time()
    epoch = _current_epoch(store, run)
    granted = store.grant_leases(
        run.id, epoch, session.peer_id, max_shards, now, now + run.spec.data.lease_s
    )
    return [Lease(shard_id=s, epoch=epoch, expires_in_s=run.spec.data.lease_s) for s in granted]


def _current_epoch(store: Store, run: PublishedRun) -> int:
    epoch = store.current_epoch(run.id) or 0
    counts = store.epoch_counts(run.id, epoch)
    if counts and set(counts) == {"done"}:
        epoch += 1
        store.ensure_epoch(run.id, epoch, epoch_order(run.spec, run.manifest, epoch))
    return epoch


def complete(store: Store, run: PublishedRun, session: Session, receipt: ReceiptPayload) -> None:
    """Record a receipt for a shard the peer holds (or held until it expired unclaimed)."""
    shard = store.get_shard(run.id, receipt.epoch, receipt.shard_id)
    if shard is None:
        raise ReceiptError(
            f"no shard {receipt.shard_id!r} in epoch {receipt.epoch} of run {run.id!r}"
        )
    if shard["holder"] != session.peer_id:
        raise ReceiptError(f"shard {receipt.shard_id!r} is not leased to this peer")
    if receipt.finished < receipt.started:
        raise ReceiptError("receipt finishes before it starts")
    store.complete_shard(
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
        }
    )
