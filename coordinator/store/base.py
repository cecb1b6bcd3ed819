"""The coordinator's database: its schema, the connection, and transactions.

:class:`~crowdtrain.coordinator.store.Store` puts the record kinds together;
each kind of record has its own module (:mod:`runs`, :mod:`ledger`, :mod:`trust`).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar, cast

from crowdtrain.protocol.errors import CrowdtrainError

DB_NAME = "coordinator.db"
SCHEMA_VERSION = 3

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    spec_toml TEXT NOT NULL,
    spec_hash TEXT NOT NULL,
    manifest_json TEXT NOT NULL,
    manifest_hash TEXT NOT NULL,
    data_path TEXT NOT NULL,
    published_at REAL NOT NULL,
    step INTEGER NOT NULL DEFAULT 0,
    run_signature BLOB NOT NULL DEFAULT x''
);
CREATE TABLE IF NOT EXISTS peers (
    run_id TEXT NOT NULL,
    peer_id TEXT NOT NULL,
    public_key BLOB NOT NULL,
    name TEXT NOT NULL,
    device TEXT NOT NULL DEFAULT '',
    versions TEXT NOT NULL DEFAULT '',
    registered_at REAL NOT NULL,
    last_seen REAL NOT NULL,
    state TEXT NOT NULL DEFAULT 'active',
    tokens_per_s REAL NOT NULL DEFAULT 0,
    loss REAL,
    step INTEGER NOT NULL DEFAULT 0,
    admitted_via TEXT NOT NULL DEFAULT 'open',
    dht_peer_id TEXT NOT NULL DEFAULT '',
    progress_key TEXT NOT NULL DEFAULT '',
    num_skipped_steps INTEGER NOT NULL DEFAULT 0,
    flagged TEXT,
    PRIMARY KEY (run_id, peer_id)
);
CREATE INDEX IF NOT EXISTS peers_by_dht_id ON peers (run_id, dht_peer_id);
CREATE INDEX IF NOT EXISTS peers_by_progress_key ON peers (run_id, progress_key);
CREATE INDEX IF NOT EXISTS peers_by_last_seen ON peers (run_id, last_seen);
-- Bytes a node process reported sending and receiving, by purpose (self-reported:
-- shown, never credited). Like peer_counters, cumulative per process, only rising.
CREATE TABLE IF NOT EXISTS peer_traffic (
    run_id TEXT NOT NULL,
    peer_id TEXT NOT NULL,
    session_key TEXT NOT NULL,
    purpose TEXT NOT NULL,
    sent INTEGER NOT NULL,
    received INTEGER NOT NULL,
    PRIMARY KEY (run_id, peer_id, session_key, purpose)
);
-- Where a node process's training loop spent its wall time (self-reported: shown,
-- never credited). Like peer_traffic, cumulative per process, only rising.
CREATE TABLE IF NOT EXISTS peer_time (
    run_id TEXT NOT NULL,
    peer_id TEXT NOT NULL,
    session_key TEXT NOT NULL,
    training_s REAL NOT NULL,
    computing_s REAL NOT NULL,
    swarm_wait_s REAL NOT NULL,
    data_wait_s REAL NOT NULL,
    PRIMARY KEY (run_id, peer_id, session_key)
);
CREATE TABLE IF NOT EXISTS peer_counters (
    run_id TEXT NOT NULL,
    peer_id TEXT NOT NULL,
    session_key TEXT NOT NULL,
    num_tokens INTEGER NOT NULL,
    num_sequences INTEGER NOT NULL,
    PRIMARY KEY (run_id, peer_id, session_key)
);
CREATE TABLE IF NOT EXISTS sessions (
    token_hash TEXT PRIMARY KEY,
    run_id TEXT NOT NULL,
    peer_id TEXT NOT NULL,
    expires_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS nonces (
    public_key BLOB NOT NULL,
    nonce BLOB NOT NULL,
    timestamp REAL NOT NULL,
    PRIMARY KEY (public_key, nonce)
);
CREATE INDEX IF NOT EXISTS nonces_by_time ON nonces (timestamp);
CREATE TABLE IF NOT EXISTS invites (
    code_hash TEXT PRIMARY KEY,
    run_id TEXT NOT NULL,
    prefix TEXT NOT NULL,
    max_uses INTEGER NOT NULL,
    uses INTEGER NOT NULL DEFAULT 0,
    expires_at REAL,
    note TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS bans (
    run_id TEXT NOT NULL,
    peer_id TEXT NOT NULL,
    reason TEXT NOT NULL,
    banned_at REAL NOT NULL,
    PRIMARY KEY (run_id, peer_id)
);
CREATE TABLE IF NOT EXISTS peer_reports (
    run_id TEXT NOT NULL,
    reporter TEXT NOT NULL,
    dht_peer_id TEXT NOT NULL,
    reason TEXT NOT NULL,
    count INTEGER NOT NULL,
    first_at REAL NOT NULL,
    last_at REAL NOT NULL,
    PRIMARY KEY (run_id, reporter, dht_peer_id, reason)
);
CREATE TABLE IF NOT EXISTS evals (
    run_id TEXT NOT NULL,
    step INTEGER NOT NULL,
    num_tokens INTEGER NOT NULL,
    val_loss REAL NOT NULL,
    bits_per_byte REAL NOT NULL,
    swarm_tokens INTEGER NOT NULL DEFAULT 0,
    peer_id TEXT NOT NULL,
    time REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS evals_by_run ON evals (run_id, step);
CREATE INDEX IF NOT EXISTS evals_by_run_step_time ON evals (run_id, step, time);
CREATE TABLE IF NOT EXISTS shards (
    run_id TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    shard_id TEXT NOT NULL,
    position INTEGER NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    holder TEXT,
    num_completions INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (run_id, epoch, shard_id)
);
CREATE TABLE IF NOT EXISTS leases (
    run_id TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    shard_id TEXT NOT NULL,
    peer_id TEXT NOT NULL,
    granted_at REAL NOT NULL,
    state TEXT NOT NULL,
    PRIMARY KEY (run_id, epoch, shard_id, peer_id)
);
CREATE INDEX IF NOT EXISTS active_leases ON leases (run_id, state);
CREATE TABLE IF NOT EXISTS receipts (
    run_id TEXT NOT NULL,
    peer_id TEXT NOT NULL,
    shard_id TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    num_sequences INTEGER NOT NULL,
    num_tokens INTEGER NOT NULL,
    loss_sum REAL NOT NULL,
    started REAL NOT NULL,
    finished REAL NOT NULL,
    received_at REAL NOT NULL
);
-- ledger: how each receipt was checked, and the keeper's checkpoints
CREATE TABLE IF NOT EXISTS receipt_checks (
    run_id TEXT NOT NULL,
    peer_id TEXT NOT NULL,
    shard_id TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    num_sequences INTEGER NOT NULL,
    num_tokens INTEGER NOT NULL,
    flops REAL NOT NULL,
    device TEXT NOT NULL,
    device_s REAL NOT NULL,
    started REAL NOT NULL,
    finished REAL NOT NULL,
    received_at REAL NOT NULL,
    status TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    possible TEXT NOT NULL,
    dht TEXT NOT NULL,
    spot TEXT NOT NULL,
    spot_reason TEXT NOT NULL DEFAULT '',
    micro_batch_size INTEGER NOT NULL,
    samples_json TEXT NOT NULL,
    assess_cpu_s REAL NOT NULL DEFAULT 0,
    spot_cpu_s REAL NOT NULL DEFAULT 0,
    spot_at REAL,
    PRIMARY KEY (run_id, peer_id, shard_id, epoch)
);
CREATE INDEX IF NOT EXISTS receipt_checks_by_spot ON receipt_checks (spot, received_at);
-- the roster's weight caps read a run's recent verified receipts at each refresh
CREATE INDEX IF NOT EXISTS receipt_checks_by_received ON receipt_checks (run_id, received_at);
CREATE TABLE IF NOT EXISTS checkpoints (
    run_id TEXT NOT NULL,
    step INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    file TEXT,
    file_sha256 TEXT NOT NULL,
    num_bytes INTEGER NOT NULL,
    spec_hash TEXT NOT NULL,
    created_at REAL NOT NULL,
    cpu_s REAL NOT NULL DEFAULT 0,
    num_tokens INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (run_id, step)
);
CREATE TABLE IF NOT EXISTS run_samples (
    run_id TEXT NOT NULL,
    time REAL NOT NULL,
    step INTEGER NOT NULL,
    num_tokens INTEGER NOT NULL,
    tokens_per_s REAL NOT NULL,
    num_peers INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS run_samples_by_time ON run_samples (run_id, time);
"""


