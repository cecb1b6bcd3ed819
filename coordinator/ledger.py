"""The contribution ledger: each receipt checked three ways, and what each peer is credited.

A receipt is a node's signed claim that it trained a shard. When it arrives
(:meth:`Ledger.assess`) it is checked for being **possible** (no more
sequences than the shard holds, a compute rate over its time under lease
that the reported device can reach) and for **agreeing with the DHT** (the rate
and swarm steps the peer published to its hivemind progress record while it
trained). A ``[verify] spot_check_fraction`` of receipts is then queued for a
**spot check** by the verifier process (:mod:`crowdtrain.coordinator.verifier`).
Only receipts that pass are credited; a receipt that fails flags its peer.
Banned peers are credited nothing. Storage is in :mod:`store`; no HTTP,
gRPC or hivemind here.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crowdtrain.coordinator.store import Store
from crowdtrain.protocol.devices import device_peak
from crowdtrain.protocol.messages import ReceiptPayload
from crowdtrain.protocol.runspec import RunSpec, VerifySection
from crowdtrain.protocol.shards import num_windows

if TYPE_CHECKING:
    from crowdtrain.coordinator.peers import Session
    from crowdtrain.coordinator.runs import PublishedRun
    from crowdtrain.coordinator.swarm import ProgressHistory

logger = logging.getLogger(__name__)

# Where the verifier's keeper saves checkpoints, inside the coordinator's data folder.
CHECKPOINTS_DIR = "checkpoints"

# Receipt statuses. Only VERIFIED is credited.
VERIFIED = "verified"
REJECTED = "rejected"  # failed a check; the peer is flagged
PENDING = "pending"  # waiting for the DHT's evidence or its spot check
UNVERIFIED = "unverified"  # no DHT evidence either way: not credited, not flagged

# How far a receipt's times may lie outside its lease once the node's clock offset
# (measured from the receipt's own envelope) is taken out: network delay and jitter.
CLOCK_SLACK_S = 5.0
# A receipt may claim at most this many times the rate its DHT records showed...
DHT_RATE_TOLERANCE = 2.0
# ...over its span plus this much: records are read every few seconds, so a short
# shard can end before its peer's rate estimate has caught up.
DHT_SHORT_SPAN_SLACK_S = 10.0
# Records seen this long before a shard started or after it ended still count.
DHT_WINDOW_SLACK_S = 10.0
# A record read this long before a shard's start was surely published before it.
DHT_READ_LAG_S = 2.0
# A sample's swarm step may lie this many steps before the first step its peer
# published while training the shard, or after the swarm's step when it was checked.
DHT_STEP_SLACK = 2


@dataclass(frozen=True)
class Check:
    """The outcome of one check: ``state`` is ok or failed; the DHT check may also be
    waiting (more records may come) or no evidence, and is not checked after (a) fails."""

    state: str
    reason: str = ""

    @property
    def failed(self) -> bool:
        return self.state == "failed"


OK = Check("ok")


@functools.lru_cache(maxsize=64)
def flops_per_token(spec: RunSpec) -> float:
    """Training FLOPs per token (forward and backward) of the run's model."""
    # crowdtrain.model imports torch: only the serving coordinator pays for that.
    from crowdtrain.model.gpt import GPTConfig, estimate_flops_per_token

    return estimate_flops_per_token(GPTConfig(**dataclasses.asdict(spec.model)))


@dataclass(frozen=True)
class ReceiptTimes:
    """A receipt's span on the coordinator's clock, and the window its lease allows."""

    started: float
    finished: float
    granted_at: float
    received_at: float

    @property
    def duration_s(self) -> float:
        return self.finished - self.started

    @property
    def credited_start(self) -> float:
        """The start the rate checks use: no earlier than the lease's grant.

        A node that resumes a shard after its lease was granted again may say it
        started earlier; a cheater may say so to spread its claim thin. Either
        way only time under the lease counts.
        """
        return max(self.started, self.granted_at - CLOCK_SLACK_S)

    @property
    def credited_s(self) -> float:
        return self.finished - self.credited_start


