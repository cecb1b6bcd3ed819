"""Counters the coordinator keeps about itself (refused requests by method and reason).

In memory: they describe this process's life, not the run's, and counting a
refused request must never write to the store it was refused from.
"""

from __future__ import annotations

import threading
from collections import Counter


class Refusals:
    """How many requests were refused, by method and status code."""

    def __init__(self) -> None:
        self._counts: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()

    def count(self, method: str, reason: str) -> None:
        with self._lock:
            self._counts[(method, reason)] += 1

    def snapshot(self) -> list[dict[str, object]]:
        with self._lock:
            return [
                {"method": m, "reason": r, "count": n} for (m, r), n in sorted(self._counts.items())
            ]

    def total(self) -> int:
        with self._lock:
            return sum(self._counts.values())
