"""Thousands of random and mutated gRPC requests against a live coordinator: each gets a
refusal a node can act on (never INTERNAL or UNKNOWN), the coordinator stays up, and
its database holds nothing they sent. ``CROWDTRAIN_FUZZ_SEED=<seed>`` replays a run."""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from crowdtrain.protocol import coordinator_pb2 as pb
from crowdtrain.protocol.rpc import KIND_HEARTBEAT, envelope_to_pb
from tests.fuzz.grpc_envelopes import bad_registration, tampered
from tests.fuzz.grpc_wire import (
    Case,
    bad_credentials,
    guarded,
    mutated,
    oversized,
    random_bytes,
    random_message,
    unknown_method,
    unknown_run,
)
from tests.fuzz.live import (
    BUDGET_S,
    NUM_REQUESTS,
    SEED,
    VALID_READ,
    Target,
    ban,
    bearer,
    pack,
    signed,
)
from tests.swarm import Swarm, db_rows

pytestmark = pytest.mark.slow

# The families of invalid requests and how often each is drawn

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
    ban(live, f)
    # A nonce is refused again only while a message could still pass the age check (the
    # guard forgets it after twice that): the "spent nonce" cases reuse a fresh one.
    fresh = pb.HeartbeatRequest(
        envelope=envelope_to_pb(signed(f.probe, pack(KIND_HEARTBEAT, f.heartbeat())))
    )
    f.wire.ok("Heartbeat", fresh, bearer(f.token))
    f.sent["heartbeat"] = ("Heartbeat", fresh.SerializeToString())
    rng = random.Random(SEED)
    refusals_before = sum(r["count"] for r in live.get("/api/refusals"))
    before = db_rows(live.coord_dir)
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
    after = db_rows(live.coord_dir)
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
