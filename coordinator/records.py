"""The records every part of the coordinator shares: a published run and a peer's session.

:func:`get_run` turns a stored run into a :class:`PublishedRun` (its spec and
manifest parsed once per store); :class:`Session` is a registered peer's
session. They sit at the bottom of the coordinator's packages, above the
store only, so that every domain package can import them without a circle.
No HTTP or gRPC here.
"""

from __future__ import annotations

import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crowdtrain.coordinator.store import Store
from crowdtrain.protocol.errors import CrowdtrainError
from crowdtrain.protocol.messages import MAX_WEIGHT_BATCHES, NEWCOMER_WEIGHT_BATCHES
from crowdtrain.protocol.runspec import RunSpec, parse_spec
from crowdtrain.protocol.shards import ShardManifest

# A peer that has not sent a heartbeat for this long is shown as gone.
PEER_TIMEOUT_S = 20.0
# A peer's averaging weight counts for at most WEIGHT_SLACK times the sequences of its
# verified receipts received in the last VERIFIED_WINDOW_S, per step the run made then.
VERIFIED_WINDOW_S = 900.0
WEIGHT_SLACK = 2.0
ROSTER_TTL_S = 5.0  # how long a run's weight caps are reused (every heartbeat reads them)


class UnknownRunError(CrowdtrainError):
    """A run id that was never published here."""


@dataclass(frozen=True)
class PublishedRun:
    """A stored run with its spec and manifest parsed."""

    row: dict[str, Any]
    spec: RunSpec
    manifest: ShardManifest

    @property
    def id(self) -> str:
        return self.spec.run.id

    @property
    def data_path(self) -> Path:
        return Path(self.row["data_path"])


def get_run(store: Store, run_id: str) -> PublishedRun:
    row = store.get_run(run_id)
    if row is None:
        known = ", ".join(r["id"] for r in store.list_runs()) or "none"
        shown = run_id if len(run_id) <= 64 else run_id[:64] + "..."
        raise UnknownRunError(f"no run '{shown}' on this coordinator; runs here: {known}")
    # A published run never changes and every node request needs it: parse it once per
    # store (a manifest of many shards is slow to parse), keyed by its hashes.
    spec, manifest = store.memo.get(
        ("published run", row["spec_hash"], row["manifest_hash"]),
        lambda: (
            parse_spec(row["spec_toml"], source=f"run {row['id']}"),
            ShardManifest.from_json(row["manifest_json"]),
        ),
    )
    return PublishedRun(row=row, spec=spec, manifest=manifest)


def num_active_peers(store: Store, run_id: str, now: float | None = None) -> int:
    """Peers that heartbeat within PEER_TIMEOUT_S and have not left."""
    now = time.time() if now is None else now
    return store.count_live_peers(run_id, since=now - PEER_TIMEOUT_S)


def roster(store: Store, run: PublishedRun, now: float | None = None) -> list[tuple[str, float]]:
    """Each live peer's swarm id with the most averaging weight (samples per round, in a
    DiLoCo run per inner step of the round) that others count its parts for: its
    :func:`weight_caps`, or nothing for a flagged or banned peer. Nodes get it with each
    heartbeat's answer; the keeper's followers from a file."""
    now = time.time() if now is None else now
    caps = weight_caps(store, run, now)
    newcomer = NEWCOMER_WEIGHT_BATCHES * run.spec.optimizer.target_batch_size
    return [
        (
            p["dht_peer_id"],
            0.0 if p["flagged"] or p["state"] == "banned" else caps.get(p["peer_id"], newcomer),
        )
        for p in store.roster_rows(run.id, since=now - PEER_TIMEOUT_S)
    ]


_caps_lock = threading.Lock()
_caps: weakref.WeakKeyDictionary[Store, dict[str, tuple[float, dict[str, float]]]] = (
    weakref.WeakKeyDictionary()
)


def weight_caps(store: Store, run: PublishedRun, now: float) -> dict[str, float]:
    """The most averaging weight each peer with verified work may have counted (by peer
    id): :data:`WEIGHT_SLACK` times the sequences of its verified receipts received in the
    last :data:`VERIFIED_WINDOW_S` per step the run made meanwhile, between
    :data:`NEWCOMER_WEIGHT_BATCHES` (what a peer without verified work gets, so that a
    volunteer's first shard counts) and :data:`MAX_WEIGHT_BATCHES` target batches.

    A weight is the sender's own claim: before, any peer could claim four target batches
    a round, more than a whole swarm of small honest peers, with no work behind it (a
    fresh identity each time it is flagged). Now only work the verifier accepted buys
    weight. Reused for :data:`ROSTER_TTL_S` (every heartbeat reads it)."""
    with _caps_lock:
        kept = _caps.setdefault(store, {}).get(run.id)
    if kept is not None and 0 <= now - kept[0] < ROSTER_TTL_S:
        return kept[1]
    opt = run.spec.optimizer
    since = now - VERIFIED_WINDOW_S
    step_then = store.step_at(run.id, since)
    if step_then is None:  # a run younger than the window (or not sampled yet)
        step_then = 0
    steps = max(1, int(run.row["step"]) - step_then)
    # a DiLoCo round is inner_steps steps of the target batch (nodes scale the roster)
    per_round = opt.inner_steps if opt.mode == "diloco" else 1
    low = NEWCOMER_WEIGHT_BATCHES * opt.target_batch_size
    high = MAX_WEIGHT_BATCHES * opt.target_batch_size
    caps = {
        peer: min(high, max(low, WEIGHT_SLACK * sequences / steps / per_round))
        for peer, sequences in store.verified_sequences_since(run.id, since).items()
    }
    with _caps_lock:
        _caps.setdefault(store, {})[run.id] = (now, caps)
    return caps


def peer_state(peer: dict[str, Any], now: float) -> str:
    if peer["state"] in ("left", "banned"):
        return str(peer["state"])
    return "active" if now - peer["last_seen"] <= PEER_TIMEOUT_S else "gone"


class SessionError(CrowdtrainError):
    """A session token that is unknown or expired: register again."""


@dataclass(frozen=True)
class Session:
    token: str
    run_id: str
    peer_id: str
    public_key: bytes
    expires_at: float = 0.0
