"""The gRPC service nodes talk to. Handlers only translate.

Each method parses its request (envelope, payload), calls a domain function
in :mod:`~crowdtrain.coordinator.runs.peers`, :mod:`~crowdtrain.coordinator.runs.leases`
or the ledger, and formats the answer. The
session was already checked by :class:`~crowdtrain.coordinator.api.auth.SessionInterceptor`.
Every failure becomes a status code with a message; none changes stored
state (a signed session message's nonce is journalled, so a replay stays
refused after a restart).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from crowdtrain.coordinator import records
from crowdtrain.coordinator.api.auth import ChallengeBook, current_session
from crowdtrain.coordinator.api.refusals import Refusals
from crowdtrain.coordinator.ledger.ledger import Ledger
from crowdtrain.coordinator.runs import leases, peers
from crowdtrain.coordinator.runs.leases import LeaseBook
from crowdtrain.coordinator.store import Store
from crowdtrain.protocol import api
from crowdtrain.protocol import coordinator_pb2 as pb
from crowdtrain.protocol import coordinator_pb2_grpc as pb_grpc
from crowdtrain.protocol.errors import (
    AccessError,
    CrowdtrainError,
    IdentityError,
    MalformedMessageError,
)
from crowdtrain.protocol.identity import (
    Identity,
    OpenedEnvelope,
    ReplayGuard,
    open_envelope,
)
from crowdtrain.protocol.messages import (
    HeartbeatPayload,
    PayloadError,
    ReceiptPayload,
    RegisterPayload,
    parse_payload,
)
from crowdtrain.protocol.rpc import (
    KIND_HEARTBEAT,
    KIND_RECEIPT,
    KIND_REGISTER,
    envelope_from_pb,
)

logger = logging.getLogger(__name__)

_STATUS: list[tuple[type[Exception], grpc.StatusCode]] = [
    (records.SessionError, grpc.StatusCode.UNAUTHENTICATED),
    (MalformedMessageError, grpc.StatusCode.INVALID_ARGUMENT),
    (IdentityError, grpc.StatusCode.UNAUTHENTICATED),
    (AccessError, grpc.StatusCode.PERMISSION_DENIED),
    (records.UnknownRunError, grpc.StatusCode.NOT_FOUND),
    (PayloadError, grpc.StatusCode.INVALID_ARGUMENT),
    (leases.ReceiptError, grpc.StatusCode.FAILED_PRECONDITION),
    (CrowdtrainError, grpc.StatusCode.INVALID_ARGUMENT),
]

R = TypeVar("R")
T = TypeVar("T")


async def _off_loop(function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a call that reads or writes the store (or checks signatures) in a worker
    thread: a slow write or a lock held by the verifier never stalls the event loop
    that every other request waits on."""
    return await asyncio.to_thread(function, *args, **kwargs)


_MAX_DETAIL_CHARS = 1024


