"""Who is calling: one-time registration challenges and the session interceptor.

Every gRPC call except ``Challenge``, ``Register`` and ``GetRun`` carries
``authorization: Bearer <session token>`` in its metadata. One server
interceptor checks it before any handler runs and hands the handler the
:class:`~crowdtrain.coordinator.runs.peers.Session` through :func:`current_session`.
The interceptor also turns requests that are not valid protobuf, or larger
than :data:`MAX_REQUEST_BYTES`, into INVALID_ARGUMENT before they reach a
handler.
"""

from __future__ import annotations

import contextvars
import logging
import secrets
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from crowdtrain.coordinator.api.refusals import Refusals
from crowdtrain.coordinator.records import Session, SessionError
from crowdtrain.protocol.errors import AccessError, CrowdtrainError, IdentityError

logger = logging.getLogger(__name__)

# No request a node sends is near this; larger ones are refused before parsing.
MAX_REQUEST_BYTES = 256 * 1024
CHALLENGE_TTL_S = 60.0
_MAX_OPEN_CHALLENGES = 100_000
OPEN_METHODS = frozenset({"Challenge", "Register", "GetRun"})

_SESSION: contextvars.ContextVar[Session] = contextvars.ContextVar("crowdtrain_session")


def current_session() -> Session:
    """The session of the call being handled (set by :class:`SessionInterceptor`)."""
    return _SESSION.get()


class ChallengeBook:
    """One-time values a node must sign to register; in memory, each valid for a minute."""

    def __init__(self, ttl_s: float = CHALLENGE_TTL_S, clock: Callable[[], float] = time.monotonic):
        self.ttl_s = ttl_s
        self._clock = clock
        self._open: dict[bytes, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def issue(self, run_id: str) -> bytes:
        now = self._clock()
        with self._lock:
            if len(self._open) >= _MAX_OPEN_CHALLENGES:
                self._open = {c: v for c, v in self._open.items() if v[1] > now}
                if len(self._open) >= _MAX_OPEN_CHALLENGES:
                    raise CrowdtrainError("too many registrations at once; try again in a minute")
            challenge = secrets.token_bytes(32)
            self._open[challenge] = (run_id, now + self.ttl_s)
            return challenge

    def check(self, challenge: bytes, run_id: str) -> None:
        """Raise :class:`IdentityError` unless ``challenge`` is open for ``run_id``."""
        with self._lock:
            entry = self._open.get(challenge)
        if entry is None:
            raise IdentityError(
                "unknown or already used challenge; ask for a new one (Challenge) and sign it"
            )
        if entry[0] != run_id:
            raise IdentityError("the challenge was issued for another run")
        if entry[1] < self._clock():
            raise IdentityError("the challenge expired; ask for a new one")

    def consume(self, challenge: bytes) -> None:
        with self._lock:
            self._open.pop(challenge, None)


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
                session = authenticate(_bearer(metadata))
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
