"""A node's connection to its coordinator: HTTP for discovery and files, gRPC for control.

Every call has a deadline and turns failures into :class:`CoordinatorError`
with a message a person can act on. Nothing here retries on its own; the
caller decides whether to keep training and try again later.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx

from crowdtrain.protocol import coordinator_pb2 as pb
from crowdtrain.protocol import coordinator_pb2_grpc as pb_grpc
from crowdtrain.protocol.errors import CrowdtrainError
from crowdtrain.protocol.identity import Identity, seal
from crowdtrain.protocol.rpc import (
    CALL_DEADLINE_S,
    CHANNEL_OPTIONS,
    KIND_HEARTBEAT,
    KIND_RECEIPT,
    KIND_REGISTER,
    envelope_to_pb,
)

logger = logging.getLogger(__name__)

_HTTP_TIMEOUT = httpx.Timeout(10.0, read=60.0)


class CoordinatorError(CrowdtrainError):
    """The coordinator could not be reached or refused a request."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.code = code

    @property
    def unauthenticated(self) -> bool:
        return self.code == grpc.StatusCode.UNAUTHENTICATED

    @property
    def unreachable(self) -> bool:
        return self.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


@dataclass(frozen=True)
class Registration:
    peer_id: str
    session_token: str
    heartbeat_interval_s: float
    run: pb.RunInfo
    initial_peers: list[str]


def discover(url: str) -> dict[str, Any]:
    """Ask the coordinator's HTTP server where its gRPC server and DHT are."""
    url = url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise CoordinatorError(
            f"coordinator URL {url!r} must start with http:// or https:// "
            "(the address you open in a browser)"
        )
    try:
        response = httpx.get(f"{url}/api/endpoints", timeout=_HTTP_TIMEOUT)
    except httpx.HTTPError as e:
        raise CoordinatorError(
            f"cannot reach the coordinator at {url} ({type(e).__name__}: {e}); check the "
            "address and that `crowdtrain-coordinator serve` is running there"
        ) from None
    if response.status_code != 200:
        raise CoordinatorError(
            f"{url} answered HTTP {response.status_code} for /api/endpoints; "
            "is this a crowdtrain coordinator?"
        )
    try:
        endpoints = response.json()
        str(endpoints["grpc_target"])
    except (ValueError, KeyError, TypeError):
        raise CoordinatorError(f"{url} is not a crowdtrain coordinator") from None
    return endpoints


class CoordinatorClient:
    """One node's calls to one coordinator. Thread-safe (gRPC channels are)."""

    def __init__(self, url: str, grpc_target: str, identity: Identity):
        self.url = url.rstrip("/")
        self.grpc_target = grpc_target
        self.identity = identity
        self._channel = grpc.insecure_channel(grpc_target, options=CHANNEL_OPTIONS)
        self._stub = pb_grpc.CoordinatorStub(self._channel)
        self._http = httpx.Client(timeout=_HTTP_TIMEOUT)

    def suspend(self) -> None:
        """Close the gRPC channel (before a fork); :meth:`reopen` makes a new one."""
        self._channel.close()

    def reopen(self) -> None:
        self._channel = grpc.insecure_channel(self.grpc_target, options=CHANNEL_OPTIONS)
        self._stub = pb_grpc.CoordinatorStub(self._channel)

    def close(self) -> None:
        self._channel.close()
        self._http.close()

    def _call(self, name: str, request: Any) -> Any:
        try:
            return getattr(self._stub, name)(request, timeout=CALL_DEADLINE_S)
        except grpc.RpcError as e:
            code = e.code()
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                message = f"coordinator at {self.grpc_target} is unreachable ({code.name})"
            else:
                message = e.details() or code.name
            raise CoordinatorError(message, code) from None

    def register(self, run_id: str, name: str, device: str, versions: str) -> Registration:
        envelope = seal(
            self.identity, KIND_REGISTER, {"name": name, "device": device, "versions": versions}
        )
        reply = self._call(
            "Register", pb.RegisterRequest(run_id=run_id, envelope=envelope_to_pb(envelope))
        )
        return Registration(
            peer_id=reply.peer_id,
            session_token=reply.session_token,
            heartbeat_interval_s=reply.heartbeat_interval_s,
            run=reply.run,
            initial_peers=list(reply.initial_peers),
        )

    def heartbeat(self, token: str, payload: dict[str, Any]) -> pb.HeartbeatReply:
        envelope = seal(self.identity, KIND_HEARTBEAT, payload)
        return self._call(
            "Heartbeat",
            pb.HeartbeatRequest(session_token=token, envelope=envelope_to_pb(envelope)),
        )

    def lease(self, token: str, max_shards: int, resume: bool = False) -> list[pb.Lease]:
        reply = self._call(
            "LeaseShards",
            pb.LeaseRequest(session_token=token, max_shards=max_shards, resume=resume),
        )
        return list(reply.leases)

    def report(self, token: str, receipt: dict[str, Any]) -> bool:
        envelope = seal(self.identity, KIND_RECEIPT, receipt)
        reply = self._call(
            "ReportShard", pb.ShardReport(session_token=token, envelope=envelope_to_pb(envelope))
        )
        return bool(reply.accepted)

    def leave(self, token: str) -> None:
        self._call("Leave", pb.LeaveRequest(session_token=token))

    def download(self, url: str, dest: Path) -> None:
        """Stream ``url`` into ``dest`` (via a temporary file, so a partial file never shows)."""
        tmp = dest.with_suffix(dest.suffix + ".part")
        try:
            with self._http.stream("GET", url) as response:
                if response.status_code != 200:
                    raise CoordinatorError(f"downloading {url} failed: HTTP {response.status_code}")
                with open(tmp, "wb") as f:
                    for chunk in response.iter_bytes(1 << 20):
                        f.write(chunk)
        except httpx.HTTPError as e:
            tmp.unlink(missing_ok=True)
            raise CoordinatorError(f"downloading {url} failed: {e}") from None
        tmp.replace(dest)
