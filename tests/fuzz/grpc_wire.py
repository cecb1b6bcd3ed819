"""Requests wrong on the wire or in their credentials, for the gRPC fuzz: random bytes
and messages, valid requests damaged or replayed, forged or ended session tokens,
unknown runs and methods, oversized requests. Each generator makes one
:class:`Case`, invalid by construction, with the codes its refusal may carry."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from crowdtrain.protocol import coordinator_pb2 as pb
from crowdtrain.protocol.rpc import KIND_HEARTBEAT, KIND_RECEIPT, KIND_REGISTER, envelope_to_pb
from tests.fuzz.live import (
    MAX_MESSAGE_BYTES,
    MAX_REQUEST_BYTES,
    REFUSED,
    REQUESTS,
    RUN_IDS,
    SERVICE,
    SESSION_METHODS,
    UNSIGNED_SESSION_METHODS,
    VALID_READ,
    Code,
    Target,
    bearer,
    pack,
    signed,
)


@dataclass(frozen=True)
class Case:
    """One request to send: raw bytes to a method path, with its metadata."""

    family: str
    path: str
    data: bytes
    metadata: tuple | None
    expect: frozenset = REFUSED

    @property
    def method(self) -> str:
        return self.path.rsplit("/", 1)[-1]


def text(rng: random.Random) -> str:
    choice = rng.randrange(8)
    if choice == 0:
        return ""
    if choice == 1:
        return "".join(chr(rng.randrange(32, 127)) for _ in range(rng.randrange(1, 40)))
    if choice == 2:
        return "".join(chr(rng.randrange(0x20, 0x2FFF)) for _ in range(rng.randrange(1, 20)))
    if choice == 3:
        return "x" * rng.choice([65, 129, 513, 4097, 100_000])
    return rng.choice(
        [
            "tiny ",
            "TINY",
            "tiny\x00",
            "../../etc/passwd",
            "tiny' OR '1'='1",
            "%s%s%n",
            "locked/../tiny",
            "\u202etiny",
        ]
    )


def blob(rng: random.Random) -> bytes:
    return rng.randbytes(rng.choice([0, 1, 15, 16, 31, 32, 33, 63, 64, 65, rng.randrange(200)]))


def token_metadata(rng: random.Random, f: Target) -> tuple[tuple | None, frozenset]:
    """A session credential that is not the probe's: missing, forged, ended or banned."""
    choice = rng.randrange(13)
    unauth = frozenset({Code.UNAUTHENTICATED})
    variants: list[tuple | None] = [
        None,
        bearer(rng.randbytes(32).hex()),
        (("authorization", rng.randbytes(16).hex()),),
        (("authorization", "Bearer "),),
        (("authorization", f"bearer {f.token}"),),
        (("authorization", f"Basic {f.token}"),),
        bearer(f.token[:-1]),
        bearer(f.token + "A"),
        bearer(f.token[:5] + ("A" if f.token[5] != "A" else "B") + f.token[6:]),
        bearer(f.left_token),
        bearer(f.admin_key),
        (("x-authorization", f"Bearer {f.token}"),),
        (("authorization", "Bearer forged"), ("authorization", f"Bearer {f.token}")),
    ]
    if choice == 0 and rng.random() < 0.3:  # a ban ends the peer's sessions
        return bearer(f.banned_token), unauth
    return variants[choice], unauth


def any_metadata(rng: random.Random, f: Target) -> tuple | None:
    return bearer(f.token) if rng.random() < 0.5 else token_metadata(rng, f)[0]


def parses(method: str, data: bytes) -> bool:
    if len(data) > MAX_REQUEST_BYTES:
        return False
    try:
        REQUESTS[method].FromString(data)
    except Exception:
        return False
    return True


def random_bytes(rng: random.Random, f: Target) -> Case:
    method = rng.choice(list(REQUESTS))
    data = rng.randbytes(rng.choice([0, 1, 2, 5, rng.randrange(64), rng.randrange(4096)]))
    return Case("random bytes", SERVICE + method, data, any_metadata(rng, f))


def random_message(rng: random.Random, f: Target) -> Case:
    """A well-formed protobuf of the method's type with random contents."""
    method = rng.choice(list(REQUESTS))
    run_id = text(rng)
    if rng.random() < 0.3:
        envelope = pb.Envelope(body=blob(rng), signature=blob(rng), public_key=blob(rng))
    else:  # signed by a key the coordinator never saw, carrying random msgpack
        body = pack(rng.choice([KIND_HEARTBEAT, KIND_RECEIPT, KIND_REGISTER]), {text(rng): 1})
        envelope = envelope_to_pb(signed(f.stranger, body))
    message = {
        "Challenge": lambda: pb.ChallengeRequest(run_id=run_id),
        "GetRun": lambda: pb.GetRunRequest(run_id=run_id),
        "Register": lambda: pb.RegisterRequest(
            run_id=rng.choice([run_id, "tiny"]), envelope=envelope
        ),
        "Heartbeat": lambda: pb.HeartbeatRequest(envelope=envelope),
        "ReportShard": lambda: pb.ShardReport(envelope=envelope),
        "LeaseShards": lambda: pb.LeaseRequest(
            max_shards=rng.choice([0, -1, 1, 2**31 - 1, -(2**31), rng.randrange(100)]),
            resume=rng.random() < 0.5,
        ),
        "Leave": lambda: pb.LeaveRequest(),
    }[method]()
    data = message.SerializeToString()
    if rng.random() < 0.3:  # unknown fields, which proto3 keeps
        data += bytes([rng.randrange(5, 16) << 3 | 2, 4]) + rng.randbytes(4)
    metadata = any_metadata(rng, f) if method in ("Heartbeat", "ReportShard") else None
    if method in UNSIGNED_SESSION_METHODS:
        metadata = token_metadata(rng, f)[0]
    return Case("random message", SERVICE + method, data, metadata)


