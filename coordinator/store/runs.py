"""Records of runs, peers and their sessions, evaluations, samples, shards, leases and receipts.

Every write is one transaction with ``synchronous=FULL``: once a method
returns, the record survives a crash. Methods take and return plain rows
(dicts); the domain packages give them meaning.
"""

from __future__ import annotations

import time
from typing import Any

from crowdtrain.coordinator.store.base import StoreBase, StoreError

# A peer heard from this recently counts towards the swarm's tokens/s (runs.PEER_TIMEOUT_S).
_LIVE_S = 20.0


def _swarm_tokens_at(
    evaluation: dict[str, Any], update: dict[str, Any], swarm_now: int, swarm_rate: float
) -> int:
    """What the whole swarm had trained when a node measured ``evaluation`` (the x of a
    loss curve; its ``num_tokens`` is the node's own count).

    Evaluations wait for the next heartbeat, a few seconds; the tokens the node
    trained since are scaled by the swarm's speed over this node's and taken
    off the swarm's total now.
    """
    since = max(0, int(update["num_tokens"]) - int(evaluation["num_tokens"]))
    own_rate = float(update["tokens_per_s"] or 0.0)
    scale = max(1.0, float(swarm_rate) / own_rate) if own_rate > 0 else 1.0
    return max(0, int(swarm_now - since * scale))


