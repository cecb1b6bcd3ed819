"""Peers of a run: registration, session tokens, heartbeats and leaving.

Takes envelopes that :mod:`crowdtrain.protocol.identity` already verified and
payloads already parsed; decides what they mean and stores it, and says what
a node is told back (:class:`HeartbeatAnswer`). No HTTP or gRPC here.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any

from crowdtrain.coordinator.ledger.checks import flops_per_token
from crowdtrain.coordinator.ledger.ledger import Ledger
from crowdtrain.coordinator.ledger.views import peer_standing
from crowdtrain.coordinator.records import (
    PEER_TIMEOUT_S,
    PublishedRun,
    Session,
    SessionError,
    get_run,
    num_active_peers,
    roster,
)
from crowdtrain.coordinator.runs.access import check_invite, hash_secret
from crowdtrain.coordinator.runs.bindings import bind_swarm_ids
from crowdtrain.coordinator.runs.leases import LeaseBook
from crowdtrain.coordinator.store import Store, StoreError
from crowdtrain.protocol.devices import UNKNOWN_GPU
from crowdtrain.protocol.errors import AccessError
from crowdtrain.protocol.identity import DEFAULT_MAX_AGE_S, OpenedEnvelope, ReplayGuard
from crowdtrain.protocol.messages import HeartbeatPayload, ReceiptPayload, RegisterPayload

# Distinct peers that must report a sender's averaging parts, and how many dropped
# parts in all, before it is flagged: one early out-of-step round flags no one.
MIN_REPORTERS = 2
MIN_REPORTS = 3


@dataclass(frozen=True)
class PeerConfig:
    """How long sessions live and how often nodes check in.

    A session token is short-lived and is not renewed: when it expires the
    node answers a fresh challenge, which also re-checks bans and access.
    """

    session_ttl_s: float = 900.0
    heartbeat_interval_s: float = 2.0


def _admission(store: Store, run: PublishedRun, opened: OpenedEnvelope, invite: str) -> tuple:
    """How a peer may join: (admitted_via, invite hash to spend or None); AccessError if not."""
    ban = store.get_ban(run.id, opened.peer_id)
    if ban is not None:
        raise AccessError(f"this peer is banned from run {run.id!r}: {ban['reason']}")
    if store.get_peer(run.id, opened.peer_id) is not None:
        return "returning", None
    mode = run.spec.access.mode
    if mode == "open":
        return "open", None
    if mode == "allowlist":
        if opened.public_key.hex() not in run.spec.access.allowlist:
            raise AccessError(
                f"run {run.id!r} admits only listed keys and this node's public key "
                f"{opened.public_key.hex()} is not on its allowlist; send it to the run's "
                "operator (`crowdtrain-node identity` prints it)"
            )
        return "allowlist", None
    code_hash = check_invite(store, run.id, invite)
    return f"invite {invite[:8]}", code_hash


def register(
    store: Store, config: PeerConfig, run_id: str, opened: OpenedEnvelope, info: RegisterPayload
) -> Session:
    """Admit a peer to ``run_id`` (bans, access mode, invite) and open a session for it."""
    run = get_run(store, run_id)
    admitted_via, invite_hash = _admission(store, run, opened, info.invite)
    now = time.time()
    token = secrets.token_urlsafe(32)
    expires_at = now + config.session_ttl_s
    try:
        store.upsert_peer(
            {
                "run_id": run_id,
                "peer_id": opened.peer_id,
                "public_key": opened.public_key,
                "name": info.name,
                "device": info.device,
                "versions": info.versions,
                "now": now,
                "admitted_via": admitted_via,
            },
            {
                "token_hash": hash_secret(token),
                "run_id": run_id,
                "peer_id": opened.peer_id,
                "expires_at": expires_at,
            },
            invite_hash=invite_hash,
        )
    except StoreError as e:  # the invite was spent by a concurrent registration
        raise AccessError(str(e)) from None
    return Session(
        token=token,
        run_id=run_id,
        peer_id=opened.peer_id,
        public_key=opened.public_key,
        expires_at=expires_at,
    )


def session_replay_guard(store: Store, now: float | None = None) -> ReplayGuard:
    """The guard against replayed session messages (heartbeats, receipts): each nonce it
    takes is journalled in the store, and those still young enough to be replayed are
    loaded back, so a restart of the coordinator does not reopen a replay window."""
    now = time.time() if now is None else now
    guard = ReplayGuard(journal=store.remember_nonce)
    for row in store.recent_nonces(since=now - 2 * DEFAULT_MAX_AGE_S):
        guard.remember(row["public_key"], row["nonce"], row["timestamp"])
    return guard


def authenticate(store: Store, token: str) -> Session:
    """The session a token belongs to; :class:`SessionError` or, if banned, AccessError."""
    row = store.get_session(hash_secret(token)) if token else None
    if row is None or row["expires_at"] < time.time():
        raise SessionError("unknown or expired session token; register again")
    ban = store.get_ban(row["run_id"], row["peer_id"])
    if ban is not None:
        raise AccessError(f"this peer is banned from run {row['run_id']!r}: {ban['reason']}")
    peer = store.get_peer(row["run_id"], row["peer_id"])
    assert peer is not None, "a session always has its peer"
    return Session(
        token=token,
        run_id=row["run_id"],
        peer_id=row["peer_id"],
        public_key=peer["public_key"],
        expires_at=row["expires_at"],
    )


def heartbeat(store: Store, session: Session, beat: HeartbeatPayload) -> None:
    """Apply a heartbeat: swarm ids (checked, :mod:`bindings`), counters and the time
    split (bounded by what is possible), liveness, evaluations and reports, and the run's
    step."""
    peer = store.get_peer(session.run_id, session.peer_id)
    assert peer is not None, "a session always has its peer"
    if beat.dht_peer_id or beat.progress_key:
        bind_swarm_ids(store, session, peer, beat.dht_peer_id, beat.progress_key, beat.swarm_proof)
    now = time.time()
    run = get_run(store, session.run_id)
    max_tokens, max_bytes = possible_counts(run, peer, now)
    evaluations = [
        {
            "run_id": session.run_id,
            "peer_id": session.peer_id,
            "step": e.step,
            "num_tokens": min(e.num_tokens, max_tokens),
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
            "num_tokens": min(beat.num_tokens, max_tokens),
            "num_sequences": min(beat.num_sequences, max_tokens // run.spec.model.seq_len),
            "tokens_per_s": beat.tokens_per_s,
            "loss": beat.loss,
            "step": beat.step,
            "device": beat.device,
            "num_skipped_steps": min(beat.num_skipped_steps, max_tokens),
            "now": now,
        },
        evaluations,
        [
            {
                "run_id": session.run_id,
                "peer_id": session.peer_id,
                "session_key": beat.session_key,
                "purpose": purpose,
                "sent": min(count.sent, max_bytes),
                "received": min(count.received, max_bytes),
            }
            for purpose, count in beat.traffic.items()
        ],
        _time_split_row(session, beat, possible_seconds(peer, now)),
    )
    store.raise_run_step(session.run_id, agreed_step(store, session.run_id, now))
    if beat.reports:
        _take_reports(store, session, beat, now)


# Counters a heartbeat may report: what the fastest device known could have trained
# (bytes: what a 100 Gbit/s link could have carried) since the peer first registered,
# plus this long. Honest counters are far below; a claim of 2**62 tokens is not.
COUNTER_GRACE_S = 3600.0
MAX_BYTES_PER_S = 12.5e9


def possible_seconds(peer: dict, now: float) -> float:
    """The most seconds a peer's node process can have run by ``now``: since the peer
    first registered, plus the grace."""
    return max(0.0, now - float(peer["registered_at"])) + COUNTER_GRACE_S


def possible_counts(run: PublishedRun, peer: dict, now: float) -> tuple[int, int]:
    """The most tokens and bytes a peer's node process can have counted by ``now``."""
    age_s = possible_seconds(peer, now)
    tokens = age_s * UNKNOWN_GPU.max_flops / flops_per_token(run.spec)
    return int(tokens), int(age_s * MAX_BYTES_PER_S)


