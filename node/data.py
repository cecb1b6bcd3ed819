"""A node's data: verified shards on disk and the batches cut from them.

:class:`ShardCache` downloads shards and checks each sha256 (one retry, then
a clear error). :class:`ShardStream` turns leased shards into micro-batches
in an order seeded by (run seed, epoch, shard), and accounts for each shard
so a receipt can be sent when it is done. Knows nothing about gRPC.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from crowdtrain.protocol.errors import ShardError
from crowdtrain.protocol.files import atomic_write
from crowdtrain.protocol.shards import (
    ShardEntry,
    ShardManifest,
    batch_windows,
    num_windows,
    read_shard,
    sequence_order,
    verify_shard,
    window,
)

logger = logging.getLogger(__name__)


class ShardCache:
    """Shards of one run's data in a local folder, each checked against the manifest."""

    def __init__(
        self,
        folder: Path,
        manifest: ShardManifest,
        base_url: str,
        download: Callable[[str, Path], None],
        max_bytes: int | None = None,
    ):
        self.folder = folder
        self.manifest = manifest
        self.base_url = base_url.rstrip("/")
        self.max_bytes = max_bytes
        self._download = download
        self._entries = {s.id: s for s in manifest.shards}
        self._lock = threading.Lock()
        folder.mkdir(parents=True, exist_ok=True)

    def evict(self, keep: set[str]) -> list[str]:
        """Delete the least recently used shards until the cache fits ``max_bytes``.

        Shards named in ``keep`` (being trained, queued, the validation shard)
        are never deleted, so the cache may exceed its bound by those alone.
        """
        if self.max_bytes is None:
            return []
        with self._lock:
            files = {e.file: e.id for e in self.manifest.shards}
            present = [p for p in self.folder.iterdir() if p.name in files]
            total = sum(p.stat().st_size for p in present)
            evicted = []
            for path in sorted(present, key=lambda p: p.stat().st_mtime):
                if total <= self.max_bytes:
                    break
                shard_id = files[path.name]
                if shard_id in keep:
                    continue
                total -= path.stat().st_size
                path.unlink(missing_ok=True)
                evicted.append(shard_id)
        if evicted:
            logger.info("cache over its bound; removed %d shards", len(evicted))
        return evicted

    def entry(self, shard_id: str) -> ShardEntry:
        try:
            return self._entries[shard_id]
        except KeyError:
            raise ShardError(f"shard {shard_id!r} is not in the run's manifest") from None

    def fetch(self, shard_id: str) -> Path:
        """The verified local path of a shard, downloading it (at most twice) if needed."""
        entry = self.entry(shard_id)
        path = self.folder / entry.file
        if path.exists():
            try:
                verify_shard(path, entry)
                path.touch()  # most recently used
                return path
            except ShardError:
                logger.warning("cached shard %s is damaged; downloading it again", shard_id)
                path.unlink()
        for attempt in (1, 2):
            self._download(f"{self.base_url}/{shard_id}", path)
            try:
                verify_shard(path, entry)
                return path
            except ShardError as e:
                path.unlink(missing_ok=True)
                if attempt == 2:
                    raise ShardError(
                        f"shard {shard_id} failed its sha256 check twice ({e}); the "
                        "coordinator's copy does not match the run's manifest: tell the run's "
                        "operator, who should prepare and publish the data again"
                    ) from None
                logger.warning("shard %s failed its sha256 check; downloading it again", shard_id)
        raise AssertionError("unreachable")


def validation_sequences(path: Path, entry: ShardEntry, seq_len: int, count: int) -> np.ndarray:
    """The first ``count`` windows of the validation shard, as int64 [count, seq_len + 1]."""
    tokens = read_shard(path, entry)
    n = min(count, num_windows(len(tokens), seq_len))
    return np.stack([window(tokens, i, seq_len) for i in range(n)]).astype(np.int64)


@dataclass(frozen=True)
class LeasedShard:
    shard_id: str
    epoch: int
    path: Path
    entry: ShardEntry


# At most this many samples per receipt, and losses per sample (see ReceiptSample).
MAX_RECEIPT_SAMPLES = 256
SAMPLE_SEQUENCES = 8


@dataclass
class ShardProgress:
    """What a node did with one shard; becomes its receipt.

    ``samples`` hold, for the first micro-batch trained at each swarm step, the
    step, the batch's index in the shard's order and the losses of its first
    sequences: the coordinator's verifier recomputes them from its checkpoint
    of that step. ``batch`` is the index of the micro-batch handed out last.
    """

    shard: LeasedShard
    replay: int
    num_batches: int
    started: float
    batch_size: int = 1
    num_sequences: int = 0
    num_tokens: int = 0
    loss_sum: float = 0.0
    batches_done: int = 0
    batch: int = -1
    samples: list[dict] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.batches_done >= self.num_batches

    def wants_sample(self, step: int) -> bool:
        """Whether the batch being trained at ``step`` should be recorded as a sample."""
        if self.replay != 0 or len(self.samples) >= MAX_RECEIPT_SAMPLES:
            return False
        return not self.samples or self.samples[-1]["step"] != step

    def add_sample(self, step: int, losses: list[float]) -> None:
        """Record the losses of the current batch's first sequences, trained at ``step``."""
        self.samples.append(
            {"step": step, "batch": self.batch, "losses": losses[:SAMPLE_SEQUENCES]}
        )

    def receipt(self) -> dict:
        return {
            "shard_id": self.shard.shard_id,
            "epoch": self.shard.epoch,
            "num_sequences": self.num_sequences,
            "num_tokens": self.num_tokens,
            "loss_sum": self.loss_sum,
            "started": self.started,
            "finished": time.time(),
            "micro_batch_size": self.batch_size,
            "samples": list(self.samples),
        }