def receipt_times(
    receipt: ReceiptPayload, sent_at: float, granted_at: float, received_at: float
) -> ReceiptTimes:
    """Move a receipt's node-clock times onto the coordinator's clock.

    ``sent_at`` is the node's timestamp on the receipt's envelope and
    ``received_at`` the coordinator's time of arrival; their difference is
    the node's clock offset (plus a network delay that only makes it stricter).
    """
    offset = sent_at - received_at
    return ReceiptTimes(
        started=receipt.started - offset,
        finished=receipt.finished - offset,
        granted_at=granted_at,
        received_at=received_at,
    )


def check_possible(
    run: PublishedRun, receipt: ReceiptPayload, times: ReceiptTimes, device: str
) -> Check:
    """(a) Could this receipt be true? Shard capacity, lease window and device peak."""
    spec = run.spec
    seq_len = spec.model.seq_len
    entry = next((s for s in run.manifest.train_shards if s.id == receipt.shard_id), None)
    if entry is None:
        return Check("failed", f"shard {receipt.shard_id!r} is not a train shard of this run")
    mb = receipt.micro_batch_size
    num_batches = num_windows(entry.num_tokens, seq_len) // mb
    capacity = num_batches * mb
    if receipt.num_sequences > capacity:
        return Check(
            "failed",
            f"claims {receipt.num_sequences} sequences but shard {entry.id} holds at most "
            f"{capacity} in micro-batches of {mb}",
        )
    if receipt.num_tokens != receipt.num_sequences * seq_len:
        return Check(
            "failed",
            f"claims {receipt.num_tokens} tokens for {receipt.num_sequences} sequences of "
            f"{seq_len} tokens",
        )
    for sample in receipt.samples:
        if sample.batch >= num_batches or len(sample.losses) > mb:
            return Check(
                "failed",
                f"a sample names batch {sample.batch} with {len(sample.losses)} losses; the "
                f"shard has {num_batches} batches of {mb}",
            )
    if times.finished > times.received_at + CLOCK_SLACK_S:
        return Check("failed", "claims to have finished after the receipt arrived")
    if times.finished < times.granted_at - CLOCK_SLACK_S:
        return Check("failed", "claims to have finished before its lease was granted")
    if receipt.num_tokens == 0:
        return OK
    duration = min(times.duration_s, times.credited_s)
    if duration <= 0:
        return Check("failed", f"claims {receipt.num_tokens} tokens in no time")
    rate = receipt.num_tokens * flops_per_token(spec) / duration
    peak = device_peak(device)
    if rate > peak.max_flops:
        return Check(
            "failed",
            f"implies {rate:.3g} FLOP/s, more than the {peak.max_flops:.3g} FLOP/s peak of "
            f"its device ({peak.name}, reported as {device!r})",
        )
    return OK


@dataclass(frozen=True)
class DhtClaim:
    """What check (b) compares with the DHT: a receipt's sequences, its samples' steps
    in the order recorded, and its span on the coordinator's clock."""

    num_sequences: int
    steps: tuple[int, ...]
    started: float
    finished: float

    @classmethod
    def of(cls, receipt: ReceiptPayload, times: ReceiptTimes) -> DhtClaim:
        steps = tuple(s.step for s in receipt.samples)
        return cls(receipt.num_sequences, steps, times.credited_start, times.finished)


