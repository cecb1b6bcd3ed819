"""Records of trust: spent nonces, invite codes, bans, peers' reports and flags."""

from __future__ import annotations

import time
from typing import Any

from crowdtrain.coordinator.store.base import StoreBase

# Longer than any signed message may be old (protocol.identity.DEFAULT_MAX_AGE_S).
_NONCE_KEEP_S = 600.0


class TrustRecords(StoreBase):
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

    def unflag(self, run_id: str, peer_id: str) -> bool:
        """Clear a peer's flag and the reports about it (they start again from none)."""
        with self.transaction() as db:
            cleared = db.execute(
                "UPDATE peers SET flagged = NULL WHERE run_id = ? AND peer_id = ?"
                " AND flagged IS NOT NULL",
                (run_id, peer_id),
            ).rowcount
            db.execute(
                "DELETE FROM peer_reports WHERE run_id = ? AND dht_peer_id IN"
                " (SELECT dht_peer_id FROM peers WHERE run_id = ? AND peer_id = ?)",
                (run_id, run_id, peer_id),
            )
        return cleared == 1

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
                " SET count = MIN(count + :count, 1000000000), last_at = :now",
                reports,
            )

    def reports_about(self, run_id: str, dht_peer_id: str) -> list[dict[str, Any]]:
        return self._all(
            "SELECT * FROM peer_reports WHERE run_id = ? AND dht_peer_id = ?",
            (run_id, dht_peer_id),
        )