def _translating(
    method: Callable[..., Awaitable[R]],
) -> Callable[..., Awaitable[R]]:
    """Turn our errors into gRPC status codes with their message."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> R:
        try:
            return await method(self, request, context)
        except CrowdtrainError as e:
            code = next(c for t, c in _STATUS if isinstance(e, t))
            self.refusals.count(method.__name__, code.name)
            logger.info("%s refused: %s", method.__name__, e)
            # Details travel in gRPC trailers, which clients cap at a few KiB.
            await context.abort(code, str(e)[:_MAX_DETAIL_CHARS])
            raise AssertionError("unreachable") from None

    return wrapper


class CoordinatorService(pb_grpc.CoordinatorServicer):
    def __init__(
        self,
        store: Store,
        config: peers.PeerConfig,
        initial_peers: Callable[[], list[str]],
        http_url: str,
        leases: LeaseBook,
        refusals: Refusals,
        identity: Identity,
        ledger: Ledger | None = None,
    ):
        self.store = store
        self.ledger = ledger
        self.leases = leases
        self.refusals = refusals
        self.config = config
        self.initial_peers = initial_peers
        self.http_url = http_url
        self.identity = identity
        self.challenges = ChallengeBook()
        # Registration is protected by its one-time challenge; session messages by
        # nonces journalled in the store, so a restart does not reopen a replay window.
        self.register_guard = ReplayGuard()
        self.session_guard = peers.session_replay_guard(store)

    def _run_info(self, run: records.PublishedRun) -> pb.RunInfo:
        return pb.RunInfo(
            run_id=run.id,
            spec_toml=run.row["spec_toml"],
            spec_hash=run.row["spec_hash"],
            manifest_json=run.row["manifest_json"],
            manifest_hash=run.row["manifest_hash"],
            step=run.row["step"],
            shard_base_url=api.url(self.http_url, api.SHARDS, run_id=run.id),
            coordinator_public_key=self.identity.public_key,
            run_signature=run.row["run_signature"],
        )

    def _open(self, message: pb.Envelope, kind: str, session: records.Session) -> OpenedEnvelope:
        return open_envelope(
            envelope_from_pb(message),
            kind,
            self.session_guard,
            expected_public_key=session.public_key,
        )

    @_translating
    async def Challenge(self, request: pb.ChallengeRequest, context: Any) -> pb.ChallengeReply:
        run = await _off_loop(records.get_run, self.store, request.run_id)
        return pb.ChallengeReply(
            challenge=self.challenges.issue(run.id),
            expires_in_s=self.challenges.ttl_s,
            coordinator_public_key=self.identity.public_key,
        )

    @_translating
    async def Register(self, request: pb.RegisterRequest, context: Any) -> pb.RegisterReply:
        run = await _off_loop(records.get_run, self.store, request.run_id)
        opened = open_envelope(
            envelope_from_pb(request.envelope), KIND_REGISTER, self.register_guard
        )
        info = parse_payload(RegisterPayload, opened.payload)
        self.challenges.check(info.challenge, run.id)
        session = await _off_loop(peers.register, self.store, self.config, run.id, opened, info)
        logger.info("peer %s (%s) registered for run %s", session.peer_id, info.name, run.id)
        return pb.RegisterReply(
            peer_id=session.peer_id,
            session_token=session.token,
            session_ttl_s=self.config.session_ttl_s,
            heartbeat_interval_s=self.config.heartbeat_interval_s,
            run=self._run_info(await _off_loop(records.get_run, self.store, run.id)),
            initial_peers=self.initial_peers(),
        )

    @_translating
    async def GetRun(self, request: pb.GetRunRequest, context: Any) -> pb.RunInfo:
        return self._run_info(await _off_loop(records.get_run, self.store, request.run_id))

    @_translating
    async def Heartbeat(self, request: pb.HeartbeatRequest, context: Any) -> pb.HeartbeatReply:
        session = current_session()
        opened = await _off_loop(self._open, request.envelope, KIND_HEARTBEAT, session)
        beat = parse_payload(HeartbeatPayload, opened.payload)
        answer = await _off_loop(peers.take_heartbeat, self.store, self.leases, session, beat)
        return pb.HeartbeatReply(
            step=answer.step,
            num_peers=answer.num_peers,
            roster=[
                pb.PeerAllowance(dht_peer_id=dht_id, max_weight=weight)
                for dht_id, weight in answer.roster
            ],
            verified_tokens=answer.verified_tokens,
            verified_share=answer.verified_share,
        )

    @_translating
    async def LeaseShards(self, request: pb.LeaseRequest, context: Any) -> pb.LeaseReply:
        session = current_session()
        run = await _off_loop(records.get_run, self.store, session.run_id)
        granted = await _off_loop(
            self.leases.grant, run, session, request.max_shards, resume=request.resume
        )
        return pb.LeaseReply(
            leases=[
                pb.Lease(shard_id=g.shard_id, epoch=g.epoch, expires_in_s=g.expires_in_s)
                for g in granted
            ]
        )

    @_translating
    async def ReportShard(self, request: pb.ShardReport, context: Any) -> pb.ShardReportReply:
        session = current_session()
        opened = await _off_loop(self._open, request.envelope, KIND_RECEIPT, session)
        receipt = parse_payload(ReceiptPayload, opened.payload)
        await _off_loop(
            peers.take_receipt,
            self.store,
            self.leases,
            self.ledger,
            session,
            receipt,
            sent_at=opened.timestamp,
        )
        return pb.ShardReportReply(accepted=True)

    @_translating
    async def Leave(self, request: pb.LeaveRequest, context: Any) -> pb.LeaveReply:
        session = current_session()
        await _off_loop(peers.leave, self.store, self.leases, session)
        logger.info("peer %s left run %s", session.peer_id, session.run_id)
        return pb.LeaveReply()