def mutate(rng: random.Random, data: bytes, donor: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randrange(1, 5)):
        op = rng.randrange(6)
        at = rng.randrange(len(out) + 1)
        if op == 0 and out:  # bit flip
            i = rng.randrange(len(out))
            out[i] ^= 1 << rng.randrange(8)
        elif op == 1 and out:  # byte set
            out[rng.randrange(len(out))] = rng.choice([0, 0xFF, 0x7F, 0x80, rng.randrange(256)])
        elif op == 2:  # truncate
            del out[at:]
        elif op == 3:  # extend
            out[at:at] = rng.randbytes(rng.randrange(1, 32))
        elif op == 4 and out:  # repeat a slice
            i = rng.randrange(len(out))
            out[at:at] = out[i : i + rng.randrange(1, 64)]
        else:  # splice with another valid request
            out = out[:at] + donor[rng.randrange(len(donor) + 1) :]
    return bytes(out)


def mutated(rng: random.Random, f: Target) -> Case:
    """A valid request already sent, with its bytes damaged (or just sent again)."""
    name = rng.choice(["register", "heartbeat", "receipt"])
    method, data = f.sent[name]
    donor = f.sent[rng.choice(list(f.sent))][1]
    if rng.random() < 0.15:
        return Case(
            "replay", SERVICE + method, data, bearer(f.token), frozenset({Code.UNAUTHENTICATED})
        )
    if rng.random() < 0.1:
        method = rng.choice(list(REQUESTS))
    data = mutate(rng, data, donor)
    return Case("mutated", SERVICE + method, data, bearer(f.token))


def bad_credentials(rng: random.Random, f: Target) -> Case:
    """A request that would be valid from the probe, under someone else's credential."""
    method = rng.choice(SESSION_METHODS)
    if method in ("Heartbeat", "ReportShard"):
        kind = KIND_HEARTBEAT if method == "Heartbeat" else KIND_RECEIPT
        payload = f.heartbeat() if method == "Heartbeat" else f.receipt(f.held)
        envelope = envelope_to_pb(signed(f.probe, pack(kind, payload)))
        request: Any = REQUESTS[method](envelope=envelope)
    elif method == "LeaseShards":
        request = pb.LeaseRequest(max_shards=rng.randrange(1, 9), resume=rng.random() < 0.5)
    else:
        request = pb.LeaveRequest()
    metadata, expect = token_metadata(rng, f)
    return Case("credentials", SERVICE + method, request.SerializeToString(), metadata, expect)


def unknown_run(rng: random.Random, f: Target) -> Case:
    method = rng.choice(["Challenge", "GetRun", "Register"])
    run_id = text(rng)
    if run_id in RUN_IDS:
        run_id += "!"
    request = REQUESTS[method](run_id=run_id)
    if method == "Register":
        request.envelope.CopyFrom(pb.RegisterRequest.FromString(f.sent["register"][1]).envelope)
    data = request.SerializeToString()
    # Refusals quote at most 64 characters of the run id, so even a huge one is
    # answered NOT_FOUND (a longer detail would overflow the client's trailer limit).
    expect = {Code.NOT_FOUND}
    return Case("unknown run", SERVICE + method, data, None, frozenset(expect))


def oversized(rng: random.Random, f: Target) -> Case:
    method = rng.choice(list(REQUESTS))
    if rng.random() < 0.1:  # over gRPC's own limit: refused before our code sees it
        size = MAX_MESSAGE_BYTES + rng.randrange(1, 1024)
        expect = {Code.RESOURCE_EXHAUSTED}
    else:
        size = MAX_REQUEST_BYTES + rng.choice([1, 1000, 500_000])
        expect = {Code.INVALID_ARGUMENT}
    # A huge run id (or envelope) with the right framing, so only its size is wrong.
    data = bytes([1 << 3 | 2 if method in ("Challenge", "GetRun") else 2 << 3 | 2])
    data += _varint(size) + b"y" * size
    return Case("oversized", SERVICE + method, data, any_metadata(rng, f), frozenset(expect))


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def unknown_method(rng: random.Random, f: Target) -> Case:
    path = rng.choice(
        [SERVICE + "Nope", SERVICE + "heartbeat", "/crowdtrain.v1.Other/Heartbeat", "/x/y"]
    )
    return Case(
        "unknown method", path, blob(rng), any_metadata(rng, f), frozenset({Code.UNIMPLEMENTED})
    )


def guarded(case: Case, rng: random.Random, f: Target) -> Case:
    """Keep the fuzz to invalid requests: swap the probe's token out of a LeaseShards or
    Leave that would parse, and mark a Challenge or GetRun that names a real run (a
    damaged request can turn into one) as the valid read it is."""
    if (
        case.method in UNSIGNED_SESSION_METHODS
        and case.metadata == bearer(f.token)
        and parses(case.method, case.data)
    ):
        metadata, _ = token_metadata(rng, f)
        return Case(case.family, case.path, case.data, metadata)
    if (
        case.path in (SERVICE + "Challenge", SERVICE + "GetRun")
        and parses(case.method, case.data)
        and REQUESTS[case.method].FromString(case.data).run_id in RUN_IDS
    ):
        return Case(VALID_READ, case.path, case.data, case.metadata, frozenset({Code.OK}))
    return case
