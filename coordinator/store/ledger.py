"""Records of the contribution ledger: receipt checks, spot checks and checkpoints."""

from __future__ import annotations

from typing import Any

from crowdtrain.coordinator.store.base import StoreBase


class LedgerRecords(StoreBase):
    def insert_receipt_check(self, check: dict[str, Any]) -> None:
        """Record how a stored receipt was checked (one row per receipt)."""
        with self.transaction() as db:
            self._insert_receipt_check(db, check)

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

    def failed_spot_checks(self, run_id: str, peer_id: str) -> int:
        """How many of a peer's receipts in a run were rejected by their spot check."""
        row = self._one(
            "SELECT COUNT(*) AS n FROM receipt_checks WHERE run_id = ? AND peer_id = ?"
            " AND spot = 'failed' AND status = 'rejected'",
            (run_id, peer_id),
        )
        return int(row["n"]) if row else 0

    def spot_checks_passed_since_failure(self, run_id: str, peer_id: str) -> int:
        """How many of a peer's spot checks passed since its last failed one (all, when
        none failed)."""
        row = self._one(
            "SELECT COUNT(*) AS n FROM receipt_checks WHERE run_id = ? AND peer_id = ?"
            " AND spot = 'passed' AND spot_at > COALESCE((SELECT MAX(spot_at) FROM"
            " receipt_checks WHERE run_id = ? AND peer_id = ? AND spot = 'failed'), 0)",
            (run_id, peer_id, run_id, peer_id),
        )
        return int(row["n"]) if row else 0

    def ledger_totals(self, run_id: str) -> dict[str, dict[str, Any]]:
        """Per peer: what its receipts claim, and the part that passed every check."""
        rows = self._all(
            "SELECT peer_id, COUNT(*) AS num_receipts,"
            " CAST(TOTAL(num_tokens) AS INTEGER) AS num_tokens,"
            " CAST(TOTAL(num_sequences) AS INTEGER) AS num_sequences,"
            " TOTAL(flops) AS flops, TOTAL(device_s) AS device_s,"
            " SUM(status = 'verified') AS verified_shards,"
            " CAST(TOTAL(CASE WHEN status = 'verified' THEN num_tokens ELSE 0 END) AS INTEGER)"
            " AS verified_tokens,"
            " CAST(TOTAL(CASE WHEN status = 'verified' THEN num_sequences ELSE 0 END) AS INTEGER)"
            " AS verified_sequences,"
            " TOTAL(CASE WHEN status = 'verified' THEN flops ELSE 0 END) AS verified_flops,"
            " SUM(status = 'rejected') AS num_rejected,"
            " SUM(status = 'pending') AS num_pending,"
            " SUM(status = 'unverified') AS num_unverified"
            " FROM receipt_checks WHERE run_id = ? GROUP BY peer_id",
            (run_id,),
        )
        return {r["peer_id"]: r for r in rows}

    def verified_work(self, run_id: str, peer_id: str | None = None) -> dict[str, float]:
        """Verified tokens and FLOPs of one peer, or (``peer_id`` None) of every peer of
        the run that is not banned."""
        if peer_id is not None:
            row = self._one(
                "SELECT TOTAL(num_tokens) AS tokens, TOTAL(flops) AS flops FROM receipt_checks"
                " WHERE run_id = ? AND peer_id = ? AND status = 'verified'",
                (run_id, peer_id),
            )
        else:
            row = self._one(
                "SELECT TOTAL(num_tokens) AS tokens, TOTAL(flops) AS flops FROM receipt_checks"
                " WHERE run_id = ? AND status = 'verified' AND peer_id NOT IN"
                " (SELECT peer_id FROM bans WHERE run_id = ?)",
                (run_id, run_id),
            )
        assert row is not None
        return {"tokens": float(row["tokens"]), "flops": float(row["flops"])}

    def verified_sequences_since(self, run_id: str, since: float) -> dict[str, int]:
        """Each peer's sequences in verified receipts received at or after ``since`` (the
        coordinator's clock, not the claimed times)."""
        rows = self._all(
            "SELECT peer_id, CAST(TOTAL(num_sequences) AS INTEGER) AS n FROM receipt_checks"
            " WHERE run_id = ? AND status = 'verified' AND received_at >= ? GROUP BY peer_id",
            (run_id, since),
        )
        return {r["peer_id"]: int(r["n"]) for r in rows}

    def verified_tokens(self, run_id: str, peer_id: str) -> int:
        row = self._one(
            "SELECT CAST(TOTAL(num_tokens) AS INTEGER) AS n FROM receipt_checks WHERE run_id = ?"
            " AND peer_id = ? AND status = 'verified'",
            (run_id, peer_id),
        )
        return int(row["n"]) if row else 0

    def verification_costs(self, run_id: str) -> dict[str, Any]:
        """CPU seconds the coordinator spent checking a run's receipts and keeping checkpoints."""
        row = self._one(
            "SELECT COUNT(*) AS num_receipts, CAST(TOTAL(num_tokens) AS INTEGER) AS num_tokens,"
            " COALESCE(SUM(status = 'verified'), 0)"
            " AS num_verified, TOTAL(assess_cpu_s) AS assess_cpu_s,"
            " TOTAL(spot_cpu_s) AS spot_cpu_s,"
            " COALESCE(SUM(spot IN ('passed', 'failed')), 0) AS num_spot_checks,"
            " TOTAL(device_s) AS device_s"
            " FROM receipt_checks WHERE run_id = ?",
            (run_id,),
        )
        keeper = self._one(
            "SELECT COUNT(*) AS num_checkpoints, TOTAL(cpu_s) AS keeper_cpu_s"
            " FROM checkpoints WHERE run_id = ?",
            (run_id,),
        )
        assert row is not None and keeper is not None
        return {**row, **keeper}

    def insert_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO checkpoints (run_id, step, sha256, file, file_sha256,"
                " num_bytes, spec_hash, created_at, cpu_s, num_tokens) VALUES (:run_id, :step,"
                " :sha256, :file, :file_sha256, :num_bytes, :spec_hash, :created_at, :cpu_s,"
                " :num_tokens)",
                {"num_tokens": 0, **checkpoint},
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
