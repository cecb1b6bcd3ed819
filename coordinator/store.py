"""The coordinator's storage: SQLite in WAL mode, and the only place SQL lives.

Every write is one transaction with ``synchronous=FULL``: once a method
returns, the record survives a crash. Methods take and return plain rows
(dicts); the domain modules give them meaning.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from crowdtrain.protocol.errors import CrowdtrainError

DB_NAME = "coordinator.db"
# Longer than any signed message may be old (protocol.identity.DEFAULT_MAX_AGE_S).
_NONCE_KEEP_S = 600.0
SCHEMA_VERSION = 2

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
    peer_id TEXT NOT NULL,
    time REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS evals_by_run ON evals (run_id, step);
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
    PRIMARY KEY (run_id, step)
);
"""


class StoreError(CrowdtrainError):
    """The data folder or its database cannot be used."""


class Store:
    """One SQLite database in a coordinator's data folder.

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

    # runs

    def insert_run(self, run: dict[str, Any]) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT INTO runs (id, spec_toml, spec_hash, manifest_json, manifest_hash,"
                " data_path, published_at, run_signature) VALUES (:id, :spec_toml, :spec_hash,"
                " :manifest_json, :manifest_hash, :data_path, :published_at, :run_signature)",
                run,
            )

    def get_run(self, run_id: str) -> dict[str, Any] | None:
        return self._one("SELECT * FROM runs WHERE id = ?", (run_id,))

    def list_runs(self) -> list[dict[str, Any]]:
        return self._all("SELECT * FROM runs ORDER BY published_at")

    def raise_run_step(self, run_id: str, step: int) -> None:
        with self.transaction() as db:
            db.execute("UPDATE runs SET step = MAX(step, ?) WHERE id = ?", (step, run_id))

    # peers and sessions

    def upsert_peer(
        self, peer: dict[str, Any], session: dict[str, Any], invite_hash: str | None = None
    ) -> None:
        """Record a registration and its session in one transaction.

        ``invite_hash`` (a new peer's invite code) is spent in the same
        transaction; :class:`StoreError` if it is no longer usable, and then
        nothing is written.
        """
        with self.transaction() as db:
            if invite_hash is not None:
                spent = db.execute(
                    "UPDATE invites SET uses = uses + 1 WHERE code_hash = ? AND run_id = ?"
                    " AND revoked = 0 AND (max_uses = 0 OR uses < max_uses)"
                    " AND (expires_at IS NULL OR expires_at > ?)",
                    (invite_hash, peer["run_id"], peer["now"]),
                ).rowcount
                if spent != 1:
                    raise StoreError("the invite code is used up or has expired")
            db.execute(
                "INSERT INTO peers (run_id, peer_id, public_key, name, device, versions,"
                " registered_at, last_seen, state, admitted_via) VALUES (:run_id, :peer_id,"
                " :public_key, :name, :device, :versions, :now, :now, 'active', :admitted_via)"
                " ON CONFLICT (run_id, peer_id) DO UPDATE SET name = :name, device = :device,"
                " versions = :versions, last_seen = :now, state = 'active'",
                peer,
            )
            db.execute("DELETE FROM sessions WHERE expires_at < ?", (peer["now"],))
            db.execute(
                "INSERT INTO sessions (token_hash, run_id, peer_id, expires_at)"
                " VALUES (:token_hash, :run_id, :peer_id, :expires_at)",
                session,
            )

    def get_session(self, token_hash: str) -> dict[str, Any] | None:
        return self._one("SELECT * FROM sessions WHERE token_hash = ?", (token_hash,))

    def end_session(self, token_hash: str, run_id: str, peer_id: str) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM sessions WHERE token_hash = ?", (token_hash,))
            db.execute(
                "UPDATE peers SET state = 'left', last_seen = ? WHERE run_id = ? AND peer_id = ?",
                (time.time(), run_id, peer_id),
            )
            self._return_leases(db, run_id, peer_id)

    def get_peer(self, run_id: str, peer_id: str) -> dict[str, Any] | None:
        return self._one("SELECT * FROM peers WHERE run_id = ? AND peer_id = ?", (run_id, peer_id))

    def list_peers(self, run_id: str) -> list[dict[str, Any]]:
        return self._all("SELECT * FROM peers WHERE run_id = ? ORDER BY registered_at", (run_id,))

    def count_live_peers(self, run_id: str, since: float) -> int:
        row = self._one(
            "SELECT COUNT(*) AS n FROM peers WHERE run_id = ? AND state != 'left'"
            " AND last_seen >= ?",
            (run_id, since),
        )
        return int(row["n"]) if row else 0

    def record_heartbeat(self, update: dict[str, Any], evaluations: list[dict[str, Any]]) -> None:
        """Apply one heartbeat. Counters are cumulative per node process
        (``session_key``) and only ever rise, so a heartbeat applied twice, or
        two processes sharing one identity, count once each."""
        with self.transaction() as db:
            db.execute(
                "INSERT INTO peer_counters (run_id, peer_id, session_key, num_tokens,"
                " num_sequences) VALUES (:run_id, :peer_id, :session_key, :num_tokens,"
                " :num_sequences) ON CONFLICT (run_id, peer_id, session_key) DO UPDATE SET"
                " num_tokens = MAX(num_tokens, :num_tokens),"
                " num_sequences = MAX(num_sequences, :num_sequences)",
                update,
            )
            db.execute(
                "UPDATE peers SET last_seen = :now, state = 'active', tokens_per_s = :tokens_per_s,"
                " loss = :loss, step = :step, device = :device,"
                " num_skipped_steps = MAX(num_skipped_steps, :num_skipped_steps)"
                " WHERE run_id = :run_id AND peer_id = :peer_id",
                update,
            )
            db.execute("UPDATE runs SET step = MAX(step, :step) WHERE id = :run_id", update)
            db.executemany(
                "INSERT INTO evals (run_id, step, num_tokens, val_loss, bits_per_byte,"
                " peer_id, time) VALUES (:run_id, :step, :num_tokens, :val_loss,"
                " :bits_per_byte, :peer_id, :time)",
                evaluations,
            )

    def set_swarm_ids(self, run_id: str, peer_id: str, dht_peer_id: str, progress_key: str) -> None:
        """Remember which hivemind identities belong to a peer (from its signed heartbeat)."""
        with self.transaction() as db:
            db.execute(
                "UPDATE peers SET dht_peer_id = ?, progress_key = ? WHERE run_id = ?"
                " AND peer_id = ?",
                (dht_peer_id, progress_key, run_id, peer_id),
            )

    def peer_by_dht_id(self, run_id: str, dht_peer_id: str) -> dict[str, Any] | None:
        return self._one(
            "SELECT * FROM peers WHERE run_id = ? AND dht_peer_id = ?", (run_id, dht_peer_id)
        )

    def flag_peer(self, run_id: str, peer_id: str, reason: str) -> None:
        """Mark a peer as suspect (shown on the API and dashboard); the first reason stays."""
        with self.transaction() as db:
            db.execute(
                "UPDATE peers SET flagged = COALESCE(flagged, ?) WHERE run_id = ? AND peer_id = ?",
                (reason[:500], run_id, peer_id),
            )

    # nonces, invites, bans and reports

    def remember_nonce(self, public_key: bytes, nonce: bytes, timestamp: float) -> None:
        """Journal a used nonce; ones older than any message could be are dropped."""
        with self.transaction() as db:
            db.execute("DELETE FROM nonces WHERE timestamp < ?", (time.time() - _NONCE_KEEP_S,))
            db.execute(
                "INSERT OR IGNORE INTO nonces (public_key, nonce, timestamp) VALUES (?, ?, ?)",
                (public_key, nonce, timestamp),
            )

    def recent_nonces(self, since: float) -> list[dict[str, Any]]:
        """Nonces still young enough to be replayed; older ones are deleted."""
        with self.transaction() as db:
            db.execute("DELETE FROM nonces WHERE timestamp < ?", (since,))
        return self._all("SELECT * FROM nonces")

    def insert_invite(self, invite: dict[str, Any]) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT INTO invites (code_hash, run_id, prefix, max_uses, expires_at, note,"
                " created_at) VALUES (:code_hash, :run_id, :prefix, :max_uses, :expires_at,"
                " :note, :created_at)",
                invite,
            )

    def get_invite(self, code_hash: str) -> dict[str, Any] | None:
        return self._one("SELECT * FROM invites WHERE code_hash = ?", (code_hash,))

    def list_invites(self, run_id: str) -> list[dict[str, Any]]:
        return self._all(
            "SELECT prefix, max_uses, uses, expires_at, note, created_at, revoked FROM invites"
            " WHERE run_id = ? ORDER BY created_at",
            (run_id,),
        )

    def ban(self, run_id: str, peer_id: str, reason: str, now: float) -> None:
        """Ban a peer from a run: its sessions end and its leases return, at once."""
        with self.transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO bans (run_id, peer_id, reason, banned_at)"
                " VALUES (?, ?, ?, ?)",
                (run_id, peer_id, reason, now),
            )
            db.execute("DELETE FROM sessions WHERE run_id = ? AND peer_id = ?", (run_id, peer_id))
            db.execute(
                "UPDATE peers SET state = 'banned' WHERE run_id = ? AND peer_id = ?",
                (run_id, peer_id),
            )
            self._return_leases(db, run_id, peer_id)

    def unban(self, run_id: str, peer_id: str) -> bool:
        with self.transaction() as db:
            removed = db.execute(
                "DELETE FROM bans WHERE run_id = ? AND peer_id = ?", (run_id, peer_id)
            ).rowcount
            db.execute(
                "UPDATE peers SET state = 'left' WHERE run_id = ? AND peer_id = ?"
                " AND state = 'banned'",
                (run_id, peer_id),
            )
        return removed == 1

    def get_ban(self, run_id: str, peer_id: str) -> dict[str, Any] | None:
        return self._one("SELECT * FROM bans WHERE run_id = ? AND peer_id = ?", (run_id, peer_id))

    def is_banned(self, run_id: str, peer_id: str) -> bool:
        return self.get_ban(run_id, peer_id) is not None

    def list_bans(self, run_id: str) -> list[dict[str, Any]]:
        return self._all("SELECT * FROM bans WHERE run_id = ? ORDER BY banned_at", (run_id,))

    def record_reports(self, reports: list[dict[str, Any]]) -> None:
        with self.transaction() as db:
            db.executemany(
                "INSERT INTO peer_reports (run_id, reporter, dht_peer_id, reason, count,"
                " first_at, last_at) VALUES (:run_id, :reporter, :dht_peer_id, :reason, :count,"
                " :now, :now) ON CONFLICT (run_id, reporter, dht_peer_id, reason) DO UPDATE"
                " SET count = count + :count, last_at = :now",
                reports,
            )

    def reports_about(self, run_id: str, dht_peer_id: str) -> list[dict[str, Any]]:
        return self._all(
            "SELECT * FROM peer_reports WHERE run_id = ? AND dht_peer_id = ?",
            (run_id, dht_peer_id),
        )

    def peer_totals(self, run_id: str) -> dict[str, dict[str, int]]:
        """Tokens and sequences per peer, summed over its node processes."""
        rows = self._all(
            "SELECT peer_id, SUM(num_tokens) AS num_tokens, SUM(num_sequences) AS num_sequences"
            " FROM peer_counters WHERE run_id = ? GROUP BY peer_id",
            (run_id,),
        )
        return {r["peer_id"]: r for r in rows}

    def run_totals(self, run_id: str) -> dict[str, Any]:
        row = self._one(
            "SELECT COALESCE(SUM(num_tokens), 0) AS num_tokens,"
            " COALESCE(SUM(num_sequences), 0) AS num_sequences"
            " FROM peer_counters WHERE run_id = ?",
            (run_id,),
        )
        assert row is not None
        return row

    def list_evals(self, run_id: str) -> list[dict[str, Any]]:
        return self._all(
            "SELECT step, num_tokens, val_loss, bits_per_byte, peer_id, time FROM evals"
            " WHERE run_id = ? ORDER BY step, time",
            (run_id,),
        )

    # shards, leases and receipts

    def ensure_epoch(self, run_id: str, epoch: int, shard_ids: list[str]) -> None:
        """Create the rows of an epoch once, in the given (already shuffled) order."""
        with self.transaction() as db:
            db.executemany(
                "INSERT OR IGNORE INTO shards (run_id, epoch, shard_id, position)"
                " VALUES (?, ?, ?, ?)",
                [(run_id, epoch, sid, i) for i, sid in enumerate(shard_ids)],
            )

    def current_epoch(self, run_id: str) -> int | None:
        """The oldest epoch with a shard not done yet, else the latest (all done)."""
        row = self._one(
            "SELECT MIN(epoch) AS epoch FROM shards WHERE run_id = ? AND state != 'done'",
            (run_id,),
        )
        if row is not None and row["epoch"] is not None:
            return int(row["epoch"])
        return self.latest_epoch(run_id)

    def latest_epoch(self, run_id: str) -> int | None:
        row = self._one("SELECT MAX(epoch) AS epoch FROM shards WHERE run_id = ?", (run_id,))
        return None if row is None or row["epoch"] is None else int(row["epoch"])

    def grant_leases(self, run_id: str, epoch: int, peer_id: str, shard_ids: list[str]) -> None:
        """Lease shards to a peer; each must be pending (the caller checked)."""
        now = time.time()
        with self.transaction() as db:
            for shard_id in shard_ids:
                updated = db.execute(
                    "UPDATE shards SET state = 'leased', holder = ? WHERE run_id = ? AND epoch = ?"
                    " AND shard_id = ? AND state = 'pending'",
                    (peer_id, run_id, epoch, shard_id),
                ).rowcount
                assert updated == 1, f"shard {shard_id} was not pending"
                db.execute(
                    "INSERT OR REPLACE INTO leases (run_id, epoch, shard_id, peer_id, granted_at,"
                    " state) VALUES (?, ?, ?, ?, ?, 'active')",
                    (run_id, epoch, shard_id, peer_id, now),
                )

    def pending_shards(self, run_id: str, epoch: int, limit: int) -> list[str]:
        rows = self._all(
            "SELECT shard_id FROM shards WHERE run_id = ? AND epoch = ? AND state = 'pending'"
            " ORDER BY position LIMIT ?",
            (run_id, epoch, limit),
        )
        return [r["shard_id"] for r in rows]

    def expire_lease(self, run_id: str, epoch: int, shard_id: str, peer_id: str) -> None:
        """A lease ran out: its shard goes back to pending; a late receipt still counts."""
        with self.transaction() as db:
            db.execute(
                "UPDATE leases SET state = 'expired' WHERE run_id = ? AND epoch = ?"
                " AND shard_id = ? AND peer_id = ? AND state = 'active'",
                (run_id, epoch, shard_id, peer_id),
            )
            db.execute(
                "UPDATE shards SET state = 'pending', holder = NULL WHERE run_id = ?"
                " AND epoch = ? AND shard_id = ? AND holder = ? AND state = 'leased'",
                (run_id, epoch, shard_id, peer_id),
            )

    def active_leases(self, run_id: str | None = None) -> list[dict[str, Any]]:
        if run_id is None:
            return self._all("SELECT * FROM leases WHERE state = 'active'")
        return self._all("SELECT * FROM leases WHERE run_id = ? AND state = 'active'", (run_id,))

    def peer_leases(self, run_id: str, peer_id: str) -> list[dict[str, Any]]:
        """A peer's active leases, oldest first."""
        return self._all(
            "SELECT l.* FROM leases l JOIN shards s USING (run_id, epoch, shard_id)"
            " WHERE l.run_id = ? AND l.peer_id = ? AND l.state = 'active'"
            " ORDER BY l.epoch, s.position",
            (run_id, peer_id),
        )

    def get_lease(
        self, run_id: str, epoch: int, shard_id: str, peer_id: str
    ) -> dict[str, Any] | None:
        return self._one(
            "SELECT * FROM leases WHERE run_id = ? AND epoch = ? AND shard_id = ? AND peer_id = ?",
            (run_id, epoch, shard_id, peer_id),
        )

    def return_leases(self, run_id: str, peer_id: str) -> None:
        with self.transaction() as db:
            self._return_leases(db, run_id, peer_id)

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

    def epoch_counts(self, run_id: str, epoch: int) -> dict[str, int]:
        rows = self._all(
            "SELECT state, COUNT(*) AS n FROM shards WHERE run_id = ? AND epoch = ? GROUP BY state",
            (run_id, epoch),
        )
        return {r["state"]: r["n"] for r in rows}

    def epoch_shards(self, run_id: str, epoch: int) -> list[dict[str, Any]]:
        return self._all(
            "SELECT shard_id, state, holder, num_completions FROM shards"
            " WHERE run_id = ? AND epoch = ? ORDER BY position",
            (run_id, epoch),
        )

    def get_shard(self, run_id: str, epoch: int, shard_id: str) -> dict[str, Any] | None:
        return self._one(
            "SELECT * FROM shards WHERE run_id = ? AND epoch = ? AND shard_id = ?",
            (run_id, epoch, shard_id),
        )

    def complete_shard(self, receipt: dict[str, Any]) -> None:
        """Store a receipt, close its lease and mark its shard done, in one transaction."""
        with self.transaction() as db:
            db.execute(
                "INSERT INTO receipts (run_id, peer_id, shard_id, epoch, num_sequences,"
                " num_tokens, loss_sum, started, finished, received_at) VALUES (:run_id,"
                " :peer_id, :shard_id, :epoch, :num_sequences, :num_tokens, :loss_sum,"
                " :started, :finished, :received_at)",
                receipt,
            )
            db.execute(
                "UPDATE leases SET state = 'completed' WHERE run_id = :run_id AND epoch = :epoch"
                " AND shard_id = :shard_id AND peer_id = :peer_id",
                receipt,
            )
            # Another peer may hold it now (this peer's lease had expired): the shard
            # is done all the same, and that peer's receipt, if it comes, is a second
            # completion.
            db.execute(
                "UPDATE shards SET num_completions = num_completions + 1, state = 'done',"
                " holder = NULL WHERE run_id = :run_id AND epoch = :epoch AND shard_id = :shard_id",
                receipt,
            )

    def list_receipts(self, run_id: str) -> list[dict[str, Any]]:
        return self._all("SELECT * FROM receipts WHERE run_id = ? ORDER BY received_at", (run_id,))

    # ledger

    def insert_receipt_check(self, check: dict[str, Any]) -> None:
        """Record how a stored receipt was checked (one row per receipt)."""
        with self.transaction() as db:
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

    def get_receipt_check(
        self, run_id: str, peer_id: str, shard_id: str, epoch: int
    ) -> dict[str, Any] | None:
        return self._one(
            "SELECT * FROM receipt_checks WHERE run_id = ? AND peer_id = ? AND shard_id = ?"
            " AND epoch = ?",
            (run_id, peer_id, shard_id, epoch),
        )

    def list_receipt_checks(self, run_id: str, limit: int | None = None) -> list[dict[str, Any]]:
        """A run's receipt checks, oldest first; with ``limit``, only the latest ones."""
        rows = self._all(
            "SELECT * FROM receipt_checks WHERE run_id = ? ORDER BY received_at DESC LIMIT ?",
            (run_id, -1 if limit is None else limit),
        )
        return rows[::-1]

    def receipts_waiting_for_dht(self, run_id: str) -> list[dict[str, Any]]:
        return self._all(
            "SELECT * FROM receipt_checks WHERE run_id = ? AND dht = 'waiting'"
            " ORDER BY received_at",
            (run_id,),
        )

    def queued_spot_checks(self, limit: int = 16) -> list[dict[str, Any]]:
        """Receipts waiting for the verifier, oldest first, across runs."""
        return self._all(
            "SELECT * FROM receipt_checks WHERE spot = 'queued' ORDER BY received_at LIMIT ?",
            (limit,),
        )

    def finish_spot_check(self, result: dict[str, Any]) -> None:
        """Store a spot check's outcome and the receipt's resulting status."""
        with self.transaction() as db:
            db.execute(
                "UPDATE receipt_checks SET spot = :spot, spot_reason = :spot_reason,"
                " status = :status, reason = :reason, spot_cpu_s = spot_cpu_s + :cpu_s,"
                " spot_at = :now WHERE run_id = :run_id AND peer_id = :peer_id"
                " AND shard_id = :shard_id AND epoch = :epoch AND spot = 'queued'",
                result,
            )

    def ledger_totals(self, run_id: str) -> dict[str, dict[str, Any]]:
        """Per peer: what its receipts claim, and the part that passed every check."""
        rows = self._all(
            "SELECT peer_id, COUNT(*) AS num_receipts,"
            " SUM(num_tokens) AS num_tokens, SUM(num_sequences) AS num_sequences,"
            " SUM(flops) AS flops, SUM(device_s) AS device_s,"
            " SUM(status = 'verified') AS verified_shards,"
            " SUM(CASE WHEN status = 'verified' THEN num_tokens ELSE 0 END) AS verified_tokens,"
            " SUM(CASE WHEN status = 'verified' THEN num_sequences ELSE 0 END)"
            " AS verified_sequences,"
            " SUM(CASE WHEN status = 'verified' THEN flops ELSE 0 END) AS verified_flops,"
            " SUM(status = 'rejected') AS num_rejected,"
            " SUM(status = 'pending') AS num_pending,"
            " SUM(status = 'unverified') AS num_unverified"
            " FROM receipt_checks WHERE run_id = ? GROUP BY peer_id",
            (run_id,),
        )
        return {r["peer_id"]: r for r in rows}

    def verified_tokens(self, run_id: str, peer_id: str) -> int:
        row = self._one(
            "SELECT COALESCE(SUM(num_tokens), 0) AS n FROM receipt_checks WHERE run_id = ?"
            " AND peer_id = ? AND status = 'verified'",
            (run_id, peer_id),
        )
        return int(row["n"]) if row else 0

    def verification_costs(self, run_id: str) -> dict[str, Any]:
        """CPU seconds the coordinator spent checking a run's receipts and keeping checkpoints."""
        row = self._one(
            "SELECT COUNT(*) AS num_receipts, COALESCE(SUM(num_tokens), 0) AS num_tokens,"
            " COALESCE(SUM(status = 'verified'), 0)"
            " AS num_verified, COALESCE(SUM(assess_cpu_s), 0) AS assess_cpu_s,"
            " COALESCE(SUM(spot_cpu_s), 0) AS spot_cpu_s,"
            " COALESCE(SUM(spot IN ('passed', 'failed')), 0) AS num_spot_checks,"
            " COALESCE(SUM(device_s), 0) AS device_s"
            " FROM receipt_checks WHERE run_id = ?",
            (run_id,),
        )
        keeper = self._one(
            "SELECT COUNT(*) AS num_checkpoints, COALESCE(SUM(cpu_s), 0) AS keeper_cpu_s"
            " FROM checkpoints WHERE run_id = ?",
            (run_id,),
        )
        assert row is not None and keeper is not None
        return {**row, **keeper}

    def insert_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO checkpoints (run_id, step, sha256, file, file_sha256,"
                " num_bytes, spec_hash, created_at, cpu_s) VALUES (:run_id, :step, :sha256,"
                " :file, :file_sha256, :num_bytes, :spec_hash, :created_at, :cpu_s)",
                checkpoint,
            )

    def list_checkpoints(self, run_id: str) -> list[dict[str, Any]]:
        """Every checkpoint the keeper took, oldest step first; ``file`` is NULL once removed."""
        return self._all("SELECT * FROM checkpoints WHERE run_id = ? ORDER BY step", (run_id,))

    def get_checkpoint(self, run_id: str, step: int) -> dict[str, Any] | None:
        return self._one("SELECT * FROM checkpoints WHERE run_id = ? AND step = ?", (run_id, step))

    def forget_checkpoint_file(self, run_id: str, step: int) -> None:
        """The file is gone; its hash stays, so downloaded state of that step can be checked."""
        with self.transaction() as db:
            db.execute(
                "UPDATE checkpoints SET file = NULL WHERE run_id = ? AND step = ?", (run_id, step)
            )
