"""Where a node's training loop spends its wall time: computing, blocked on the swarm, or
waiting for data (:class:`LoopTime`), and how the swarm optimizers count the seconds they
keep the trainer waiting (:class:`SwarmWait`).

Compute utilisation, the share of wall time spent computing, is what a volunteer's slow
uplink costs: the swarm's rounds and state downloads are the time a node's accelerator
stands idle. Each heartbeat carries the split (self-reported: shown, never credited).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from crowdtrain.protocol.messages import TimeSplit


class SwarmWait:
    """Seconds the trainer's thread spent blocked on the swarm: averaging rounds it had to
    wait for and state downloads, each timed by ``with wait.timed():`` (nested timings
    count once). :meth:`so_far` counts a wait under way too (another thread may read it:
    a heartbeat sent during a minute-long round)."""

    def __init__(self) -> None:
        self._done_s = 0.0
        self._depth = 0
        self._since: float | None = None
        self._lock = threading.Lock()

    @contextmanager
    def timed(self) -> Iterator[None]:
        with self._lock:
            self._depth += 1
            if self._depth == 1:
                self._since = time.monotonic()
        try:
            yield
        finally:
            with self._lock:
                self._depth -= 1
                if self._depth == 0 and self._since is not None:
                    self._done_s += time.monotonic() - self._since
                    self._since = None

    def so_far(self) -> float:
        with self._lock:
            if self._since is None:
                return self._done_s
            return self._done_s + time.monotonic() - self._since


class LoopTime:
    """The training loop's wall time since the node started (the periods between
    :meth:`start` and :meth:`stop`), the swarm's waits in those periods (read from the
    optimizer's :class:`SwarmWait`, a wait under way included: so a heartbeat sent
    during a long round counts it on both sides) and the parts :meth:`add` counted. Read
    by the heartbeat's thread while the loop runs."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._closed_s = 0.0
        self._since: float | None = None
        self._swarm: SwarmWait | None = None
        self._swarm_closed_s = 0.0
        self._swarm_base_s = 0.0  # the swarm's count when the period under way began
        self._computing_s = 0.0
        self._data_wait_s = 0.0

    def start(self, swarm: SwarmWait | None = None) -> None:
        """A period of the loop begins; ``swarm`` times its waits on the swarm."""
        with self._lock:
            if self._since is None:
                self._since = time.monotonic()
                self._swarm = swarm
                self._swarm_base_s = swarm.so_far() if swarm is not None else 0.0

    def stop(self) -> None:
        with self._lock:
            if self._since is not None:
                self._closed_s += time.monotonic() - self._since
                self._swarm_closed_s += self._swarm_in_period()
                self._since, self._swarm = None, None

    def _swarm_in_period(self) -> float:
        return self._swarm.so_far() - self._swarm_base_s if self._swarm is not None else 0.0

    def add(self, computing_s: float = 0.0, data_wait_s: float = 0.0) -> None:
        """Count seconds of the loop (each measured inside a period of it)."""
        with self._lock:
            self._computing_s += max(0.0, computing_s)
            self._data_wait_s += max(0.0, data_wait_s)

    def split(self) -> TimeSplit:
        """The split so far, the period under way included."""
        with self._lock:
            swarm_wait_s = self._swarm_closed_s
            training_s = self._closed_s
            if self._since is not None:
                swarm_wait_s += self._swarm_in_period()
                training_s += time.monotonic() - self._since
            return TimeSplit(
                training_s=training_s,
                computing_s=self._computing_s,
                swarm_wait_s=swarm_wait_s,
                data_wait_s=self._data_wait_s,
            )

    @property
    def utilisation(self) -> float | None:
        """Computing seconds over the loop's seconds; None before the loop ran."""
        split = self.split()
        return split.computing_s / split.training_s if split.training_s > 0 else None
