"""The records every part of the coordinator shares: a published run and a peer's session.

:func:`get_run` turns a stored run into a :class:`PublishedRun` (its spec and
manifest parsed once per store); :class:`Session` is a registered peer's
session. They sit at the bottom of the coordinator's packages, above the
store only, so that every domain package can import them without a circle.
No HTTP or gRPC here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crowdtrain.coordinator.store import Store
from crowdtrain.protocol.errors import CrowdtrainError
from crowdtrain.protocol.runspec import RunSpec, parse_spec
from crowdtrain.protocol.shards import ShardManifest

# A peer that has not sent a heartbeat for this long is shown as gone.
PEER_TIMEOUT_S = 20.0
# The most averaging weight a peer may claim in one round, in target batches
# (hivemind's rounds overshoot the target; a 100x claim never passes).
MAX_WEIGHT_BATCHES = 4.0


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
    """Each live peer's swarm id with the most averaging weight others accept from it:
    :data:`MAX_WEIGHT_BATCHES` target batches, or nothing from a flagged or banned peer.
    Nodes get it with each heartbeat's answer; the keeper's round follower from a file."""
    now = time.time() if now is None else now
    limit = MAX_WEIGHT_BATCHES * run.spec.optimizer.target_batch_size
    return [
        (p["dht_peer_id"], 0.0 if p["flagged"] or p["state"] == "banned" else limit)
        for p in store.roster_rows(run.id, since=now - PEER_TIMEOUT_S)
    ]


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
