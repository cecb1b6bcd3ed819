"""The coordinator's hivemind DHT peer: bootstraps a run's swarm and reads its progress.

The coordinator never takes part in averaging; it only gives nodes a first
peer to dial and reads the signed progress records nodes publish, which are
claims (self-reported), shown as the swarm's step. It keeps a short history
of each peer's records (:class:`ProgressHistory`), the evidence the ledger
holds receipts against.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import hivemind
from hivemind.dht.schema import RSASignatureValidator, SchemaValidator
from hivemind.optim.progress_tracker import TrainingProgressSchema
from hivemind.p2p import PeerID
from hivemind.utils import ValueWithExpiration

from crowdtrain.protocol.multiaddr import tcp_multiaddr

logger = logging.getLogger(__name__)

_READ_TIMEOUT_S = 5.0
# How long, and how many, progress observations are kept per peer: enough to
# cover any shard a receipt accounts for.
HISTORY_KEEP_S = 3600.0
HISTORY_MAX_PER_PEER = 2048


@dataclass(frozen=True)
class SwarmProgress:
    """What the DHT shows of a run: the lower median of the steps its records report."""

    step: int
    num_peers: int
    samples_per_second: float


@dataclass(frozen=True)
class ProgressObservation:
    """One peer's signed progress record as the coordinator saw it at ``seen_at``
    (coordinator clock). ``progress_key`` is the record's subkey in hex: the
    public key that signed it. ``dht_peer_id`` is what the record says (base58)."""

    seen_at: float
    progress_key: str
    dht_peer_id: str
    epoch: int
    samples_accumulated: int
    samples_per_second: float


_OWNER_PREFIX, _OWNER_SUFFIX = (
    part.hex() for part in RSASignatureValidator.PUBLIC_KEY_FORMAT.split(b"_key_")
)


def subkey_hex(progress_key: str) -> str:
    """A progress record's subkey in hex, from a node's ``progress_key``: the subkey itself
    (``[owner:<key>]``) or just the public key inside it."""
    key = progress_key.lower()
    if not key or key.startswith(_OWNER_PREFIX):
        return key
    return f"{_OWNER_PREFIX}{key}{_OWNER_SUFFIX}"


class ProgressHistory:
    """Recent progress observations of every peer of every run. Thread-safe."""

    def __init__(
        self, keep_s: float = HISTORY_KEEP_S, max_per_peer: int = HISTORY_MAX_PER_PEER
    ) -> None:
        self.keep_s = keep_s
        self.max_per_peer = max_per_peer
        self._runs: dict[str, dict[str, deque[ProgressObservation]]] = {}
        self._lock = threading.Lock()

    def add(self, run_id: str, observation: ProgressObservation) -> None:
        with self._lock:
            peers = self._runs.setdefault(run_id, {})
            seen = peers.setdefault(observation.progress_key, deque(maxlen=self.max_per_peer))
            seen.append(observation)
            horizon = observation.seen_at - self.keep_s
            for key in [k for k, q in peers.items() if q and q[-1].seen_at < horizon]:
                del peers[key]
            while seen and seen[0].seen_at < horizon:
                seen.popleft()

    def between(
        self, run_id: str, start: float, end: float, progress_key: str = "", dht_peer_id: str = ""
    ) -> list[ProgressObservation]:
        """Observations seen in ``[start, end]`` of the records signed by ``progress_key``,
        or, when that is empty, of records that name ``dht_peer_id``."""
        if not progress_key and not dht_peer_id:
            return []
        progress_key = subkey_hex(progress_key)
        with self._lock:
            peers = self._runs.get(run_id, {})
            if progress_key:
                candidates = list(peers.get(progress_key, ()))
            else:
                candidates = [o for q in peers.values() for o in q if o.dht_peer_id == dht_peer_id]
        return [o for o in candidates if start <= o.seen_at <= end]


class SwarmPeer:
    """A DHT peer owned by the coordinator process. Create it before any thread or
    event loop starts: hivemind forks its DHT process."""

    def __init__(self, host: str, port: int, announce_host: str | None = None):
        announce = []
        if announce_host:
            announce = [tcp_multiaddr(announce_host, port)] if port else []
        self.dht = hivemind.DHT(
            start=True,
            host_maddrs=[tcp_multiaddr(host, port)],
            announce_maddrs=announce or None,
        )
        self._signature_validator = RSASignatureValidator()
        self._watched: set[str] = set()
        self.history = ProgressHistory()
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
        now = time.time()
        records = []
        for subkey, value in found.value.items():
            record = _record(value)
            if record is None:
                continue
            records.append(record)
            seen = _observation(now, subkey, record) if isinstance(subkey, bytes) else None
            if seen is not None:
                self.history.add(run_id, seen)
        if not records:
            return None
        # Any key may publish a record: the lower median of their steps, not the highest,
        # so one record claiming step 2**62 does not become the run's step.
        steps = sorted(int(r["epoch"]) for r in records)
        return SwarmProgress(
            step=steps[(len(steps) - 1) // 2],
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


def _observation(now: float, subkey: bytes, record: dict[str, Any]) -> ProgressObservation | None:
    try:
        dht_peer_id = PeerID(record.get("peer_id", b"")).to_base58()
    except Exception:  # a malformed id is the record owner's problem, not ours
        dht_peer_id = ""
    try:
        return ProgressObservation(
            seen_at=now,
            progress_key=subkey.hex(),
            dht_peer_id=dht_peer_id,
            epoch=int(record["epoch"]),
            samples_accumulated=int(record.get("samples_accumulated", 0)),
            samples_per_second=float(record["samples_per_second"]),
        )
    except (TypeError, ValueError, OverflowError):
        return None


def poll_progress(
    swarm: SwarmPeer,
    run_ids: Callable[[], list[str]],
    on_progress: Callable[[str, SwarmProgress], None],
    stop: threading.Event,
    interval_s: float = 3.0,
    after_read: Callable[[str], None] | None = None,
) -> None:
    """Read every run's progress every ``interval_s`` until ``stop`` is set; ``after_read``
    (the ledger's recheck of receipts waiting for this evidence) runs after each read."""
    while not stop.wait(interval_s):
        for run_id in run_ids():
            progress = swarm.read_progress(run_id)
            if progress is not None:
                on_progress(run_id, progress)
            if after_read is not None:
                try:
                    after_read(run_id)
                except Exception:  # the poller must outlive any one run's trouble
                    logger.exception("after reading the progress of %s", run_id)
