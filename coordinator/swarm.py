"""The coordinator's hivemind DHT peer: bootstraps a run's swarm and reads its progress.

The coordinator never takes part in averaging; it only gives nodes a first
peer to dial and reads the signed progress records nodes publish, which are
claims (self-reported), shown as the swarm's step.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import hivemind
from hivemind.dht.schema import RSASignatureValidator, SchemaValidator
from hivemind.optim.progress_tracker import TrainingProgressSchema
from hivemind.utils import ValueWithExpiration

logger = logging.getLogger(__name__)

_READ_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class SwarmProgress:
    """What the DHT shows of a run: the highest step any live peer reports."""

    step: int
    num_peers: int
    samples_per_second: float


class SwarmPeer:
    """A DHT peer owned by the coordinator process. Create it before any thread or
    event loop starts: hivemind forks its DHT process."""

    def __init__(self, host: str, port: int, announce_host: str | None = None):
        announce = []
        if announce_host:
            announce = [f"/ip4/{announce_host}/tcp/{port}"] if port else []
        self.dht = hivemind.DHT(
            start=True,
            host_maddrs=[f"/ip4/{host}/tcp/{port}"],
            announce_maddrs=announce or None,
        )
        self._signature_validator = RSASignatureValidator()
        self._watched: set[str] = set()
        self._lock = threading.Lock()

    @property
    def initial_peers(self) -> list[str]:
        """Multiaddrs that nodes pass to ``hivemind.DHT(initial_peers=...)``."""
        return [str(addr) for addr in self.dht.get_visible_maddrs()]

    @property
    def port(self) -> int:
        for addr in self.dht.get_visible_maddrs():
            text = str(addr)
            if "/tcp/" in text:
                return int(text.split("/tcp/")[1].split("/")[0])
        return 0

    def watch(self, run_id: str) -> None:
        """Install the run's record validators so its signed progress can be stored and read."""
        with self._lock:
            if run_id in self._watched:
                return
            self.dht.add_validators(
                [
                    SchemaValidator(TrainingProgressSchema, prefix=run_id),
                    self._signature_validator,
                ]
            )
            self._watched.add(run_id)

    def read_progress(self, run_id: str) -> SwarmProgress | None:
        """The run's progress as the DHT shows it, or None when no peer reports."""
        self.watch(run_id)
        try:
            found = self.dht.get(f"{run_id}_progress", latest=True, return_future=True).result(
                timeout=_READ_TIMEOUT_S
            )
        except Exception as e:  # a slow or shut-down DHT must never take the coordinator down
            logger.debug("reading progress of %s failed: %s", run_id, e)
            return None
        if not isinstance(found, ValueWithExpiration) or not isinstance(found.value, dict):
            return None
        records = [r for r in (_record(v) for v in found.value.values()) if r is not None]
        if not records:
            return None
        return SwarmProgress(
            step=max(int(r["epoch"]) for r in records),
            num_peers=len(records),
            samples_per_second=sum(float(r["samples_per_second"]) for r in records),
        )

    def shutdown(self) -> None:
        self.dht.shutdown()


def _record(value: Any) -> dict[str, Any] | None:
    inner = value.value if isinstance(value, ValueWithExpiration) else value
    if isinstance(inner, dict) and "epoch" in inner and "samples_per_second" in inner:
        return inner
    return None


def poll_progress(
    swarm: SwarmPeer,
    run_ids: Callable[[], list[str]],
    on_progress: Callable[[str, SwarmProgress], None],
    stop: threading.Event,
    interval_s: float = 5.0,
) -> None:
    """Read every run's progress every ``interval_s`` until ``stop`` is set."""
    while not stop.wait(interval_s):
        for run_id in run_ids():
            progress = swarm.read_progress(run_id)
            if progress is not None:
                on_progress(run_id, progress)