def check_dht(
    claim: DhtClaim,
    history: ProgressHistory | None,
    run_id: str,
    peer: dict[str, Any],
    final: bool = True,
) -> Check:
    """(b) Does the receipt agree with the progress records the peer published while it
    trained? Its rate may not exceed theirs by more than DHT_RATE_TOLERANCE, and its
    samples' steps must go forward from the step those records showed.

    Records are read every few seconds, so until DHT_WINDOW_SLACK_S after the shard
    ended more may come: unless ``final``, a shortfall of evidence is state "waiting".
    """
    if claim.num_sequences == 0:
        return OK
    if not claim.steps:
        return Check("failed", "has no samples (a node records one at each swarm step)")
    steps = list(claim.steps)
    if steps != sorted(steps):
        return Check("failed", f"has samples whose steps go backwards ({steps[:8]})")
    seen = []
    if history is not None:
        seen = history.between(
            run_id,
            claim.started - DHT_WINDOW_SLACK_S,
            claim.finished + DHT_WINDOW_SLACK_S,
            progress_key=peer.get("progress_key") or "",
            dht_peer_id=peer.get("dht_peer_id") or "",
        )
    waiting = Check("waiting", "waiting for the DHT's progress records of its span")
    if not seen:
        if not final:
            return waiting
        return Check("no evidence", "no progress record of this peer in the DHT while it trained")
    # A record read before the shard started shows a step the node had reached by then:
    # no sample of the shard can be from an earlier step. (Later steps are checked
    # against the swarm's state by the spot check: records are read too seldom here.)
    before = [o.epoch for o in seen if o.seen_at <= claim.started - DHT_READ_LAG_S]
    if before and steps[0] < max(before) - DHT_STEP_SLACK:
        return Check(
            "failed",
            f"has a sample at step {steps[0]} but its DHT progress records showed step "
            f"{max(before)} before it started",
        )
    dht_rate = max(o.samples_per_second for o in seen)
    span = max(claim.finished - claim.started, 0.0)
    allowed = DHT_RATE_TOLERANCE * dht_rate * (span + DHT_SHORT_SPAN_SLACK_S)
    if claim.num_sequences > allowed:
        if not final:
            return waiting  # a later record may show a higher rate
        return Check(
            "failed",
            f"claims {claim.num_sequences / max(span, 1e-9):.1f} sequences/s but its DHT "
            f"progress records showed at most {dht_rate:.1f}",
        )
    return OK


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
        """Check a receipt that :meth:`LeaseBook.complete` just stored; returns its status.

        ``sent_at`` is the timestamp of the receipt's signed envelope (node's clock).
        A failed check flags the peer with the reason.
        """
        cpu_started = time.thread_time()
        received_at = time.time() if received_at is None else received_at
        peer = self.store.get_peer(run.id, session.peer_id) or {}
        lease = self.store.get_lease(run.id, receipt.epoch, receipt.shard_id, session.peer_id)
        granted_at = lease["granted_at"] if lease is not None else received_at
        times = receipt_times(receipt, sent_at, granted_at, received_at)
        device = str(peer.get("device") or "")

        possible = check_possible(run, receipt, times, device)
        dht = Check("not checked")
        if not possible.failed:
            final = received_at >= times.finished + DHT_WINDOW_SLACK_S
            dht = check_dht(DhtClaim.of(receipt, times), self.history, run.id, peer, final)
        verdict = self._verdict(run, possible, dht)
        row = {
            "run_id": run.id,
            "peer_id": session.peer_id,
            "shard_id": receipt.shard_id,
            "epoch": receipt.epoch,
            "num_sequences": receipt.num_sequences,
            "num_tokens": receipt.num_tokens,
            "flops": receipt.num_tokens * flops_per_token(run.spec),
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
        self.store.insert_receipt_check(row)
        self._report(run.id, row)
        return str(row["status"])

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
            verdict = self._verdict(run, OK, dht)
            update = {**row, "dht": dht.state, **verdict}
            update["assess_cpu_s"] = row["assess_cpu_s"] + time.thread_time() - cpu_started
            self.store.insert_receipt_check(update)
            self._report(run.id, update)
            decided += 1
        return decided

    def _verdict(self, run: PublishedRun, possible: Check, dht: Check) -> dict[str, str]:
        """Status, reason and spot-check state from the first two checks."""
        spot, spot_reason = "not selected", ""
        if possible.failed or dht.failed:
            status, reason = REJECTED, possible.reason or dht.reason
        elif dht.state == "waiting":
            status, reason = PENDING, dht.reason
        elif dht.state == "no evidence":
            status, reason = UNVERIFIED, dht.reason
        elif self.rng.random() < run.spec.verify.spot_check_fraction:
            status, reason, spot = PENDING, "waiting for its spot check", "queued"
            if run.spec.model.dropout > 0:
                # Losses trained with dropout cannot be recomputed.
                status, reason, spot = VERIFIED, "", "skipped"
                spot_reason = "the model trains with dropout"
            elif run.spec.optimizer.mode == "diloco":
                # Local parameters change at every inner step: no checkpoint holds them.
                status, reason, spot = VERIFIED, "", "skipped"
                spot_reason = "diloco peers train local parameters no checkpoint holds"
        else:
            status, reason = VERIFIED, ""
        return {"status": status, "reason": reason, "spot": spot, "spot_reason": spot_reason}

    def _report(self, run_id: str, row: dict[str, Any]) -> None:
        if row["status"] == REJECTED:
            flag_for_receipt(self.store, run_id, row["peer_id"], row["shard_id"], row["reason"])
        logger.info(
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
    store.flag_peer(run_id, peer_id, f"receipt for shard {shard_id} {reason}")


# Views: what the API shows.


def peer_credit(store: Store, run_id: str) -> dict[str, dict[str, Any]]:
    """Per peer of a run: claimed and verified work, and its share of all verified compute.

    A banned peer is credited nothing, and its work is left out of the shares.
    """
    totals = store.ledger_totals(run_id)
    peers = store.list_peers(run_id)
    banned = {p["peer_id"] for p in peers if store.is_banned(run_id, p["peer_id"])}
    credit: dict[str, dict[str, Any]] = {}
    for p in peers:
        row = totals.get(p["peer_id"], {})

        def total(key: str, row: dict[str, Any] = row) -> float:
            return row.get(key) or 0

        verified = p["peer_id"] not in banned
        credit[p["peer_id"]] = {
            "peer_id": p["peer_id"],
            "name": p["name"],
            "device": p["device"],
            "flagged": p.get("flagged"),
            "num_shards": int(total("num_receipts")),
            "num_tokens": int(total("num_tokens")),
            "num_sequences": int(total("num_sequences")),
            "flops": float(total("flops")),
            "device_s": float(total("device_s")),
            "verified_shards": int(total("verified_shards")) if verified else 0,
            "verified_tokens": int(total("verified_tokens")) if verified else 0,
            "verified_sequences": int(total("verified_sequences")) if verified else 0,
            "verified_flops": float(total("verified_flops")) if verified else 0.0,
            "num_rejected": int(total("num_rejected")),
            "num_pending": int(total("num_pending")),
            "num_unverified": int(total("num_unverified")),
            "banned": not verified,
        }
    all_verified = sum(c["verified_flops"] for c in credit.values())
    for c in credit.values():
        c["verified_share"] = c["verified_flops"] / all_verified if all_verified > 0 else 0.0
        c["verified_fraction"] = c["verified_tokens"] / c["num_tokens"] if c["num_tokens"] else 0.0
    return credit


def ledger_peers(store: Store, run_id: str) -> list[dict[str, Any]]:
    """Every peer of the run with its ledger, most verified compute first."""
    rows = list(peer_credit(store, run_id).values())
    rows.sort(key=lambda r: (-r["verified_flops"], -r["verified_tokens"], r["name"]))
    return rows


def leaderboard_view(store: Store, run: PublishedRun) -> list[dict[str, Any]]:
    """Peers ranked by verified compute, with their flags."""
    return [{"rank": i + 1, **row} for i, row in enumerate(ledger_peers(store, run.id))]


def receipts_view(store: Store, run_id: str, limit: int | None = None) -> list[dict[str, Any]]:
    """Each receipt (the latest ``limit``), oldest first, with its status, the outcome of
    each check and why it failed."""
    return [
        {
            "peer_id": r["peer_id"],
            "shard_id": r["shard_id"],
            "epoch": r["epoch"],
            "num_tokens": r["num_tokens"],
            "num_sequences": r["num_sequences"],
            "flops": r["flops"],
            "device_s": r["device_s"],
            "received_at": r["received_at"],
            "status": r["status"],
            "reason": r["reason"],
            "checks": {
                "possible": r["possible"],
                "dht": r["dht"],
                "spot": r["spot"],
                "spot_reason": r["spot_reason"],
            },
            "num_samples": len(json.loads(r["samples_json"])),
        }
        for r in store.list_receipt_checks(run_id, limit)
    ]


def costs_view(store: Store, run: PublishedRun) -> dict[str, Any]:
    """What verifying this run cost the coordinator, in CPU seconds and as a share of the
    peers' compute, measured and projected to the default spot-check fraction."""
    c = store.verification_costs(run.id)
    verify = run.spec.verify
    default_fraction = VerifySection().spot_check_fraction
    cpu_s = c["assess_cpu_s"] + c["spot_cpu_s"] + c["keeper_cpu_s"]
    per_spot = c["spot_cpu_s"] / c["num_spot_checks"] if c["num_spot_checks"] else None
    # A spot check runs forwards only (a third of training's FLOPs per token).
    spot_flops = (
        verify.spot_check_sequences * run.spec.model.seq_len * flops_per_token(run.spec) / 3
    )
    mean_receipt_tokens = c["num_tokens"] / c["num_receipts"] if c["num_receipts"] else 0
    receipt_flops = mean_receipt_tokens * flops_per_token(run.spec)
    return {
        **c,
        "cpu_s": cpu_s,
        "cpu_s_per_verified_receipt": cpu_s / c["num_verified"] if c["num_verified"] else None,
        "assess_cpu_s_per_receipt": (
            c["assess_cpu_s"] / c["num_receipts"] if c["num_receipts"] else None
        ),
        "cpu_s_per_spot_check": per_spot,
        "spot_check_fraction": verify.spot_check_fraction,
        "spot_check_share": c["spot_cpu_s"] / c["device_s"] if c["device_s"] else None,
        "spot_check_share_at_default_fraction": (
            per_spot * default_fraction * c["num_receipts"] / c["device_s"]
            if per_spot is not None and c["device_s"]
            else None
        ),
        "spot_check_flops_share_at_default_fraction": (
            default_fraction * spot_flops / receipt_flops if receipt_flops else None
        ),
    }


def ledger_view(store: Store, run: PublishedRun, limit: int = 1000) -> dict[str, Any]:
    """The ledger of a run: per peer, its latest ``limit`` receipts, and what verifying
    it cost."""
    return {
        "peers": ledger_peers(store, run.id),
        "receipts": receipts_view(store, run.id, limit),
        "costs": costs_view(store, run),
    }


def checkpoint_path(store: Store, run_id: str, checkpoint: dict[str, Any]) -> Path | None:
    """Where a kept checkpoint's file is; None once the keeper removed it."""
    if not checkpoint.get("file"):
        return None
    return store.data_dir / CHECKPOINTS_DIR / run_id / checkpoint["file"]


def _checkpoint_row(c: dict[str, Any]) -> dict[str, Any]:
    return {
        "step": c["step"],
        "sha256": c["sha256"],
        "file_sha256": c["file_sha256"],
        "num_bytes": c["num_bytes"],
        "num_tokens": c["num_tokens"],
        "created_at": c["created_at"],
        "available": c["file"] is not None,
    }


def checkpoints_view(store: Store, run_id: str) -> list[dict[str, Any]]:
    """Every checkpoint the keeper took, oldest first: its step, the ``params_sha256`` of
    its parameters (kept after the file is removed), the file's sha256 and size, the
    run's tokens when it was taken and whether it can be downloaded."""
    return [_checkpoint_row(c) for c in store.list_checkpoints(run_id)]


def checkpoint_view(store: Store, run_id: str, step: int) -> dict[str, Any] | None:
    """The keeper's checkpoint of ``step`` as :func:`checkpoints_view` shows it, or None."""
    found = store.get_checkpoint(run_id, step)
    return _checkpoint_row(found) if found is not None else None


def verified_tokens(store: Store, run_id: str, peer_id: str) -> int:
    """Tokens of a peer's receipts that passed every check; 0 for a banned peer."""
    if store.is_banned(run_id, peer_id):
        return 0
    return store.verified_tokens(run_id, peer_id)
