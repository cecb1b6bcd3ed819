"""Thousands of random and mutated gRPC requests against a live coordinator: each gets a
refusal a node can act on (never INTERNAL or UNKNOWN), the coordinator stays up, and
its database holds nothing they sent. ``CROWDTRAIN_FUZZ_SEED=<seed>`` replays a run."""

from __future__ import annotations

import math
import os
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack
import pytest

from crowdtrain.protocol import coordinator_pb2 as pb
from crowdtrain.protocol.identity import Envelope
from crowdtrain.protocol.rpc import KIND_HEARTBEAT, KIND_RECEIPT, KIND_REGISTER, envelope_to_pb
from tests.fuzz.live import (
    BUDGET_S,
    MAX_MESSAGE_BYTES,
    MAX_REQUEST_BYTES,
    NUM_REQUESTS,
    REFUSED,
    REQUESTS,
    RUN_IDS,
    SEED,
    SERVICE,
    SESSION_METHODS,
    UNSIGNED_SESSION_METHODS,
    VALID_READ,
    Code,
    Target,
    bearer,
    pack,
    signed,
    state_rows,
)
from tests.swarm import Swarm

pytestmark = pytest.mark.slow

# Request generators: each makes one Case, invalid by construction, with the codes
# its refusal may carry.


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


BAD_HEARTBEAT = {
    "session_key": ["", "short", "k" * 65, 12345678, None, b"bytes-session-key"],
    "num_tokens": [-1, 2**62 + 1, 1.5, "1", True, None, [1]],
    "num_sequences": [-1, 2**62 + 1, 2.0, None],
    "tokens_per_s": [-0.5, 1e16, math.nan, math.inf, -math.inf, "fast", None],
    "loss": [-1.0, 1e5, math.nan, math.inf, "low"],
    "step": [-1, 2**62 + 1, 0.5, None, False],
    "device": ["d" * 129, 5, None],
    "evaluations": [
        "evals",
        None,
        [{}],
        [{"step": 0, "num_tokens": 0, "loss": math.nan, "bits_per_byte": 0.0}],
        [{"step": -1, "num_tokens": 0, "loss": 1.0, "bits_per_byte": 1.0}],
        [{"step": 0, "num_tokens": 0, "loss": 1.0, "bits_per_byte": 1.0}] * 33,
    ],
    "leases": [
        None,
        [{"shard_id": "", "epoch": 0}],
        [{"shard_id": "s" * 65, "epoch": 0}],
        [{"shard_id": "x", "epoch": -1}],
        [{"shard_id": "x"}],
        [{"shard_id": "x", "epoch": 0, "extra": 1}],
        [{"shard_id": "x", "epoch": 0}] * 65,
    ],
    "dht_peer_id": ["p" * 129, 7, None],
    "progress_key": ["XYZ", "0g", "a" * 2049, 5, None],
    "num_skipped_steps": [-1, 1.0, None],
    "reports": [
        None,
        [{"dht_peer_id": "", "reason": "nan", "count": 1}],
        [{"dht_peer_id": "p", "reason": "", "count": 1}],
        [{"dht_peer_id": "p", "reason": "nan", "count": 0}],
        [{"dht_peer_id": "p", "reason": "r" * 65, "count": 1}],
        [{"dht_peer_id": "p", "reason": "nan", "count": 1}] * 33,
    ],
}
BAD_RECEIPT = {
    "shard_id": ["", "s" * 65, 5, None],
    "epoch": [-1, 1.5, None, "0"],
    "num_sequences": [-1, 2**62 + 1, 1.0, None],
    "num_tokens": [-1, 2**62 + 1, 1.0, None, True],
    "loss_sum": [-1.0, math.nan, math.inf, "1", None],
    "started": [-1.0, math.nan, math.inf, None, "now"],
    "finished": [-1.0, math.nan, -math.inf, None],
    "micro_batch_size": [0, 65537, 1.0, None],
    "samples": [
        "x",
        None,
        [{"step": 0, "batch": -1, "losses": []}],
        [{"step": 0, "batch": 0, "losses": [0.0] * 9}],
        [{"step": 0, "batch": 0, "losses": [math.nan]}],
        [{"step": 0, "batch": 0}],
        [{"step": 0, "batch": 0, "losses": []}] * 257,
    ],
}
BAD_REGISTER = {
    "challenge": [b"", b"c" * 15, b"c" * 65, "a string", None],
    "name": ["", "n" * 65, 5, None],
    "device": ["d" * 129, None, 1],
    "versions": ["v" * 513, None],
    "invite": ["i" * 129, None, 3],
}
REQUIRED = {
    "heartbeat": ("session_key", "num_tokens", "num_sequences", "tokens_per_s", "step"),
    "receipt": tuple("shard_id epoch num_sequences num_tokens loss_sum started finished".split()),
    "register": ("challenge", "name", "device"),
}


