"""The contribution ledger: each receipt checked three ways, and what each peer is credited.

When a receipt arrives (:meth:`Ledger.assess`) it is checked for being
**possible** and for **agreeing with the DHT** (:mod:`checks`). A ``[verify]
spot_check_fraction`` of receipts is then queued for a **spot check** by the
verifier process (:mod:`verifier`). Only receipts that pass are credited; a
receipt that fails flags its peer. Banned peers are credited nothing.
Storage is in :mod:`crowdtrain.coordinator.store`; what the API shows of the
ledger, in :mod:`views`. No HTTP, gRPC or hivemind here.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from crowdtrain.coordinator.ledger.checks import (
    DHT_WINDOW_SLACK_S,
    OK,
    Check,
    DhtClaim,
    check_dht,
    check_possible,
    flops_per_token,
    possible_sequences,
    receipt_times,
)
from crowdtrain.coordinator.store import Store
from crowdtrain.protocol.messages import ReceiptPayload

if TYPE_CHECKING:
    from crowdtrain.coordinator.records import PublishedRun, Session
    from crowdtrain.coordinator.swarm.dht import ProgressHistory


logger = logging.getLogger(__name__)


# Receipt statuses. Only VERIFIED is credited.
VERIFIED = "verified"


REJECTED = "rejected"  # failed a check; the peer is flagged


PENDING = "pending"  # waiting for the DHT's evidence or its spot check


UNVERIFIED = "unverified"  # no DHT evidence either way: not credited, not flagged


# A receipt's spot-check state when it gives nothing to check (no losses to recompute):
# its shard is trained again by someone, as after a rejection. (A receipt without DHT
# evidence is not: the coordinator's own view of the DHT may have been at fault, after
# a restart say.)
UNCHECKABLE = "uncheckable"


def untrained(check: dict[str, Any]) -> bool:
    """Whether a receipt check leaves its shard to be trained again."""
    return check["status"] == REJECTED or check["spot"] == UNCHECKABLE


@dataclass(frozen=True)
class Judgement:
    """A receipt's check as it is stored with the receipt: the row, whether its shard
    counts as trained, and the flag its peer gets (None: none)."""

    check: dict[str, Any]
    trained: bool
    flag: str | None


class Ledger:
    """Checks receipts as they arrive and queues spot checks. One per coordinator process.

    ``history`` is the coordinator's record of what peers published to the DHT
    (None: every receipt is unverified); ``rng`` picks spot checks. A receipt
    whose DHT evidence is not all in yet waits ("pending", DHT check "waiting")
    until :meth:`recheck_waiting`, called after each read of the DHT, decides it.
    """

    def __init__(
        self, store: Store, history: ProgressHistory | None, rng: random.Random | None = None
    ):
        self.store = store
        self.history = history
        self.rng = rng or random.Random()

    def assess(
        self,
        run: PublishedRun,
        session: Session,
        receipt: ReceiptPayload,
        sent_at: float,
        received_at: float | None = None,
    ) -> str:
        """Check a receipt whose lease is already completed and store the outcome; returns
        its status. (ReportShard instead judges while completing the lease, in one
        transaction: :meth:`judge`.)"""
        lease = self.store.get_lease(run.id, receipt.epoch, receipt.shard_id, session.peer_id)
        row = self.judge(run, session, receipt, sent_at, lease, received_at).check
        self.store.insert_receipt_check(row)
        if row["status"] == REJECTED:
            flag_for_receipt(self.store, run.id, row["peer_id"], row["shard_id"], row["reason"])
        self.announce(row)
        return str(row["status"])

    def judge(
        self,
        run: PublishedRun,
        session: Session,
        receipt: ReceiptPayload,
        sent_at: float,
        lease: dict[str, Any] | None,
        received_at: float | None = None,
    ) -> Judgement:
        """The receipt check of a receipt for ``lease`` (its stored row), to be stored with
        the receipt. ``sent_at`` is the timestamp of the receipt's signed envelope (the
        node's clock). Reads the store, writes nothing."""
        cpu_started = time.thread_time()
        received_at = time.time() if received_at is None else received_at
        peer = self.store.get_peer(run.id, session.peer_id) or {}
        granted_at = lease["granted_at"] if lease is not None else received_at
        times = receipt_times(receipt, sent_at, granted_at, received_at)
        device = str(peer.get("device") or "")

        possible = check_possible(run, receipt, times, device)
        dht = Check("not checked")
        if not possible.failed:
            final = received_at >= times.finished + DHT_WINDOW_SLACK_S
            dht = check_dht(DhtClaim.of(receipt, times), self.history, run.id, peer, final)
        verdict = self._verdict(run, session.peer_id, possible, dht, receipt)
        capacity = possible_sequences(run, receipt)
        num_sequences = min(receipt.num_sequences, capacity)  # what is stored is possible
        row = {
            "run_id": run.id,
            "peer_id": session.peer_id,
            "shard_id": receipt.shard_id,
            "epoch": receipt.epoch,
            "num_sequences": num_sequences,
            "num_tokens": num_sequences * run.spec.model.seq_len,
            "flops": num_sequences * run.spec.model.seq_len * flops_per_token(run.spec),
            "device": device,
            "device_s": max(0.0, receipt.finished - receipt.started),
            "started": times.credited_start,
            "finished": times.finished,
            "received_at": received_at,
            "possible": possible.state,
            "dht": dht.state,
            "micro_batch_size": receipt.micro_batch_size,
            "samples_json": json.dumps([s.model_dump() for s in receipt.samples]),
            **verdict,
        }
        row["assess_cpu_s"] = time.thread_time() - cpu_started
        flag = flag_text(row["shard_id"], row["reason"]) if row["status"] == REJECTED else None
        return Judgement(row, trained=not untrained(row), flag=flag)

    def recheck_waiting(self, run: PublishedRun, now: float | None = None) -> int:
        """Decide the receipts of a run still waiting for DHT evidence; returns how many."""
        now = time.time() if now is None else now
        decided = 0
        for row in self.store.receipts_waiting_for_dht(run.id):
            cpu_started = time.thread_time()
            steps = tuple(int(s["step"]) for s in json.loads(row["samples_json"]))
            claim = DhtClaim(row["num_sequences"], steps, row["started"], row["finished"])
            peer = self.store.get_peer(run.id, row["peer_id"]) or {}
            final = now >= row["finished"] + DHT_WINDOW_SLACK_S
            dht = check_dht(claim, self.history, run.id, peer, final)
            if dht.state == "waiting":
                continue
            samples = json.loads(row["samples_json"])
            verdict = self._verdict(run, row["peer_id"], OK, dht, samples=samples)
            update = {**row, "dht": dht.state, **verdict}
            update["assess_cpu_s"] = row["assess_cpu_s"] + time.thread_time() - cpu_started
            self.store.insert_receipt_check(update)
            if update["status"] == REJECTED:
                flag_for_receipt(
                    self.store, run.id, update["peer_id"], update["shard_id"], update["reason"]
                )
            if untrained(update):
                self.store.reopen_unproven_shard(run.id, update["epoch"], update["shard_id"])
            self.announce(update)
            decided += 1
        return decided

    def _verdict(
        self,
        run: PublishedRun,
        peer_id: str,
        possible: Check,
        dht: Check,
        receipt: ReceiptPayload | None = None,
        samples: list[dict[str, Any]] | None = None,
    ) -> dict[str, str]:
        """Status, reason and spot-check state from the first two checks and the receipt's
        samples (``receipt``'s, or ``samples`` as stored)."""
        if receipt is not None:
            samples = [s.model_dump() for s in receipt.samples]
            trained = receipt.num_sequences > 0
        else:
            trained = True
        spot, spot_reason = "not selected", ""
        if possible.failed or dht.failed:
            status, reason = REJECTED, possible.reason or dht.reason
        elif trained and not any(s["losses"] for s in samples or []):
            # Nothing a verifier could recompute: never credited, whatever else it says.
            status, reason = UNVERIFIED, "its samples carry no losses a verifier could check"
            spot, spot_reason = UNCHECKABLE, reason
        elif dht.state == "waiting":
            status, reason = PENDING, dht.reason
        elif dht.state == "no evidence":
            status, reason = UNVERIFIED, dht.reason
        elif self.rng.random() < self.spot_check_fraction(run, peer_id):
            status, reason, spot = PENDING, "waiting for its spot check", "queued"
            if run.spec.model.dropout > 0:
                # Losses trained with dropout cannot be recomputed.
                status, reason, spot = VERIFIED, "", "skipped"
                spot_reason = "the model trains with dropout"
        else:
            status, reason = VERIFIED, ""
        return {"status": status, "reason": reason, "spot": spot, "spot_reason": spot_reason}

    def spot_check_fraction(self, run: PublishedRun, peer_id: str) -> float:
        """The share of this peer's receipts to spot-check: all of them while it is on
        probation (fewer than ``probation_checks`` passed since its last failed one),
        else the run's fraction."""
        verify = run.spec.verify
        if verify.spot_check_fraction <= 0:
            return 0.0
        passed = self.store.spot_checks_passed_since_failure(run.id, peer_id)
        return 1.0 if passed < verify.probation_checks else verify.spot_check_fraction

    def announce(self, row: dict[str, Any]) -> None:
        """Log a receipt check's outcome (a rejected one flagged its peer, with it)."""
        logger.log(
            logging.WARNING if row["status"] == REJECTED else logging.INFO,
            "receipt of %s for shard %s: %s%s",
            row["peer_id"],
            row["shard_id"],
            row["status"],
            f" ({row['reason']})" if row["reason"] else "",
        )


def flag_for_receipt(store: Store, run_id: str, peer_id: str, shard_id: str, reason: str) -> None:
    logger.warning(
        "flagging peer %s of run %s: receipt for %s %s", peer_id, run_id, shard_id, reason
    )
    store.flag_peer(run_id, peer_id, flag_text(shard_id, reason))


def flag_text(shard_id: str, reason: str) -> str:
    """Why a peer is flagged for one of its receipts."""
    return f"receipt for shard {shard_id} {reason}"
