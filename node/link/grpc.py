"""A node's control-plane calls to its coordinator over gRPC: register, heartbeat, lease,
report and leave.

Every call has a deadline and turns failures into :class:`CoordinatorError`
with a message a person can act on. What a call signs is a
:mod:`crowdtrain.protocol.messages` model, the one the coordinator parses.
Nothing here retries on its own; the caller decides whether to keep training
and try again later.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx

from crowdtrain.node.link.errors import CoordinatorError
from crowdtrain.node.link.http import HTTP_TIMEOUT, PROGRESS_MODES, download_file, tls_verify
from crowdtrain.node.link.pins import KeyPins
from crowdtrain.node.stats.traffic import Traffic
from crowdtrain.protocol import coordinator_pb2 as pb
from crowdtrain.protocol import coordinator_pb2_grpc as pb_grpc
from crowdtrain.protocol.errors import IdentityError, SpecError
from crowdtrain.protocol.identity import Identity, run_statement, seal, verify_signature
from crowdtrain.protocol.messages import (
    HeartbeatPayload,
    ReceiptPayload,
    RegisterPayload,
    parse_payload,
)
from crowdtrain.protocol.rpc import (
    CALL_DEADLINE_S,
    CHANNEL_OPTIONS,
    KIND_HEARTBEAT,
    KIND_RECEIPT,
    KIND_REGISTER,
    envelope_to_pb,
)
from crowdtrain.protocol.runspec import RunSpec, parse_spec
from crowdtrain.protocol.shards import ShardManifest


@dataclass(frozen=True)
class Registration:
    peer_id: str
    session_token: str
    heartbeat_interval_s: float
    run: pb.RunInfo
    initial_peers: list[str]


class CoordinatorClient:
    """One node's calls to one coordinator. Thread-safe (gRPC channels are).

    ``tls`` speaks TLS to the gRPC server (the coordinator says so at
    discovery); ``ca_cert`` is a PEM file of the authority to trust, for
    coordinators with a private certificate (default: the system's roots).
    ``pins`` checks the coordinator's key before anything is signed for it.
    ``progress`` (the node's progress mode) is how downloads show their progress
    (see :class:`TransferProgress`). ``traffic`` counts the bytes of every call
    (control) and download (data, unless the caller names another purpose).
    """

    def __init__(
        self,
        url: str,
        grpc_target: str,
        identity: Identity,
        tls: bool = False,
        ca_cert: Path | None = None,
        pins: KeyPins | None = None,
        progress: str = "auto",
        traffic: Traffic | None = None,
    ):
        if progress not in PROGRESS_MODES:
            raise ValueError(f"progress {progress!r} is not one of {', '.join(PROGRESS_MODES)}")
        self.progress = progress
        self.traffic = traffic if traffic is not None else Traffic()
        self.url = url.rstrip("/")
        self.grpc_target = grpc_target
        self.identity = identity
        self.tls = tls
        self.pins = pins
        self._root_certificates = ca_cert.read_bytes() if ca_cert else None
        self._channel = self._open_channel()
        self._stub = pb_grpc.CoordinatorStub(self._channel)
        self._http = httpx.Client(timeout=HTTP_TIMEOUT, verify=tls_verify(ca_cert))

    def _open_channel(self) -> grpc.Channel:
        if self.tls:
            credentials = grpc.ssl_channel_credentials(root_certificates=self._root_certificates)
            return grpc.secure_channel(self.grpc_target, credentials, options=CHANNEL_OPTIONS)
        return grpc.insecure_channel(self.grpc_target, options=CHANNEL_OPTIONS)

    def suspend(self) -> None:
        """Close the gRPC channel (before a fork); :meth:`reopen` makes a new one."""
        self._channel.close()

    def reopen(self) -> None:
        self._channel = self._open_channel()
        self._stub = pb_grpc.CoordinatorStub(self._channel)

    def close(self) -> None:
        self._channel.close()
        self._http.close()

    def _call(self, name: str, request: Any, token: str | None = None) -> Any:
        metadata = (("authorization", f"Bearer {token}"),) if token is not None else None
        self.traffic.add("control", sent=request.ByteSize() + len(token or ""))
        try:
            reply = getattr(self._stub, name)(request, timeout=CALL_DEADLINE_S, metadata=metadata)
        except grpc.RpcError as e:
            code = e.code()
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                message = f"coordinator at {self.grpc_target} is unreachable ({code.name})"
            else:
                message = e.details() or code.name
            raise CoordinatorError(message, code) from None
        self.traffic.add("control", received=reply.ByteSize())
        return reply

    def register(
        self, run_id: str, name: str, device: str, versions: str, invite: str = ""
    ) -> Registration:
        """Answer a fresh challenge with a signed registration; returns the session."""
        challenge = self._call("Challenge", pb.ChallengeRequest(run_id=run_id))
        if self.pins is not None:
            self.pins.check(self.url, challenge.coordinator_public_key)
        # parse_payload: a name or invite the coordinator would refuse is refused here,
        # with the same message (a PayloadError, which the command line shows in a line).
        payload: RegisterPayload = parse_payload(
            RegisterPayload,
            {
                "challenge": challenge.challenge,
                "name": name,
                "device": device,
                "versions": versions,
                "invite": invite,
            },
        )
        envelope = seal(self.identity, KIND_REGISTER, payload.model_dump())
        reply = self._call(
            "Register", pb.RegisterRequest(run_id=run_id, envelope=envelope_to_pb(envelope))
        )
        if reply.run.coordinator_public_key != challenge.coordinator_public_key:
            raise CoordinatorError("the coordinator's key changed during registration")
        return Registration(
            peer_id=reply.peer_id,
            session_token=reply.session_token,
            heartbeat_interval_s=reply.heartbeat_interval_s,
            run=reply.run,
            initial_peers=list(reply.initial_peers),
        )

    def heartbeat(self, token: str, payload: HeartbeatPayload) -> pb.HeartbeatReply:
        envelope = seal(self.identity, KIND_HEARTBEAT, payload.model_dump())
        return self._call(
            "Heartbeat", pb.HeartbeatRequest(envelope=envelope_to_pb(envelope)), token
        )

    def lease(self, token: str, max_shards: int, resume: bool = False) -> list[pb.Lease]:
        reply = self._call(
            "LeaseShards", pb.LeaseRequest(max_shards=max_shards, resume=resume), token
        )
        return list(reply.leases)

    def report(self, token: str, receipt: ReceiptPayload) -> bool:
        envelope = seal(self.identity, KIND_RECEIPT, receipt.model_dump())
        reply = self._call("ReportShard", pb.ShardReport(envelope=envelope_to_pb(envelope)), token)
        return bool(reply.accepted)

    def leave(self, token: str) -> None:
        self._call("Leave", pb.LeaveRequest(), token)

    def download(
        self,
        url: str,
        dest: Path,
        max_bytes: int | None = None,
        purpose: str = "data",
        sha256: str | None = None,
    ) -> None:
        """Stream ``url`` into ``dest`` (via a temporary file, so a partial file never shows),
        refusing more than ``max_bytes`` as they arrive and, given ``sha256``, a file that
        does not hash to it; its bytes count as ``purpose``."""
        download_file(
            self._http, url, dest, dest.name, self.progress, sha256=sha256, max_bytes=max_bytes
        )
        self.traffic.add(purpose, received=dest.stat().st_size)


def check_run(run: Any) -> tuple[RunSpec, ShardManifest]:
    """A registration's run (RunInfo), checked: the coordinator's signature of it, and
    its spec and manifest against their published hashes."""
    try:
        verify_signature(
            run.coordinator_public_key,
            run.run_signature,
            run_statement(run.run_id, run.spec_hash, run.manifest_hash),
        )
    except IdentityError:
        raise SpecError(
            f"run {run.run_id}: the coordinator's signature of the run does not verify; "
            "its spec or data may have been altered: do not train on it"
        ) from None
    spec = parse_spec(run.spec_toml, source=f"run {run.run_id} from the coordinator")
    if spec.hash != run.spec_hash:
        raise SpecError(
            f"run {run.run_id}: the spec's hash {spec.hash[:16]} does not match the "
            f"published {run.spec_hash[:16]}; this crowdtrain may be too old or too new "
            "for the coordinator"
        )
    manifest = ShardManifest.from_json(run.manifest_json)
    if manifest.hash != run.manifest_hash:
        raise SpecError(f"run {run.run_id}: the data manifest does not match its hash")
    return spec, manifest