def broken(rng: random.Random, payload: dict, bad: dict[str, list], required: tuple) -> dict:
    """``payload`` with one to three faults, each enough on its own to refuse it."""
    payload = dict(payload)
    for _ in range(rng.randrange(1, 4)):
        fault = rng.randrange(5)
        if fault == 0:
            payload[f"extra_{rng.randrange(99)}"] = rng.choice([0, "", None, [], {}])
        elif fault == 1:
            payload.pop(rng.choice(required), None)
        else:
            key = rng.choice(list(bad))
            payload[key] = rng.choice(bad[key])
    return payload


def unleased(rng: random.Random, f: Target) -> tuple[str, int]:
    while True:
        shard = (rng.choice(f.shard_ids), rng.choice([0, 0, 1, 7, 2**40]))
        if shard not in (f.done, f.held):
            return shard


def tampered(rng: random.Random, f: Target) -> Case:
    """A freshly signed heartbeat or receipt from the probe, with one thing wrong."""
    method = rng.choice(["Heartbeat", "ReportShard"])
    kind = KIND_HEARTBEAT if method == "Heartbeat" else KIND_RECEIPT
    payload = f.heartbeat() if method == "Heartbeat" else f.receipt(rng.choice([f.done, f.held]))
    body = pack(kind, payload)
    who, expect = f.probe, {Code.UNAUTHENTICATED}
    signature: bytes | None = None
    public_key = f.probe.public_key
    fault = rng.randrange(14)
    if fault == 0:  # body edited after signing
        signature = f.probe.sign(body)
        body = pack(kind, {**payload, "num_tokens": 10 * payload["num_tokens"]})
    elif fault == 1:
        good = f.probe.sign(body)
        signature = rng.choice(
            [b"", good[:-1], good + b"\0", rng.randbytes(64), bytes([good[0] ^ 1]) + good[1:]]
        )
    elif fault == 2:  # another key, its own public key
        who, public_key = f.stranger, f.stranger.public_key
    elif fault == 3:  # the probe's signature under someone else's public key
        public_key = rng.choice([f.stranger.public_key, f.banned.public_key])
    elif fault == 4:
        public_key = rng.choice([b"", public_key[:31], public_key + b"\0", rng.randbytes(32)])
    elif fault == 5:
        body = pack(rng.choice([KIND_REGISTER, "", "Heartbeat", 5, None, kind + " "]), payload)
    elif fault == 6:
        age = rng.choice([121.0, 3600.0, 1e6, 1.7e9]) * rng.choice([1, -1])
        body = pack(kind, payload, timestamp=time.time() - age)
    elif fault == 7:
        bad_time = rng.choice([math.nan, math.inf, -math.inf, True, "now", None, b"t", [1]])
        body, expect = pack(kind, payload, timestamp=bad_time), {Code.INVALID_ARGUMENT}
    elif fault == 8:
        bad_nonce = rng.choice([b"", b"n" * 15, b"n" * 17, "n" * 16, 16, None])
        body, expect = pack(kind, payload, nonce=bad_nonce), {Code.INVALID_ARGUMENT}
    elif fault == 9:  # a nonce already spent, on a new body
        spent = msgpack.unpackb(
            pb.HeartbeatRequest.FromString(f.sent["heartbeat"][1]).envelope.body
        )["nonce"]
        body = pack(kind, payload, nonce=spent)
    elif fault == 10:
        expect = {Code.INVALID_ARGUMENT}
        body = rng.choice(
            [
                rng.randbytes(rng.randrange(1, 200)),
                b"",
                msgpack.packb([kind, os.urandom(16), time.time(), payload]),
                msgpack.packb({"kind": kind, "nonce": os.urandom(16), "timestamp": time.time()}),
                pack(kind, payload)[:-3],
                msgpack.packb({"kind": kind, "payload": payload, "x": 1, "nonce": b"", "y": 2}),
                pack(kind, rng.choice([[payload], "payload", 5, None])),
                msgpack.packb(msgpack.ExtType(5, b"x" * 8)),
                b"\xdd\xff\xff\xff\xff",  # an array that claims 4 billion items
                b"\x91" * 5000 + b"\xc0",  # deep nesting
            ]
        )
    elif fault == 11:  # a signed payload that does not match its schema
        expect = {Code.INVALID_ARGUMENT}
        if method == "Heartbeat":
            payload = broken(rng, payload, BAD_HEARTBEAT, REQUIRED["heartbeat"])
        else:
            payload = broken(rng, payload, BAD_RECEIPT, REQUIRED["receipt"])
        body = pack(kind, payload)
    elif fault == 12:  # well-formed, signed, and still not allowed
        if method == "Heartbeat":
            expect = {Code.PERMISSION_DENIED}
            body = pack(kind, f.heartbeat(dht_peer_id=f.dht_taken))
        else:
            expect = {Code.FAILED_PRECONDITION}
            shard, changes = rng.choice(
                [
                    (f.done, {}),  # already receipted
                    (f.done, {"num_tokens": 5120}),
                    (f.held, {"started": time.time(), "finished": time.time() - 30}),
                    (unleased(rng, f), {}),
                ]
            )
            body = pack(kind, f.receipt(shard, **changes))
    else:  # an envelope body over its 64 KiB limit, padded inside the payload
        expect = {Code.INVALID_ARGUMENT}
        body = pack(kind, {**payload, "device": "d" * rng.randrange(65_536, 200_000)})
    envelope = signed(who, body)
    envelope = Envelope(body, envelope.signature if signature is None else signature, public_key)
    request = REQUESTS[method](envelope=envelope_to_pb(envelope))
    return Case(
        "tampered",
        SERVICE + method,
        request.SerializeToString(),
        bearer(f.token),
        frozenset(expect),
    )