class StoreError(CrowdtrainError):
    """The data folder or its database cannot be used."""


class Memo:
    """Values computed from rows that never change (a published run's parsed spec and
    manifest), kept with the store that holds the rows so that requests do not compute
    them again. Thread-safe; past ``max_entries`` it starts afresh."""

    def __init__(self, max_entries: int = 64) -> None:
        self.max_entries = max_entries
        self._values: dict[Hashable, Any] = {}
        self._lock = threading.Lock()

    def get(self, key: Hashable, make: Callable[[], T]) -> T:
        """The value kept under ``key``, made by ``make()`` the first time."""
        with self._lock:
            if key in self._values:
                return cast(T, self._values[key])
        value = make()  # outside the lock: parsing a large manifest takes a while
        with self._lock:
            if len(self._values) >= self.max_entries:
                self._values.clear()
            self._values[key] = value
        return value


class StoreBase:
    """One SQLite database in a coordinator's data folder: the connection and its helpers.

    Safe to share between threads: calls are serialised by a lock, which
    costs little next to SQLite's own fsync per commit.
    """

    def __init__(self, data_dir: str | Path, create: bool = True):
        self.data_dir = Path(data_dir)
        self.path = self.data_dir / DB_NAME
        if not create and not self.path.exists():
            raise StoreError(
                f"{self.data_dir} is not a coordinator data folder (no {DB_NAME}); "
                "start `crowdtrain-coordinator serve --data-dir` on it first, or check the path"
            )
        if self.data_dir.exists() and not self.data_dir.is_dir():
            raise StoreError(f"--data-dir {self.data_dir} is a file, not a folder")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self.memo = Memo()
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA busy_timeout=10000")
            self._db.execute("PRAGMA foreign_keys=ON")
            # executescript commits on its own; every statement in it is idempotent.
            self._db.executescript(_SCHEMA)
            with self.transaction() as db:
                db.execute(
                    "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)",
                    (str(SCHEMA_VERSION),),
                )
                found = db.execute(
                    "SELECT value FROM meta WHERE key = 'schema_version'"
                ).fetchone()[0]
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{self.path} is not a usable SQLite database: {e}") from None
        if found != str(SCHEMA_VERSION):
            self._db.close()
            raise StoreError(
                f"{self.path} was written by another crowdtrain version (store format {found}, "
                f"this one reads {SCHEMA_VERSION}); start this coordinator on a new --data-dir"
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic write: everything inside commits together or not at all."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _one(self, sql: str, args: tuple = ()) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute(sql, args).fetchone()
        return dict(row) if row is not None else None

    def _all(self, sql: str, args: tuple = ()) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(r) for r in self._db.execute(sql, args).fetchall()]

    @staticmethod
    def _return_leases(db: sqlite3.Connection, run_id: str, peer_id: str) -> None:
        db.execute(
            "UPDATE leases SET state = 'returned' WHERE run_id = ? AND peer_id = ?"
            " AND state = 'active'",
            (run_id, peer_id),
        )
        db.execute(
            "UPDATE shards SET state = 'pending', holder = NULL"
            " WHERE run_id = ? AND holder = ? AND state = 'leased'",
            (run_id, peer_id),
        )

    @staticmethod
    def _insert_receipt_check(db: sqlite3.Connection, check: dict[str, Any]) -> None:
        """Record how a stored receipt was checked (one row per receipt), inside ``db``'s
        transaction."""
        db.execute(
            "INSERT OR REPLACE INTO receipt_checks (run_id, peer_id, shard_id, epoch,"
            " num_sequences, num_tokens, flops, device, device_s, started, finished,"
            " received_at, status, reason, possible, dht, spot, spot_reason,"
            " micro_batch_size, samples_json, assess_cpu_s) VALUES (:run_id, :peer_id,"
            " :shard_id, :epoch, :num_sequences, :num_tokens, :flops, :device, :device_s,"
            " :started, :finished, :received_at, :status, :reason, :possible, :dht, :spot,"
            " :spot_reason, :micro_batch_size, :samples_json, :assess_cpu_s)",
            check,
        )
