"""Signed requests wrong inside, for the gRPC fuzz: envelopes tampered with after or
instead of signing, payloads that break their schema, receipts for shards not held,
and registrations that answer a real challenge but still may not join."""

from __future__ import annotations

import math
import os
import random
import time
from typing import Any

import msgpack

from crowdtrain.protocol import coordinator_pb2 as pb
from crowdtrain.protocol.identity import Envelope
from crowdtrain.protocol.rpc import KIND_HEARTBEAT, KIND_RECEIPT, KIND_REGISTER, envelope_to_pb
from tests.fuzz.grpc_wire import Case
from tests.fuzz.live import REQUESTS, SERVICE, Code, Target, bearer, pack, signed

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
        [{"step": 0, "batch": 0, "losses": [0.0] * 257}],
        [{"step": 0, "batch": b, "losses": [0.0] * 256} for b in range(17)],
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
