"""The checks a receipt must pass before it is credited: possible, and agreeing with the DHT.

A receipt is a node's signed claim that it trained a shard. (a)
:func:`check_possible`: no more sequences than the shard holds, times inside its
lease, a compute rate its reported device can reach. (b) :func:`check_dht`: the
rate and swarm steps agree with the progress records the peer published to
the DHT while it trained. Pure functions of the receipt, the run and the
evidence: no store, no HTTP, gRPC or hivemind.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from crowdtrain.protocol.devices import device_peak
from crowdtrain.protocol.messages import MAX_SAMPLE_LOSSES, ReceiptPayload
from crowdtrain.protocol.runspec import RunSpec
from crowdtrain.protocol.shards import num_windows

if TYPE_CHECKING:
    from crowdtrain.coordinator.records import PublishedRun
    from crowdtrain.coordinator.swarm.dht import ProgressHistory


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


# How far a receipt's loss_sum may lie from the sum of its samples' losses, per
# sequence, when its samples cover every sequence it claims: the node computes both from
# the same logits (float32, rounded to 5 decimals in a sample).
LOSS_SUM_TOLERANCE = 1e-3


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

    return estimate_flops_per_token(GPTConfig.from_spec(spec.model))


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


def shard_batches(run: PublishedRun, receipt: ReceiptPayload) -> int | None:
    """Whole micro-batches of the receipt's size in its shard; None for a shard that is
    not a train shard of the run."""
    entry = next((s for s in run.manifest.train_shards if s.id == receipt.shard_id), None)
    if entry is None:
        return None
    return num_windows(entry.num_tokens, run.spec.model.seq_len) // receipt.micro_batch_size


def possible_sequences(run: PublishedRun, receipt: ReceiptPayload) -> int:
    """The most sequences a receipt's shard holds in its micro-batches (0: not a train
    shard of the run)."""
    return (shard_batches(run, receipt) or 0) * receipt.micro_batch_size


def check_possible(
    run: PublishedRun, receipt: ReceiptPayload, times: ReceiptTimes, device: str
) -> Check:
    """(a) Could this receipt be true? Shard capacity, samples that give every
    sequence's loss and add up to its loss sum, lease window and device peak."""
    spec = run.spec
    seq_len = spec.model.seq_len
    num_batches = shard_batches(run, receipt)
    if num_batches is None:
        return Check("failed", f"shard {receipt.shard_id!r} is not a train shard of this run")
    mb = receipt.micro_batch_size
    capacity = num_batches * mb
    if receipt.num_sequences > capacity:
        return Check(
            "failed",
            f"claims {receipt.num_sequences} sequences but shard {receipt.shard_id} holds at most "
            f"{capacity} in micro-batches of {mb}",
        )
    if receipt.num_tokens != receipt.num_sequences * seq_len:
        return Check(
            "failed",
            f"claims {receipt.num_tokens} tokens for {receipt.num_sequences} sequences of "
            f"{seq_len} tokens",
        )
    per_sample = min(mb, MAX_SAMPLE_LOSSES)
    for sample in receipt.samples:
        if sample.batch >= num_batches or len(sample.losses) not in (0, per_sample):
            return Check(
                "failed",
                f"a sample names batch {sample.batch} with {len(sample.losses)} losses; the "
                f"shard has {num_batches} batches of {mb}, and a sample gives the loss of "
                f"every sequence of its batch ({per_sample})",
            )
    sampled = sum(len(s.losses) for s in receipt.samples)
    if mb <= MAX_SAMPLE_LOSSES and sampled == receipt.num_sequences:
        # Every sequence it claims has its loss in a sample: they must add up.
        total = sum(sum(s.losses) for s in receipt.samples)
        if not abs(receipt.loss_sum - total) <= LOSS_SUM_TOLERANCE * max(sampled, 1):
            return Check(
                "failed",
                f"claims a loss sum of {receipt.loss_sum:.4f}, but the losses of its "
                f"{sampled} sequences add up to {total:.4f}",
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