def bad_registration(rng: random.Random, f: Target) -> Case:
    """Registrations that answer a real challenge but still may not join."""
    run_id, who, expect = "tiny", f.stranger, {Code.UNAUTHENTICATED}
    issued_for = "tiny"
    fault = rng.randrange(7)
    if fault == 0:
        issued_for = "locked"  # answered for the other run
    elif fault in (1, 2):
        run_id = issued_for = "locked"  # invite-only, without a valid code
        expect = {Code.PERMISSION_DENIED}
    elif fault == 3:
        who, expect = f.banned, {Code.PERMISSION_DENIED}
    challenge = pb.ChallengeReply.FromString(
        f.wire.ok("Challenge", pb.ChallengeRequest(run_id=issued_for))
    ).challenge
    payload: dict[str, Any] = {"challenge": challenge, "name": "fuzz", "device": "cpu"}
    if fault == 1:
        payload["invite"] = "ct-" + rng.randbytes(18).hex()
    elif fault == 4:
        payload["challenge"] = rng.choice(
            [rng.randbytes(32), challenge[:-1] + bytes([challenge[-1] ^ 1]), challenge[:16]]
        )
    elif fault == 5:
        payload = broken(rng, payload, BAD_REGISTER, REQUIRED["register"])
        expect = {Code.INVALID_ARGUMENT}
    body = pack(KIND_REGISTER, payload)
    envelope = signed(who, body)
    if fault == 6:  # a stranger's registration signed, then the key swapped to the probe's
        envelope = Envelope(body, envelope.signature, f.probe.public_key)
    request = pb.RegisterRequest(run_id=run_id, envelope=envelope_to_pb(envelope))
    return Case(
        "registration", SERVICE + "Register", request.SerializeToString(), None, frozenset(expect)
    )


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