def _time_split_row(
    session: Session, beat: HeartbeatPayload, max_seconds: float
) -> dict[str, Any] | None:
    """The heartbeat's time split as a ``peer_time`` row, each part at most
    ``max_seconds``; None from a node too old to send one."""
    if beat.time is None:
        return None
    return {
        "run_id": session.run_id,
        "peer_id": session.peer_id,
        "session_key": beat.session_key,
        **{part: min(seconds, max_seconds) for part, seconds in beat.time.model_dump().items()},
    }


def agreed_step(store: Store, run_id: str, now: float) -> int:
    """The run's step as its live peers report it, which no single peer can move: the
    lower median of live, unflagged peers' steps; only those of peers with a verified
    receipt when any has one (fresh identities then count for nothing). The run's step
    only ever rises (:meth:`raise_run_step`)."""
    return step_medians(store, run_id, now)[0]


def leading_step(store: Store, run_id: str, now: float) -> int:
    """How far ahead of the run's step the swarm may be: the upper median of the same
    steps. State a peer serves may be this new: with two peers, one behind (a peer
    catching up) must not hold the other's state back as "ahead of the run"."""
    return step_medians(store, run_id, now)[1]


def step_medians(store: Store, run_id: str, now: float) -> tuple[int, int]:
    """The lower and upper median of the steps :func:`agreed_step` reads."""
    rows = store.live_peer_steps(run_id, since=now - PEER_TIMEOUT_S)
    credited = [int(r["step"]) for r in rows if r["credited"]]
    steps = sorted(credited or [int(r["step"]) for r in rows])
    if not steps:
        return 0, 0
    return steps[(len(steps) - 1) // 2], steps[len(steps) // 2]


@dataclass(frozen=True)
class HeartbeatAnswer:
    """What a node learns from its heartbeat: the run's step and number of live peers,
    the averaging weight each swarm peer may claim (:func:`roster`), and the node's own
    verified credit in the ledger."""

    step: int
    num_peers: int
    roster: tuple[tuple[str, float], ...]
    verified_tokens: int
    verified_share: float


def take_heartbeat(
    store: Store, leases: LeaseBook, session: Session, beat: HeartbeatPayload
) -> HeartbeatAnswer:
    """A node's heartbeat, whole: apply it (:func:`heartbeat`), renew the leases it says
    it still holds, and answer with what the node should know now.

    Raises :class:`~crowdtrain.coordinator.records.UnknownRunError` for a session's run
    that is not here, AccessError for a swarm id that belongs to another peer.
    """
    run = get_run(store, session.run_id)
    heartbeat(store, session, beat)
    leases.renew(run, session, {(h.shard_id, h.epoch) for h in beat.leases})
    # Read again: the swarm's progress may have raised the step since get_run.
    stored = store.get_run(run.id)
    assert stored is not None, "a session's run is never deleted"
    verified_tokens, verified_share = peer_standing(store, run.id, session.peer_id)
    return HeartbeatAnswer(
        step=int(stored["step"]),
        num_peers=num_active_peers(store, run.id),
        roster=tuple(roster(store, run)),
        verified_tokens=verified_tokens,
        verified_share=verified_share,
    )


def _take_reports(store: Store, session: Session, beat: HeartbeatPayload, now: float) -> None:
    """Store what a peer dropped from whom (about peers of this run only); flag a sender
    that most other live peers with verified credit report.

    Identities are free in an open run: reporters without a verified receipt are
    stored and shown but count for nothing, so a few fresh sybils cannot flag an
    honest peer (and so take its averaging weight away through the roster).
    """
    reported_peers = {
        dht_id: store.peer_by_dht_id(session.run_id, dht_id)
        for dht_id in {r.dht_peer_id for r in beat.reports}
    }
    store.record_reports(
        [
            {
                "run_id": session.run_id,
                "reporter": session.peer_id,
                "dht_peer_id": r.dht_peer_id,
                "reason": r.reason,
                "count": r.count,
                "now": now,
            }
            for r in beat.reports
            if reported_peers[r.dht_peer_id] is not None
        ]
    )
    for dht_peer_id, reported in reported_peers.items():
        if reported is None or reported["flagged"]:
            continue
        rows = store.reports_about(session.run_id, dht_peer_id)
        credited = {
            p["peer_id"]
            for p in store.live_peers(session.run_id, since=now - PEER_TIMEOUT_S)
            if p["peer_id"] != reported["peer_id"]
            and p["state"] == "active"
            and store.verified_tokens(session.run_id, p["peer_id"]) > 0
        }
        reporters = {r["reporter"] for r in rows} & credited
        # Two credited reporters at least, and most other live credited peers: one peer
        # alone (or a false positive of one guard) never flags another.
        events = sum(r["count"] for r in rows if r["reporter"] in reporters)
        needed = max(MIN_REPORTERS, len(credited) // 2 + 1)
        if len(reporters) >= needed and events >= MIN_REPORTS:
            reasons = sorted({r["reason"] for r in rows if r["reporter"] in reporters})
            store.flag_peer(
                session.run_id,
                reported["peer_id"],
                f"averaging parts dropped by {len(reporters)} peer(s) with verified work: "
                f"{', '.join(reasons)}",
            )


def take_receipt(
    store: Store,
    leases: LeaseBook,
    ledger: Ledger | None,
    session: Session,
    receipt: ReceiptPayload,
    sent_at: float,
) -> None:
    """A node's receipt for a shard: its lease completes and the ledger (when this
    coordinator keeps one) assesses the work it claims, in one transaction. ``sent_at`` is the signed
    envelope's timestamp. Raises :class:`~crowdtrain.coordinator.runs.leases.ReceiptError`
    for a shard the peer does not hold, and stores nothing then."""
    run = get_run(store, session.run_id)
    if ledger is None:
        leases.complete(run, session, receipt)
        return
    judged = leases.complete(
        run, session, receipt, lambda lease: ledger.judge(run, session, receipt, sent_at, lease)
    )
    assert judged is not None
    ledger.announce(judged.check)


def leave(store: Store, leases: LeaseBook, session: Session) -> None:
    """A peer leaves on purpose: it is shown as left and its leases return at once."""
    leases.release(session)
    store.end_session(hash_secret(session.token), session.run_id, session.peer_id)
