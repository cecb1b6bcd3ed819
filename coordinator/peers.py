"""Peers of a run: registration, session tokens, heartbeats and leaving.

Takes envelopes that :mod:`crowdtrain.protocol.identity` already verified and
payloads already parsed; decides what they mean and stores it.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass

from crowdtrain.coordinator.runs import get_run
from crowdtrain.coordinator.store import Store
from crowdtrain.protocol.errors import CrowdtrainError
from crowdtrain.protocol.identity import OpenedEnvelope
from crowdtrain.protocol.messages import HeartbeatPayload, RegisterPayload


class SessionError(CrowdtrainError):
    """A session token that is unknown or expired: register again."""


@dataclass(frozen=True)
class PeerConfig:
    """How long sessions live and how often nodes check in."""

    session_ttl_s: float = 3600.0
    heartbeat_interval_s: float = 2.0


@dataclass(frozen=True)
class Session:
    token: str
    run_id: str
    peer_id: str
    public_key: bytes


def register(
    store: Store, config: PeerConfig, run_id: str, opened: OpenedEnvelope, info: RegisterPayload
) -> Session:
    """Record a peer joining ``run_id`` and open a session for it."""
    get_run(store, run_id)
    now = time.time()
    token = secrets.token_urlsafe(32)
    store.upsert_peer(
        {
            "run_id": run_id,
            "peer_id": opened.peer_id,
            "public_key": opened.public_key,
            "name": info.name,
            "device": info.device,
            "versions": info.versions,
            "now": now,
        },
        {
            "token": token,
            "run_id": run_id,
            "peer_id": opened.peer_id,
            "expires_at": now + config.session_ttl_s,
        },
    )
    return Session(token=token, run_id=run_id, peer_id=opened.peer_id, public_key=opened.public_key)


def authenticate(store: Store, token: str) -> Session:
    """The session a token belongs to, or :class:`SessionError`."""
    row = store.get_session(token) if token else None
    if row is None or row["expires_at"] < time.time():
        raise SessionError("unknown or expired session token; register again")
    peer = store.get_peer(row["run_id"], row["peer_id"])
    assert peer is not None, "a session always has its peer"
    return Session(
        token=token, run_id=row["run_id"], peer_id=row["peer_id"], public_key=peer["public_key"]
    )


def heartbeat(store: Store, config: PeerConfig, session: Session, beat: HeartbeatPayload) -> None:
    """Apply a heartbeat: counters, liveness, evaluations; renews the session."""
    now = time.time()
    evaluations = [
        {
            "run_id": session.run_id,
            "peer_id": session.peer_id,
            "step": e.step,
            "num_tokens": e.num_tokens,
            "val_loss": e.loss,
            "bits_per_byte": e.bits_per_byte,
            "time": now,
        }
        for e in beat.evaluations
    ]
    store.record_heartbeat(
        {
            "run_id": session.run_id,
            "peer_id": session.peer_id,
            "session_key": beat.session_key,
            "num_tokens": beat.num_tokens,
            "num_sequences": beat.num_sequences,
            "tokens_per_s": beat.tokens_per_s,
            "loss": beat.loss,
            "step": beat.step,
            "device": beat.device,
            "now": now,
        },
        evaluations,
    )
    store.extend_session(session.token, now + config.session_ttl_s)


def leave(store: Store, session: Session) -> None:
    """A peer leaves on purpose: it is shown as left and its leases return."""
    store.end_session(session.token, session.run_id, session.peer_id)