FAMILIES: list[tuple[Callable[[random.Random, Target], Case], float]] = [
    (random_bytes, 3),
    (random_message, 3),
    (mutated, 4),
    (tampered, 5),
    (bad_registration, 1.5),
    (bad_credentials, 2),
    (unknown_run, 1),
    (oversized, 0.2),
    (unknown_method, 0.2),
]


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


@dataclass
class Tally:
    codes: Counter = field(default_factory=Counter)  # (family, code name) -> count
    surprises: list[str] = field(default_factory=list)
    tried: int = 0

    def refused(self) -> Counter:
        """Answers to the invalid requests, by code (valid reads left out)."""
        by_code: Counter = Counter()
        for (family, code), n in self.codes.items():
            if family != VALID_READ:
                by_code[code] += n
        return by_code

    def table(self) -> str:
        families = sorted({fam for fam, _ in self.codes})
        codes = sorted({code for _, code in self.codes})
        rows = [f"{'':<16}" + "".join(f"{c:>{len(c) + 1}}" for c in codes)]
        for fam in families:
            rows.append(
                f"{fam:<16}" + "".join(f"{self.codes[fam, c]:>{len(c) + 1}}" for c in codes)
            )
        return "\n".join(rows)


def test_grpc_fuzz_refuses_everything_and_changes_nothing(
    live: Swarm, target: Target, record_property: Callable[[str, Any], None]
) -> None:
    f = target
    rng = random.Random(SEED)
    refusals_before = sum(r["count"] for r in live.get("/api/refusals"))
    before = state_rows(live.coord_dir)
    tally = Tally()
    generators, weights = zip(*FAMILIES, strict=True)
    started = time.monotonic()
    while tally.tried < NUM_REQUESTS and time.monotonic() - started < BUDGET_S:
        case = guarded(rng.choices(generators, weights)[0](rng, f), rng, f)
        code, details = f.wire.call(case.path, case.data, case.metadata)
        tally.tried += case.family != VALID_READ
        tally.codes[case.family, code.name] += 1
        if code not in case.expect:
            tally.surprises.append(
                f"case {tally.tried} (seed {SEED}) {case.family} {case.method}: {code.name} "
                f"{details[:200]!r}, expected {sorted(c.name for c in case.expect)}"
            )
    elapsed = time.monotonic() - started
    refused = tally.refused()
    accepted = refused.pop("OK", 0)
    summary = (
        f"gRPC fuzz (seed {SEED}): tried {tally.tried} invalid requests in {elapsed:.1f}s; "
        f"refused {sum(refused.values())} ("
        + ", ".join(f"{code} {n}" for code, n in refused.most_common())
        + f"); accepted {accepted}"
    )
    reads = sum(n for (family, _), n in tally.codes.items() if family == VALID_READ)
    if reads:
        summary += f"; and {reads} damaged requests that became valid reads, answered OK"
    print(f"\n{tally.table()}\n{summary}")
    record_property("grpc_fuzz", summary)

    assert live.processes[0].popen.poll() is None, live.processes[0].output()[-3000:]
    assert live.get("/healthz") == {"status": "ok"}
    assert tally.tried >= 2000, summary
    assert not tally.surprises, "\n".join(tally.surprises[:20])
    assert accepted == 0, summary
    after = state_rows(live.coord_dir)
    changed = [t for t in before if before[t] != after.get(t)]
    assert after == before, f"tables changed by refused requests: {changed}"
    # Each refusal the coordinator's own code made is counted on /api/refusals; the
    # gRPC library answers unknown methods and requests over its limit itself.
    ours = sum(refused.values()) - refused["UNIMPLEMENTED"]
    ours -= tally.codes["oversized", "RESOURCE_EXHAUSTED"]
    counted = sum(r["count"] for r in live.get("/api/refusals")) - refusals_before
    assert counted == ours, (counted, ours)
    # The coordinator still serves its peers: the probe's next real heartbeat is taken.
    envelope = envelope_to_pb(signed(f.probe, pack(KIND_HEARTBEAT, f.heartbeat(step=1))))
    f.wire.ok("Heartbeat", pb.HeartbeatRequest(envelope=envelope), bearer(f.token))
