"""What a node did with one leased shard, the receipt it becomes, and where a node was in it.

:class:`ShardProgress` counts the micro-batches trained from a shard (and
those skipped), records the loss samples the coordinator's verifier checks,
and returns the shard's :class:`~crowdtrain.protocol.messages.ReceiptPayload`
the moment the shard is done: the rule "shard done, not a replay: send its
receipt" lives here only. :func:`save_position` and :func:`load_position`
keep a node's place in its shard across restarts. Knows nothing about gRPC or
how the receipt travels.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from crowdtrain.protocol.files import atomic_write
from crowdtrain.protocol.messages import (
    MAX_RECEIPT_LOSSES,
    MAX_RECEIPT_SAMPLES,
    MAX_SAMPLE_LOSSES,
    ReceiptPayload,
    ReceiptSample,
)
from crowdtrain.protocol.shards import ShardEntry

logger = logging.getLogger(__name__)

# Losses are sent to this many decimals: far below any tolerance, and shorter.
LOSS_DECIMALS = 5


@dataclass(frozen=True)
class LeasedShard:
    """A shard this node holds a lease on, verified on disk at ``path``."""

    shard_id: str
    epoch: int
    path: Path
    entry: ShardEntry


@dataclass
class ShardProgress:
    """What a node did with one shard; becomes its receipt.

    ``samples`` hold, for the first micro-batch trained at each swarm step (every
    micro-batch with ``every_batch``), the step, the batch's index in the shard's
    order and the loss of every sequence in it: the coordinator's verifier picks a
    sample and some of its sequences at random once the receipt arrived, and
    recomputes them from its checkpoint of that step, so a node cannot tell
    which losses it must compute honestly. Every micro-batch only where the
    parameters stay the swarm's step's for all of them (a sync run that does not
    delay its optimizer step); a DiLoCo peer's change at each inner step, so its
    samples are losses at the round's global parameters (one extra forward pass
    of the first batch at each new round). ``batch`` is the index of the
    micro-batch handed out last.
    ``replay`` counts the passes over the shard after the first (0: the
    leased pass, the only one receipted).
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
    every_batch: bool = False
    samples: list[ReceiptSample] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.batches_done >= self.num_batches

    def wants_sample(self, step: int) -> bool:
        """Whether the batch being trained at ``step`` should be recorded as a sample."""
        if self.replay != 0 or len(self.samples) >= MAX_RECEIPT_SAMPLES:
            return False
        losses = sum(len(s.losses) for s in self.samples)
        if losses + min(self.batch_size, MAX_SAMPLE_LOSSES) > MAX_RECEIPT_LOSSES:
            return False
        return self.every_batch or not self.samples or self.samples[-1].step != step

    def record(
        self,
        num_sequences: int,
        num_tokens: int,
        loss: float,
        step: int,
        sample: list[float] | None = None,
        sample_step: int | None = None,
        sample_params: str | None = None,
    ) -> ReceiptPayload | None:
        """Count the current micro-batch as trained: ``num_sequences`` sequences of
        ``num_tokens`` tokens in all, mean loss ``loss``, at swarm step ``step``.

        ``sample`` holds the per-sequence losses of its sequences when
        :meth:`wants_sample` asked for them (see :meth:`add_sample`), computed with the
        parameters of swarm step ``sample_step`` (default: ``step``), whose sha256 is
        ``sample_params`` when given (DiLoCo's global parameters). Returns the shard's receipt when this batch completes the leased pass.
        """
        if sample is not None:
            self.add_sample(step if sample_step is None else sample_step, sample, sample_params)
        self.batches_done += 1
        self.num_sequences += num_sequences
        self.num_tokens += num_tokens
        self.loss_sum += loss * num_sequences
        return self._receipt_when_done()

    def add_sample(self, step: int, losses: list[float], params_sha256: str | None = None) -> None:
        """Record the losses of the current batch's sequences, trained at ``step`` (the
        first :data:`MAX_SAMPLE_LOSSES`; none when one is not finite, or beyond what a
        receipt may carry)."""
        if not all(math.isfinite(x) for x in losses):
            return
        rounded = [round(x, LOSS_DECIMALS) for x in losses[:MAX_SAMPLE_LOSSES]]
        try:
            sample = ReceiptSample(
                step=step, batch=self.batch, losses=rounded, params_sha256=params_sha256
            )
        except ValidationError:
            logger.debug("skipped a loss sample of shard %s", self.shard.shard_id)
            return
        self.samples.append(sample)

    def skip(self) -> ReceiptPayload | None:
        """Count the current micro-batch as gone through untrained (its loss or gradients
        were not finite): the shard still ends, and its receipt counts only the sequences
        really trained. Returns the receipt when this completes the leased pass."""
        self.batches_done += 1
        return self._receipt_when_done()

    def receipt(self) -> ReceiptPayload:
        """The shard's receipt as it stands, finished now."""
        return ReceiptPayload(
            shard_id=self.shard.shard_id,
            epoch=self.shard.epoch,
            num_sequences=self.num_sequences,
            num_tokens=self.num_tokens,
            loss_sum=float(self.loss_sum),
            started=float(self.started),
            finished=time.time(),
            micro_batch_size=self.batch_size,
            samples=list(self.samples),
        )

    def _receipt_when_done(self) -> ReceiptPayload | None:
        # A replay's sequences were receipted with the leased pass: never twice.
        return self.receipt() if self.done and self.replay == 0 else None

    def position(self, batch_size: int) -> dict[str, Any]:
        """Where training is in this shard, for :meth:`resume` after a restart
        (``batch_size`` is the micro-batch the node runs with)."""
        return {
            "shard_id": self.shard.shard_id,
            "epoch": self.shard.epoch,
            "batches_done": self.batches_done,
            "batch_size": batch_size,
            "num_sequences": self.num_sequences,
            "num_tokens": self.num_tokens,
            "loss_sum": self.loss_sum,
            "started": self.started,
            "samples": [s.model_dump() for s in self.samples],
        }

    def resume(self, position: dict[str, Any]) -> int:
        """Take the counters of a saved :meth:`position` of this shard; returns the
        micro-batches already done (never more than the shard holds)."""
        done = min(int(position["batches_done"]), self.num_batches)
        self.batches_done = done
        self.num_sequences = int(position["num_sequences"])
        self.num_tokens = int(position["num_tokens"])
        self.loss_sum = float(position["loss_sum"])
        self.started = float(position["started"])
        self.samples = []
        for saved in position.get("samples", []):
            try:
                self.samples.append(ReceiptSample.model_validate(saved))
            except ValidationError:
                logger.warning("dropped a damaged loss sample of shard %s", self.shard.shard_id)
        return done


def load_position(path: Path, manifest_hash: str) -> dict[str, Any] | None:
    """Where a node was in its shard when it last stopped, if it trained this data."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or saved.get("manifest_hash") != manifest_hash:
        return None
    position = saved.get("position")
    return position if isinstance(position, dict) else None


def save_position(path: Path, manifest_hash: str, position: dict[str, Any] | None) -> None:
    """Write a :meth:`ShardStream.position` atomically, for :func:`load_position`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps({"manifest_hash": manifest_hash, "position": position}))


__all__ = [
    "LOSS_DECIMALS",
    "LeasedShard",
    "ShardProgress",
    "load_position",
    "save_position",
]