class ShardStream:
    """Micro-batches from leased shards, one shard at a time.

    Leased shards are queued by a background thread with :meth:`offer`; when
    the queue runs dry the current shard is replayed in a new order, so
    training never waits for data. A batch never spans two shards (the few
    sequences left at a shard's end are skipped), so each batch's loss is
    credited to exactly one shard.
    """

    def __init__(
        self,
        run_seed: int,
        seq_len: int,
        batch_size: int,
        resume: dict | None = None,
        on_shard_taken: Callable[[], None] | None = None,
    ):
        self.run_seed = run_seed
        self.seq_len = seq_len
        self.batch_size = batch_size
        self._resume = resume
        self._on_shard_taken = on_shard_taken
        self._queue: deque[LeasedShard] = deque()
        self._lock = threading.Lock()
        self._current: ShardProgress | None = None
        self._tokens: np.ndarray | None = None
        self._order: np.ndarray | None = None
        self._cursor = 0
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
        if self._current is not None:
            ids.add(self._current.shard.shard_id)
        return ids

    def held(self) -> list[tuple[str, int]]:
        """(shard, epoch) of every lease the stream holds: queued and current."""
        with self._lock:
            held = [(s.shard_id, s.epoch) for s in self._queue]
        if self._current is not None:
            held.append((self._current.shard.shard_id, self._current.shard.epoch))
        return held

    def position(self) -> dict | None:
        """Where training is in the current shard, for resuming after a restart."""
        c = self._current
        if c is None or c.replay != 0:
            return None
        return {
            "shard_id": c.shard.shard_id,
            "epoch": c.shard.epoch,
            "batches_done": c.batches_done,
            "batch_size": self.batch_size,
            "num_sequences": c.num_sequences,
            "num_tokens": c.num_tokens,
            "loss_sum": c.loss_sum,
            "started": c.started,
            "samples": c.samples,
        }

    @property
    def num_queued(self) -> int:
        with self._lock:
            return len(self._queue)

    def _start(self, shard: LeasedShard, replay: int) -> None:
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
        self._tokens = tokens
        self._order = sequence_order(
            self.run_seed,
            shard.epoch,
            shard.shard_id,
            len(tokens),
            self.seq_len,
            batch_size,
            replay,
        )
        self._cursor = 0
        self._current = ShardProgress(
            shard=shard,
            replay=replay,
            num_batches=num_batches,
            started=time.time(),
            batch_size=batch_size,
        )
        r, self._resume = self._resume, None
        if (
            r is not None
            and replay == 0
            and (r["shard_id"], r["epoch"]) == (shard.shard_id, shard.epoch)
            # A node restarted with another micro-batch cuts the shard differently.
            and r.get("batch_size", self.batch_size) == self.batch_size
        ):
            done = min(int(r["batches_done"]), num_batches)
            self._cursor = done * batch_size
            c = self._current
            c.batches_done, c.num_sequences, c.num_tokens = (
                done,
                r["num_sequences"],
                r["num_tokens"],
            )
            c.loss_sum, c.started = float(r["loss_sum"]), float(r["started"])
            c.samples = list(r.get("samples", []))
            logger.info("resuming shard %s at batch %d of %d", shard.shard_id, done, num_batches)

    def next_batch(self) -> tuple[np.ndarray, ShardProgress]:
        """The next micro-batch, int64 [batch_size, seq_len + 1], and the shard it came from."""
        started = time.perf_counter()
        try:
            return self._next_batch()
        finally:
            self.data_wait_s += time.perf_counter() - started

    def _next_batch(self) -> tuple[np.ndarray, ShardProgress]:
        current = self._current
        if current is None or self._cursor >= len(self._order):  # type: ignore[arg-type]
            with self._lock:
                following = self._queue.popleft() if self._queue else None
            if following is not None:
                self._start(following, replay=0)
                if self._on_shard_taken is not None:
                    self._on_shard_taken()
            elif current is not None:
                self.num_replays += 1
                logger.info("no new shard yet; replaying %s", current.shard.shard_id)
                self._start(current.shard, replay=current.replay + 1)
            else:
                raise ShardError("no shard to train on; lease one first")
        assert self._current is not None and self._order is not None and self._tokens is not None
        batch_size = self._current.batch_size
        index = self._cursor // batch_size
        self._cursor += batch_size
        self._current.batch = index
        batch = batch_windows(self._tokens, self._order, index, batch_size, self.seq_len)
        return batch, self._current


def load_position(path: Path, manifest_hash: str) -> dict | None:
    """Where a node was in its shard when it last stopped, if it trained this data."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or saved.get("manifest_hash") != manifest_hash:
        return None
    return saved.get("position")


def save_position(path: Path, manifest_hash: str, position: dict | None) -> None:
    """Write a :meth:`ShardStream.position` atomically, for :func:`load_position`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps({"manifest_hash": manifest_hash, "position": position}))
