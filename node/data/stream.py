"""Sequences cut from shards: training micro-batches from leased shards, and the
validation set from the held-out shard.

:class:`ShardStream` turns leased shards into micro-batches in an order
seeded by (run seed, epoch, shard) and hands each out with its shard's
:class:`~crowdtrain.node.data.shard_progress.ShardProgress`, which the trainer
counts into. Knows nothing about downloads, leases or gRPC.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from crowdtrain.node.data.shard_progress import LeasedShard, ShardProgress
from crowdtrain.protocol.errors import ShardError
from crowdtrain.protocol.shards import (
    ShardEntry,
    batch_windows,
    num_windows,
    read_shard,
    sequence_order,
    window,
)

logger = logging.getLogger(__name__)


def validation_sequences(path: Path, entry: ShardEntry, seq_len: int, count: int) -> np.ndarray:
    """The first ``count`` windows of the validation shard, as int64 [count, seq_len + 1]."""
    tokens = read_shard(path, entry)
    n = min(count, num_windows(len(tokens), seq_len))
    return np.stack([window(tokens, i, seq_len) for i in range(n)]).astype(np.int64)


@dataclass
class _Pass:
    """One pass over a shard: its sequences' seeded order, how far it got, its progress."""

    tokens: np.ndarray
    order: np.ndarray
    progress: ShardProgress
    cursor: int = 0  # sequences of ``order`` handed out

    @property
    def finished(self) -> bool:
        return self.cursor >= len(self.order)


class ShardStream:
    """Micro-batches from leased shards, one shard at a time.

    Leased shards are queued by a background thread with :meth:`offer`; when
    the queue runs dry the current shard is replayed in a new order, so
    training never waits for data. A batch never spans two shards (the few
    sequences left at a shard's end are skipped), so each batch's loss is
    credited to exactly one shard. ``on_shard_taken`` is called when training
    takes a queued shard (the queue wants topping up). ``resume`` is a saved
    :meth:`position`: that shard, when offered, goes first and resumes there.
    ``sample_every_batch``: receipts carry a loss sample of every micro-batch, not only
    of each step's first (see :class:`ShardProgress`).
    """

    def __init__(
        self,
        run_seed: int,
        seq_len: int,
        batch_size: int,
        resume: dict[str, Any] | None = None,
        on_shard_taken: Callable[[], None] | None = None,
        sample_every_batch: bool = False,
    ):
        self.run_seed = run_seed
        self.sample_every_batch = sample_every_batch
        self.seq_len = seq_len
        self.batch_size = batch_size
        self._resume = resume
        self._on_shard_taken = on_shard_taken
        self._queue: deque[LeasedShard] = deque()
        self._lock = threading.Lock()
        self._pass: _Pass | None = None  # None until the first batch
        self.num_replays = 0
        self.data_wait_s = 0.0

    def offer(self, shard: LeasedShard) -> None:
        """Queue a verified shard; the one a restarted node was training goes first."""
        with self._lock:
            r = self._resume
            if r is not None and (r["shard_id"], r["epoch"]) == (shard.shard_id, shard.epoch):
                self._queue.appendleft(shard)
            else:
                self._queue.append(shard)

    def pinned(self) -> set[str]:
        """Shards the stream still needs on disk."""
        with self._lock:
            ids = {s.shard_id for s in self._queue}
        current = self._pass
        if current is not None:
            ids.add(current.progress.shard.shard_id)
        return ids

    def held(self) -> list[tuple[str, int]]:
        """(shard, epoch) of every lease the stream holds: queued and current."""
        with self._lock:
            held = [(s.shard_id, s.epoch) for s in self._queue]
        current = self._pass
        if current is not None:
            held.append((current.progress.shard.shard_id, current.progress.shard.epoch))
        return held

    def position(self) -> dict[str, Any] | None:
        """Where training is in the current shard, for resuming after a restart."""
        current = self._pass
        if current is None or current.progress.replay != 0:
            return None
        return current.progress.position(self.batch_size)

    @property
    def num_queued(self) -> int:
        with self._lock:
            return len(self._queue)

    def next_batch(self) -> tuple[np.ndarray, ShardProgress]:
        """The next micro-batch, int64 [batch_size, seq_len + 1], and the shard it came from."""
        started = time.perf_counter()
        try:
            return self._next_batch()
        finally:
            self.data_wait_s += time.perf_counter() - started

    def _next_batch(self) -> tuple[np.ndarray, ShardProgress]:
        current = self._pass
        if current is None or current.finished:
            current = self._next_pass(current)
            self._pass = current
        progress = current.progress
        index = current.cursor // progress.batch_size
        current.cursor += progress.batch_size
        progress.batch = index
        batch = batch_windows(
            current.tokens, current.order, index, progress.batch_size, self.seq_len
        )
        return batch, progress

    def _next_pass(self, finished: _Pass | None) -> _Pass:
        """The queued shard's first pass, else another pass over the shard just finished."""
        with self._lock:
            following = self._queue.popleft() if self._queue else None
        if following is not None:
            started = self._start(following, replay=0)
            if self._on_shard_taken is not None:
                self._on_shard_taken()
            return started
        if finished is not None:
            shard = finished.progress.shard
            self.num_replays += 1
            replay = finished.progress.replay + 1
            # Once per shard at INFO: a shard shorter than a micro-batch is a whole pass per
            # micro-batch, which would be hundreds of lines a minute.
            logger.log(
                logging.INFO if replay == 1 else logging.DEBUG,
                "no new shard yet; replaying %s (pass %d)",
                shard.shard_id,
                replay + 1,
            )
            return self._start(shard, replay=replay)
        raise ShardError("no shard to train on; lease one first")

    def _start(self, shard: LeasedShard, replay: int) -> _Pass:
        tokens = read_shard(shard.path, shard.entry)
        n = num_windows(len(tokens), self.seq_len)
        if n == 0:
            raise ShardError(
                f"shard {shard.shard_id} holds no whole sequence of {self.seq_len} tokens; "
                "the run's data does not fit its seq_len"
            )
        # A shard shorter than one micro-batch (a corpus's last shard, often, on a GPU
        # that probed a large micro-batch) is trained as one smaller batch; the receipt
        # names that size, so the ledger and the verifier cut the shard the same way.
        batch_size = min(self.batch_size, n)
        num_batches = n // batch_size
        order = sequence_order(
            self.run_seed,
            shard.epoch,
            shard.shard_id,
            len(tokens),
            self.seq_len,
            batch_size,
            replay,
        )
        progress = ShardProgress(
            shard=shard,
            replay=replay,
            num_batches=num_batches,
            started=time.time(),
            batch_size=batch_size,
            every_batch=self.sample_every_batch,
        )
        started = _Pass(tokens, order, progress)
        r, self._resume = self._resume, None
        if (
            r is not None
            and replay == 0
            and (r["shard_id"], r["epoch"]) == (shard.shard_id, shard.epoch)
            # A node restarted with another micro-batch cuts the shard differently.
            and r.get("batch_size", self.batch_size) == self.batch_size
        ):
            done = progress.resume(r)
            started.cursor = done * batch_size
            logger.info("resuming shard %s at batch %d of %d", shard.shard_id, done, num_batches)
        return started


__all__ = ["ShardStream", "validation_sequences"]
