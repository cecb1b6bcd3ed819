"""What a node counts (:class:`NodeStats`) and how trained micro-batches count into it
(:class:`TokenAccounting`).

The counters are cumulative since the node process started; the progress
display, the notebook's ``SessionStats`` and each heartbeat read them. Plain
bookkeeping: nothing here trains, sends or starts anything.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from crowdtrain.node.stats.loop_time import LoopTime
from crowdtrain.node.stats.traffic import Traffic

# The moving loss is over this many micro-batches; the rate over this many seconds.
_LOSS_WINDOW = 20
_RATE_WINDOW_S = 10.0


@dataclass
class NodeStats:
    """Counters a node reports; cumulative since this node process started."""

    session_key: str
    num_tokens: int = 0
    num_sequences: int = 0
    tokens_per_s: float = 0.0
    loss: float | None = None
    step: int = 0
    num_peers: int = 0
    val_loss: float | None = None
    num_skipped_steps: int = 0
    train_s: float = 0.0
    data_wait_s: float = 0.0
    shard: str = ""  # the shard being trained
    verified_tokens: int = 0  # this peer's tokens the coordinator has verified, run-wide
    # Bytes sent and received by purpose (shared with hivemind's averager processes).
    traffic: Traffic = field(default_factory=Traffic)
    # Where the training loop's wall time went: computing, blocked on the swarm, data.
    time: LoopTime = field(default_factory=LoopTime)


class TokenAccounting:
    """Counts each trained micro-batch into ``stats``: tokens, sequences, the mean loss of
    the last 20 micro-batches of this training call, and tokens per second over the
    last 10 seconds."""

    def __init__(self, stats: NodeStats):
        self.stats = stats
        self._losses: deque[float] = deque(maxlen=_LOSS_WINDOW)
        self._rate_window: deque[tuple[float, int]] = deque()

    def start_training(self) -> None:
        """A new training call: its moving loss starts afresh (the rate carries on)."""
        self._losses.clear()

    def record(self, num_sequences: int, num_tokens: int, loss: float, shard_id: str) -> None:
        """Count a micro-batch of ``num_sequences`` sequences (``num_tokens`` tokens) trained
        from shard ``shard_id`` with mean loss ``loss``."""
        s = self.stats
        s.num_tokens += num_tokens
        s.num_sequences += num_sequences
        self._losses.append(loss)
        s.loss = sum(self._losses) / len(self._losses)
        now = time.monotonic()
        window = self._rate_window
        window.append((now, num_tokens))
        while len(window) > 2 and now - window[0][0] > _RATE_WINDOW_S:
            window.popleft()
        span = now - window[0][0]
        if span > 0:
            s.tokens_per_s = sum(n for _, n in list(window)[1:]) / span
        s.shard = shard_id

    def skipped(self) -> None:
        """Count a micro-batch skipped because its loss or gradients were not finite."""
        self.stats.num_skipped_steps += 1


__all__ = ["NodeStats", "TokenAccounting"]