class RunRecords(StoreBase):
    """Runs, peers, sessions, evaluations, samples, shards, leases and receipts."""

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
        """Raise the run's step to ``step`` (never lower it); a write (and its fsync) only
        when it rises."""
        row = self._one("SELECT step FROM runs WHERE id = ?", (run_id,))
        if row is None or int(row["step"]) >= step:
            return
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

    def live_peers(self, run_id: str, since: float) -> list[dict[str, Any]]:
        """The run's peers heard from since ``since`` that have not left (an index range:
        the cost follows the live peers, not every identity that ever registered)."""
        return self._all(
            "SELECT * FROM peers WHERE run_id = ? AND last_seen >= ? AND state != 'left'",
            (run_id, since),
        )

    def roster_rows(self, run_id: str, since: float) -> list[dict[str, Any]]:
        """Peers with a swarm id that are live or banned: whom a roster names."""
        return self._all(
            # INDEXED BY: the planner would otherwise range over every peer with a swarm id.
            "SELECT peer_id, dht_peer_id, flagged, state, last_seen FROM peers INDEXED BY"
            " peers_by_last_seen WHERE run_id = ? AND last_seen >= ? AND dht_peer_id != ''"
            # CROSS JOIN: from the (few) bans to their peers, never the other way round.
            " UNION ALL SELECT p.peer_id, p.dht_peer_id, p.flagged, p.state, p.last_seen"
            " FROM bans b"
            " CROSS JOIN peers p ON p.run_id = b.run_id AND p.peer_id = b.peer_id"
            " WHERE b.run_id = ? AND p.dht_peer_id != '' AND p.last_seen < ?",
            (run_id, since, run_id, since),
        )

    def record_heartbeat(
        self,
        update: dict[str, Any],
        evaluations: list[dict[str, Any]],
        traffic: list[dict[str, Any]] | None = None,
        time_split: dict[str, Any] | None = None,
    ) -> None:
        """Apply one heartbeat. Counters (tokens, sequences, ``traffic``'s bytes per
        purpose and ``time_split``'s seconds of the training loop) are cumulative per node
        process (``session_key``) and only ever rise, so a heartbeat applied twice, or two
        processes sharing one identity, count once each."""
        with self.transaction() as db:
            if time_split is not None:
                db.execute(
                    "INSERT INTO peer_time (run_id, peer_id, session_key, training_s,"
                    " computing_s, swarm_wait_s, data_wait_s) VALUES (:run_id, :peer_id,"
                    " :session_key, :training_s, :computing_s, :swarm_wait_s, :data_wait_s)"
                    " ON CONFLICT (run_id, peer_id, session_key) DO UPDATE SET"
                    " training_s = MAX(training_s, :training_s),"
                    " computing_s = MAX(computing_s, :computing_s),"
                    " swarm_wait_s = MAX(swarm_wait_s, :swarm_wait_s),"
                    " data_wait_s = MAX(data_wait_s, :data_wait_s)",
                    time_split,
                )
            if traffic:
                db.executemany(
                    "INSERT INTO peer_traffic (run_id, peer_id, session_key, purpose, sent,"
                    " received) VALUES (:run_id, :peer_id, :session_key, :purpose, :sent,"
                    " :received) ON CONFLICT (run_id, peer_id, session_key, purpose) DO UPDATE"
                    " SET sent = MAX(sent, :sent), received = MAX(received, :received)",
                    traffic,
                )
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
            if evaluations:
                swarm_now = db.execute(
                    "SELECT CAST(TOTAL(num_tokens) AS INTEGER) FROM peer_counters WHERE run_id = ?",
                    (update["run_id"],),
                ).fetchone()[0]
                swarm_rate = db.execute(
                    "SELECT TOTAL(tokens_per_s) FROM peers WHERE run_id = ?"
                    " AND state = 'active' AND last_seen >= ?",
                    (update["run_id"], update["now"] - _LIVE_S),
                ).fetchone()[0]
                evaluations = [
                    {**e, "swarm_tokens": _swarm_tokens_at(e, update, swarm_now, swarm_rate)}
                    for e in evaluations
                ]
            db.executemany(
                "INSERT INTO evals (run_id, step, num_tokens, val_loss, bits_per_byte,"
                " peer_id, time, swarm_tokens) VALUES (:run_id, :step, :num_tokens, :val_loss,"
                " :bits_per_byte, :peer_id, :time, :swarm_tokens)",
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

    def peer_by_progress_key(self, run_id: str, progress_key: str) -> dict[str, Any] | None:
        return self._one(
            "SELECT * FROM peers WHERE run_id = ? AND progress_key = ?", (run_id, progress_key)
        )

    def live_peer_steps(self, run_id: str, since: float) -> list[dict[str, Any]]:
        """Steps of the run's live, unflagged peers, each with whether it has a verified
        receipt (``credited``)."""
        return self._all(
            "SELECT p.step, EXISTS (SELECT 1 FROM receipt_checks r WHERE r.run_id = p.run_id"
            " AND r.peer_id = p.peer_id AND r.status = 'verified') AS credited FROM peers p"
            " WHERE p.run_id = ? AND p.state = 'active' AND p.last_seen >= ?"
            " AND p.flagged IS NULL",
            (run_id, since),
        )

    def flag_peer(self, run_id: str, peer_id: str, reason: str) -> None:
        """Mark a peer as suspect (shown on the API and dashboard); the first reason stays."""
        with self.transaction() as db:
            db.execute(
                "UPDATE peers SET flagged = COALESCE(flagged, ?) WHERE run_id = ? AND peer_id = ?",
                (reason[:500], run_id, peer_id),
            )

    def peer_totals(self, run_id: str) -> dict[str, dict[str, int]]:
        """Tokens and sequences per peer, summed over its node processes."""
        rows = self._all(
            "SELECT peer_id, CAST(TOTAL(num_tokens) AS INTEGER) AS num_tokens,"
            " CAST(TOTAL(num_sequences) AS INTEGER) AS num_sequences"
            " FROM peer_counters WHERE run_id = ? GROUP BY peer_id",
            (run_id,),
        )
        return {r["peer_id"]: r for r in rows}

    def peer_traffic(self, run_id: str) -> dict[str, dict[str, dict[str, int]]]:
        """Bytes per peer and purpose, summed over its node processes:
        ``{peer_id: {purpose: {"sent": n, "received": n}}}``."""
        rows = self._all(
            "SELECT peer_id, purpose, CAST(TOTAL(sent) AS INTEGER) AS sent,"
            " CAST(TOTAL(received) AS INTEGER) AS received"
            " FROM peer_traffic WHERE run_id = ? GROUP BY peer_id, purpose",
            (run_id,),
        )
        found: dict[str, dict[str, dict[str, int]]] = {}
        for r in rows:
            found.setdefault(r["peer_id"], {})[r["purpose"]] = {
                "sent": int(r["sent"]),
                "received": int(r["received"]),
            }
        return found

    def peer_time(self, run_id: str) -> dict[str, dict[str, float]]:
        """Seconds of the training loop per peer, summed over its node processes:
        ``{peer_id: {"training_s": s, "computing_s": s, "swarm_wait_s": s,
        "data_wait_s": s}}``."""
        rows = self._all(
            "SELECT peer_id, TOTAL(training_s) AS training_s, TOTAL(computing_s) AS computing_s,"
            " TOTAL(swarm_wait_s) AS swarm_wait_s, TOTAL(data_wait_s) AS data_wait_s"
            " FROM peer_time WHERE run_id = ? GROUP BY peer_id",
            (run_id,),
        )
        return {r.pop("peer_id"): r for r in rows}

    def run_totals(self, run_id: str) -> dict[str, Any]:
        row = self._one(
            "SELECT CAST(TOTAL(num_tokens) AS INTEGER) AS num_tokens,"
            " CAST(TOTAL(num_sequences) AS INTEGER) AS num_sequences"
            " FROM peer_counters WHERE run_id = ?",
            (run_id,),
        )
        assert row is not None
        return row

    def eval_ends(self, run_id: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """A run's first and latest evaluation (by step, then time)."""
        columns = "step, val_loss, bits_per_byte"
        first = self._one(
            f"SELECT {columns} FROM evals WHERE run_id = ? ORDER BY step, time LIMIT 1",
            (run_id,),
        )
        latest = self._one(
            f"SELECT {columns} FROM evals WHERE run_id = ? ORDER BY step DESC, time DESC LIMIT 1",
            (run_id,),
        )
        return first, latest

    def thin_evals(self, run_id: str, keep: int, max_rows: int = 20_000) -> int:
        """Past ``keep`` evaluations of a run, delete every second one of the oldest half
        (the curve keeps its shape; its recent end stays whole), at most ``max_rows`` of
        the oldest at a time so the store's lock is never held long. Returns how many."""
        row = self._one("SELECT COUNT(*) AS n FROM evals WHERE run_id = ?", (run_id,))
        if row is None or row["n"] <= keep:
            return 0
        with self.transaction() as db:
            return db.execute(
                "DELETE FROM evals WHERE rowid IN (SELECT rowid FROM (SELECT rowid,"
                " ROW_NUMBER() OVER (ORDER BY step, time, rowid) AS n FROM (SELECT rowid, step,"
                " time FROM evals WHERE run_id = ? ORDER BY step, time, rowid LIMIT ?))"
                " WHERE n % 2 = 0)",
                (run_id, min(int(row["n"]) // 2, 2 * max_rows)),
            ).rowcount

    def list_evals(self, run_id: str) -> list[dict[str, Any]]:
        return self._all(
            "SELECT step, num_tokens, swarm_tokens, val_loss, bits_per_byte, peer_id, time"
            " FROM evals"
            " WHERE run_id = ? ORDER BY step, time",
            (run_id,),
        )

    def insert_sample(self, sample: dict[str, Any]) -> None:
        """One point of a run's time series (what the dashboard plots over time)."""
        with self.transaction() as db:
            db.execute(
                "INSERT INTO run_samples (run_id, time, step, num_tokens, tokens_per_s, num_peers)"
                " VALUES (:run_id, :time, :step, :num_tokens, :tokens_per_s, :num_peers)",
                sample,
            )

    def list_samples(
        self, run_id: str, since: float = 0.0, limit: int = 10_000
    ) -> list[dict[str, Any]]:
        """A run's samples after ``since`` (unix time), oldest first, the newest ``limit``."""
        rows = self._all(
            "SELECT time, step, num_tokens, tokens_per_s, num_peers FROM run_samples"
            " WHERE run_id = ? AND time > ? ORDER BY time DESC LIMIT ?",
            (run_id, since, limit),
        )
        return rows[::-1]

    def step_at(self, run_id: str, when: float) -> int | None:
        """The run's step in its newest sample at or before ``when``; None without one."""
        row = self._one(
            "SELECT step FROM run_samples WHERE run_id = ? AND time <= ? ORDER BY time DESC"
            " LIMIT 1",
            (run_id, when),
        )
        return int(row["step"]) if row else None

    def count_samples(self, run_id: str) -> int:
        row = self._one("SELECT COUNT(*) AS n FROM run_samples WHERE run_id = ?", (run_id,))
        return int(row["n"]) if row else 0

    def thin_samples(self, run_id: str, num_oldest: int) -> int:
        """Delete every second sample among a run's ``num_oldest`` oldest; returns how many."""
        with self.transaction() as db:
            return db.execute(
                "DELETE FROM run_samples WHERE rowid IN (SELECT rowid FROM (SELECT rowid,"
                " ROW_NUMBER() OVER (ORDER BY time, rowid) AS n FROM run_samples"
                " WHERE run_id = ?) WHERE n <= ? AND n % 2 = 0)",
                (run_id, num_oldest),
            ).rowcount

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

    def pending_shards(
        self, run_id: str, epoch: int, limit: int, peer_id: str | None = None
    ) -> list[str]:
        """Pending shards in their order; for ``peer_id``, those whose receipt of it was
        not credited (a failed spot check reopens a shard) last: someone else trains
        them, unless nobody else is there."""
        failed = {
            r["shard_id"]
            for r in self._all(
                "SELECT shard_id FROM receipt_checks WHERE run_id = ? AND peer_id = ?"
                " AND epoch = ? AND status IN ('rejected', 'unverified')",
                (run_id, peer_id or "", epoch),
            )
        }
        rows = self._all(
            "SELECT shard_id FROM shards WHERE run_id = ? AND epoch = ? AND state = 'pending'"
            " ORDER BY position LIMIT ?",
            (run_id, epoch, limit + len(failed)),
        )
        found = [r["shard_id"] for r in rows]
        return sorted(found, key=lambda shard_id: shard_id in failed)[:limit]

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

    def complete_shard(
        self,
        receipt: dict[str, Any],
        check: dict[str, Any] | None = None,
        trained: bool = True,
        flag: str | None = None,
    ) -> None:
        """Store a receipt with ``check`` (its receipt check) and close its lease; mark its
        shard done if ``trained`` (else it goes back to pending); ``flag`` flags its peer.
        One transaction: a receipt is never stored without its check."""
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
            if check is not None:
                self._insert_receipt_check(db, check)
            if trained:
                # Another peer may hold it now (this peer's lease had expired): the shard
                # is done all the same, and that peer's receipt, if it comes, is a second
                # completion.
                db.execute(
                    "UPDATE shards SET num_completions = num_completions + 1, state = 'done',"
                    " holder = NULL WHERE run_id = :run_id AND epoch = :epoch"
                    " AND shard_id = :shard_id",
                    receipt,
                )
            else:
                # Not trained as far as anyone can tell: another peer trains it.
                db.execute(
                    "UPDATE shards SET state = 'pending', holder = NULL WHERE run_id = :run_id"
                    " AND epoch = :epoch AND shard_id = :shard_id AND state = 'leased'"
                    " AND holder = :peer_id",
                    receipt,
                )
            if flag is not None:
                db.execute(
                    "UPDATE peers SET flagged = COALESCE(flagged, ?) WHERE run_id = ?"
                    " AND peer_id = ?",
                    (flag[:500], receipt["run_id"], receipt["peer_id"]),
                )

    def reopen_unproven_shard(self, run_id: str, epoch: int, shard_id: str) -> bool:
        """A done shard none of whose receipts may still show it trained (verified, pending,
        or unverified for want of DHT evidence, which may be the coordinator's blind spot)
        goes back to pending: its receipt failed a later check. Returns whether it did."""
        with self.transaction() as db:
            return (
                db.execute(
                    "UPDATE shards SET state = 'pending', holder = NULL WHERE run_id = ?"
                    " AND epoch = ? AND shard_id = ? AND state = 'done' AND NOT EXISTS"
                    " (SELECT 1 FROM receipt_checks c WHERE c.run_id = shards.run_id"
                    " AND c.epoch = shards.epoch AND c.shard_id = shards.shard_id"
                    " AND c.status != 'rejected' AND c.spot != 'uncheckable')",
                    (run_id, epoch, shard_id),
                ).rowcount
                == 1
            )

    def list_receipts(self, run_id: str) -> list[dict[str, Any]]:
        return self._all("SELECT * FROM receipts WHERE run_id = ? ORDER BY received_at", (run_id,))
