"""Who is calling: registration challenges and the session interceptor.

Every gRPC call except ``Challenge``, ``Register`` and ``GetRun`` carries
``authorization: Bearer <session token>`` in its metadata. One server
interceptor checks it before any handler runs and hands the handler the
:class:`~crowdtrain.coordinator.runs.peers.Session` through :func:`current_session`.
The interceptor also turns requests that are not valid protobuf, or larger
than :data:`MAX_REQUEST_BYTES`, into INVALID_ARGUMENT before they reach a
handler.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import hmac
import logging
import secrets
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from crowdtrain.coordinator.api.refusals import Refusals
from crowdtrain.coordinator.records import Session, SessionError
from crowdtrain.protocol.errors import AccessError, IdentityError

logger = logging.getLogger(__name__)

# No request a node sends is near this; larger ones are refused before parsing.
MAX_REQUEST_BYTES = 256 * 1024
CHALLENGE_TTL_S = 60.0
OPEN_METHODS = frozenset({"Challenge", "Register", "GetRun"})

_SESSION: contextvars.ContextVar[Session] = contextvars.ContextVar("crowdtrain_session")


def current_session() -> Session:
    """The session of the call being handled (set by :class:`SessionInterceptor`)."""
    return _SESSION.get()


class ChallengeBook:
    """Registration challenges that cost this process no memory.

    A challenge is ``expiry | random | MAC(run, expiry, random)`` under a key
    only this process knows: checking one needs nothing stored, so no number
    of ``Challenge`` calls can fill a book and lock registration. It proves
    the registration was signed now (within ``ttl_s``); a replay of the same
    signed registration is refused by its nonce (the register guard).
    """

    _EXPIRY = struct.Struct(">d")
    _RANDOM_BYTES = 12
    _MAC_BYTES = 16

    def __init__(self, ttl_s: float = CHALLENGE_TTL_S, clock: Callable[[], float] = time.monotonic):
        self.ttl_s = ttl_s
        self._clock = clock
        self._key = secrets.token_bytes(32)

    def _mac(self, run_id: str, head: bytes) -> bytes:
        message = head + run_id.encode()
        return hmac.new(self._key, message, hashlib.sha256).digest()[: self._MAC_BYTES]

    def issue(self, run_id: str) -> bytes:
        head = self._EXPIRY.pack(self._clock() + self.ttl_s)
        head += secrets.token_bytes(self._RANDOM_BYTES)
        return head + self._mac(run_id, head)

    def check(self, challenge: bytes, run_id: str) -> None:
        """Raise :class:`IdentityError` unless this process issued ``challenge`` for
        ``run_id`` less than ``ttl_s`` ago."""
        split = self._EXPIRY.size + self._RANDOM_BYTES
        head, mac = challenge[:split], challenge[split:]
        if len(mac) != self._MAC_BYTES or not hmac.compare_digest(mac, self._mac(run_id, head)):
            raise IdentityError(
                "a challenge this coordinator did not issue for this run (or issued before "
                "it restarted); ask for a new one (Challenge) and sign it"
            )
        if self._EXPIRY.unpack(head[: self._EXPIRY.size])[0] < self._clock():
            raise IdentityError("the challenge expired; ask for a new one")


class _Malformed:
    """Stands for a request that did not parse."""

    def __init__(self, reason: str):
        self.reason = reason


def _safe(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        if len(data) > MAX_REQUEST_BYTES:
            return _Malformed(
                f"request of {len(data)} bytes exceeds the limit of {MAX_REQUEST_BYTES}"
            )
        try:
            return deserializer(data) if deserializer is not None else data
        except Exception as e:  # protobuf raises DecodeError and others for garbage
            return _Malformed(f"request is not a valid protobuf message ({type(e).__name__})")

    return parse


def _bearer(metadata: Any) -> str:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer ") :].strip()
    return ""


class SessionInterceptor(grpc.aio.ServerInterceptor):
    """Checks every call's session (or the shape of an open call's request) first."""

    def __init__(self, authenticate: Callable[[str], Session], refusals: Refusals):
        self._authenticate = authenticate
        self._refusals = refusals

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        method = handler_call_details.method.rsplit("/", 1)[-1]
        inner = handler.unary_unary
        needs_session = method not in OPEN_METHODS
        metadata = handler_call_details.invocation_metadata
        refusals, authenticate = self._refusals, self._authenticate

        async def checked(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, _Malformed):
                refusals.count(method, "INVALID_ARGUMENT")
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
            if not needs_session:
                return await inner(request, context)
            try:
                session = await asyncio.to_thread(authenticate, _bearer(metadata))
            except SessionError as e:
                refusals.count(method, "UNAUTHENTICATED")
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(e))
            except AccessError as e:
                refusals.count(method, "PERMISSION_DENIED")
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(e))
            token = _SESSION.set(session)
            try:
                return await inner(request, context)
            finally:
                _SESSION.reset(token)

        return grpc.unary_unary_rpc_method_handler(
            checked,
            request_deserializer=_safe(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )
