"""The live coordinator the fuzz tests attack, and the real peers they speak for.

One coordinator serves both fuzz modules (package-scoped fixtures): an open run
``tiny`` and an invite-only run ``locked``; a probe peer with a session, a peer
that left, and a banned one.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import httpx
import msgpack
import pytest

from crowdtrain.protocol import coordinator_pb2 as pb
from crowdtrain.protocol.identity import Envelope, Identity
from crowdtrain.protocol.rpc import KIND_HEARTBEAT, KIND_RECEIPT, KIND_REGISTER, envelope_to_pb
from tests.swarm import Swarm, write_spec
from tests.swarm_keys import SwarmKeys

SEED = int(os.environ.get("CROWDTRAIN_FUZZ_SEED", "4004"))
NUM_REQUESTS = 6000
BUDGET_S = 40.0  # the fuzz stops early rather than run past this
CALL_TIMEOUT_S = 10.0
SERVICE = "/crowdtrain.v1.Coordinator/"
REQUESTS: dict[str, type] = {
    "Challenge": pb.ChallengeRequest,
    "Register": pb.RegisterRequest,
    "GetRun": pb.GetRunRequest,
    "Heartbeat": pb.HeartbeatRequest,
    "LeaseShards": pb.LeaseRequest,
    "ReportShard": pb.ShardReport,
    "Leave": pb.LeaveRequest,
}
SESSION_METHODS = ("Heartbeat", "LeaseShards", "ReportShard", "Leave")
# A well-formed LeaseShards or Leave under the probe's own token would be a valid
# request (it changes leases or ends the session), so these two only ever carry the
# probe's token with a body that does not parse.
UNSIGNED_SESSION_METHODS = ("LeaseShards", "Leave")
Code = grpc.StatusCode
REFUSED = frozenset(
    {
        Code.INVALID_ARGUMENT,
        Code.UNAUTHENTICATED,
        Code.PERMISSION_DENIED,
        Code.NOT_FOUND,
        Code.FAILED_PRECONDITION,
        Code.RESOURCE_EXHAUSTED,
    }
)
MAX_REQUEST_BYTES = 256 * 1024  # the coordinator's limit (coordinator/auth.py)
MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # gRPC's own limit (protocol/rpc.py)
RUN_IDS = ("tiny", "locked")
VALID_READ = "valid read"


# The live coordinator and the peers the fuzz speaks for


@pytest.fixture(scope="package")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swarm]:
    """An open run ``tiny`` and an invite-only run ``locked`` behind one coordinator."""
    swarm = Swarm(root=tmp_path_factory.mktemp("fuzz"))
    try:
        data = swarm.prepare()
        assert swarm.publish(write_spec(swarm.root / "tiny.toml"), data).returncode == 0
        locked = write_spec(swarm.root / "locked.toml", run_id="locked")
        locked.write_text(locked.read_text() + '\n[access]\nmode = "invite"\n')
        assert swarm.publish(locked, data).returncode == 0
        swarm.start_coordinator()
        yield swarm
    finally:
        swarm.stop_all()


def admin_key(swarm: Swarm) -> str:
    return (swarm.coord_dir / "admin.key").read_text().strip()


class Wire:
    """Raw gRPC calls: the request as bytes, the answer as a status code."""

    def __init__(self, target: str):
        # No client-side size limits: oversized requests must reach the server.
        self.channel = grpc.insecure_channel(target)
        self._stubs: dict[str, Callable[..., bytes]] = {}

    def call(self, path: str, data: bytes, metadata: tuple | None = None) -> tuple[Code, bytes]:
        """The answer's status code, with the reply (OK) or the refusal's details."""
        stub = self._stubs.get(path)
        if stub is None:
            stub = self._stubs[path] = self.channel.unary_unary(path)
        try:
            return Code.OK, stub(data, metadata=metadata, timeout=CALL_TIMEOUT_S)
        except grpc.RpcError as e:
            return e.code(), (e.details() or "").encode()

    def ok(self, method: str, request: Any, metadata: tuple | None = None) -> bytes:
        code, reply = self.call(SERVICE + method, request.SerializeToString(), metadata)
        assert code == Code.OK, (method, code, reply)
        return reply


def bearer(token: str) -> tuple:
    return (("authorization", f"Bearer {token}"),)


FRESH = object()  # pack's default: a new nonce, the current time


def pack(kind: Any, payload: Any, nonce: Any = FRESH, timestamp: Any = FRESH) -> bytes:
    """An envelope body as :func:`~crowdtrain.protocol.identity.seal` makes it, any part
    replaceable by a bad one."""
    return msgpack.packb(
        {
            "kind": kind,
            "nonce": os.urandom(16) if nonce is FRESH else nonce,
            "timestamp": time.time() if timestamp is FRESH else timestamp,
            "payload": payload,
        },
        use_bin_type=True,
    )


def signed(identity: Identity, body: bytes) -> Envelope:
    return Envelope(body=body, signature=identity.sign(body), public_key=identity.public_key)


@dataclass
class Target:
    """Everything the fuzz needs to aim past the first checks."""

    wire: Wire
    probe: Identity  # registered, holds ``held``, already receipted ``done``
    token: str
    left_token: str  # a session that ended: a token the coordinator no longer knows
    banned: Identity
    banned_token: str
    stranger: Identity  # never registered
    admin_key: str
    dht_taken: str  # the swarm id of another peer of the run
    done: tuple[str, int]
    held: tuple[str, int]
    shard_ids: list[str]
    sent: dict[str, tuple[str, bytes]] = field(default_factory=dict)  # valid, already sent

    def heartbeat(self, **changes: Any) -> dict[str, Any]:
        payload = {
            "session_key": "fuzz-probe-session",
            "num_tokens": 512,
            "num_sequences": 8,
            "tokens_per_s": 100.0,
            "loss": 4.5,
            "step": 0,
            "device": "cpu",
            "leases": [{"shard_id": self.held[0], "epoch": self.held[1]}],
        }
        return {**payload, **changes}

    def receipt(self, shard: tuple[str, int], **changes: Any) -> dict[str, Any]:
        now = time.time()
        payload = {
            "shard_id": shard[0],
            "epoch": shard[1],
            "num_sequences": 8,
            "num_tokens": 512,
            "loss_sum": 40.0,
            "started": now - 1.0,
            "finished": now,
            "micro_batch_size": 8,
            "samples": [],
        }
        return {**payload, **changes}


def register(wire: Wire, identity: Identity, run_id: str = "tiny") -> tuple[str, bytes]:
    """A real registration; returns the session token and the request as sent."""
    reply = pb.ChallengeReply.FromString(wire.ok("Challenge", pb.ChallengeRequest(run_id=run_id)))
    payload = {"challenge": reply.challenge, "name": "fuzz", "device": "cpu", "versions": ""}
    envelope = signed(identity, pack(KIND_REGISTER, payload))
    request = pb.RegisterRequest(run_id=run_id, envelope=envelope_to_pb(envelope))
    registered = pb.RegisterReply.FromString(wire.ok("Register", request))
    return registered.session_token, request.SerializeToString()


@pytest.fixture(scope="package")
def target(live: Swarm) -> Target:
    """Three real peers: an active probe, one that left, and one the admin banned."""
    wire = Wire(live.ports["grpc_target"])
    probe, left, banned, stranger = (Identity.generate() for _ in range(4))
    left_keys = SwarmKeys()  # the peer that left bound its swarm ids, with their proof
    token, register_request = register(wire, probe)
    leases = pb.LeaseReply.FromString(
        wire.ok("LeaseShards", pb.LeaseRequest(max_shards=2), bearer(token))
    ).leases
    assert len(leases) == 2
    done, held = ((lease.shard_id, lease.epoch) for lease in leases)
    manifest = live.get("/api/runs/tiny/coverage")["shards"]
    f = Target(
        wire=wire,
        probe=probe,
        token=token,
        left_token=register(wire, left)[0],
        banned=banned,
        banned_token=register(wire, banned)[0],
        stranger=stranger,
        admin_key=admin_key(live),
        dht_taken=left_keys.dht_peer_id,
        done=done,
        held=held,
        shard_ids=[s["shard"] for s in manifest],
    )
    f.sent["register"] = ("Register", register_request)
    for name, method, kind, payload, who, tok in [
        ("heartbeat", "Heartbeat", KIND_HEARTBEAT, f.heartbeat(), probe, token),
        ("receipt", "ReportShard", KIND_RECEIPT, f.receipt(done), probe, token),
        (
            "left",
            "Heartbeat",
            KIND_HEARTBEAT,
            f.heartbeat(**left_keys.fields("tiny", left.public_key)),
            left,
            None,
        ),
    ]:
        envelope = envelope_to_pb(signed(who, pack(kind, payload)))
        request = REQUESTS[method](envelope=envelope)
        wire.ok(method, request, bearer(tok or f.left_token))
        f.sent[name] = (method, request.SerializeToString())
    wire.ok("Leave", pb.LeaveRequest(), bearer(f.left_token))
    ban(live, f)
    return f


def ban(live: Swarm, f: Target) -> None:
    """Ban ``f.banned`` from run ``tiny`` through the admin API (again: the HTTP fuzz's
    admin requests may lift the ban, and the two fuzz modules may run in either order)."""
    response = httpx.post(
        f"{live.url}/api/admin/runs/tiny/bans",
        json={"peer_id": f.banned.peer_id, "reason": "fuzz"},
        headers={"Authorization": f"Bearer {f.admin_key}"},
    )
    assert response.status_code == 201, response.text
