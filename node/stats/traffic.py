"""The bytes a node sends and receives, by purpose: what its uplink carries for training.

Purposes (:data:`~crowdtrain.protocol.messages.TRAFFIC_PURPOSES`):

- ``averaging``: all-reduce parts and averaged results (hivemind's averager processes),
- ``state``: state served to or downloaded from peers, and the keeper's checkpoints,
- ``control``: gRPC and HTTP calls to the coordinator,
- ``data``: shards and the tokenizer downloaded from the coordinator.

Counts are the bytes of the messages and files as they cross our code: protobuf
messages by their serialized size, HTTP bodies by their length. Transport framing
and what hivemind's DHT and p2p daemon exchange on their own (peer discovery,
progress records, keep-alives) are not seen here; the bench measures those on
the wire. The counters live in shared memory made before hivemind forks its
averager processes, so their counts reach the heartbeat.
"""

from __future__ import annotations

import ctypes
import multiprocessing

from crowdtrain.protocol.messages import TRAFFIC_PURPOSES, TrafficCount


class Traffic:
    """Cumulative bytes sent and received per purpose, shared with forked children."""

    def __init__(self) -> None:
        self._counts = multiprocessing.get_context("fork").Array(
            ctypes.c_int64, 2 * len(TRAFFIC_PURPOSES)
        )

    def add(self, purpose: str, sent: int = 0, received: int = 0) -> None:
        index = 2 * TRAFFIC_PURPOSES.index(purpose)
        with self._counts.get_lock():
            self._counts[index] += max(0, int(sent))
            self._counts[index + 1] += max(0, int(received))

    def sent(self, purpose: str) -> int:
        return int(self._counts[2 * TRAFFIC_PURPOSES.index(purpose)])

    def received(self, purpose: str) -> int:
        return int(self._counts[2 * TRAFFIC_PURPOSES.index(purpose) + 1])

    def counts(self) -> dict[str, TrafficCount]:
        """Every purpose's counts, as a heartbeat carries them."""
        with self._counts.get_lock():
            values = [int(v) for v in self._counts[:]]
        return {
            purpose: TrafficCount(sent=values[2 * i], received=values[2 * i + 1])
            for i, purpose in enumerate(TRAFFIC_PURPOSES)
        }

    def total_sent(self) -> int:
        return sum(self.sent(p) for p in TRAFFIC_PURPOSES)

    def summary(self) -> str:
        """``up 1.2 MB (averaging 1.0, state 0.2, control 0.0, data 0.0)``, for the status line."""
        parts = ", ".join(f"{p} {self.sent(p) / 1e6:.1f}" for p in TRAFFIC_PURPOSES)
        return f"up {self.total_sent() / 1e6:.1f} MB ({parts})"


__all__ = ["Traffic"]
