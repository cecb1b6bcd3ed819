"""A real coordinator's ``/metrics``: Prometheus text that agrees with its JSON API.

Two peers register and heartbeat over real gRPC (no training: the numbers are
theirs to choose, so the test knows them), then ``/metrics`` is scraped and
parsed with prometheus_client's own parser.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from crowdtrain.protocol import coordinator_pb2 as pb
from crowdtrain.protocol.identity import Identity
from crowdtrain.protocol.rpc import KIND_HEARTBEAT, envelope_to_pb
from tests.fuzz.live import Wire, bearer, pack, register, signed
from tests.swarm import Swarm, write_spec

pytestmark = pytest.mark.slow

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(swarm: Swarm) -> tuple[Samples, dict[str, str], str]:
    """Every sample by (name, labels), each family's type, and the content type."""
    response = httpx.get(f"{swarm.url}/metrics", timeout=10)
    assert response.status_code == 200, response.text
    samples: Samples = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(response.text):
        types[family.name] = family.type
        assert family.documentation, f"{family.name} has no HELP text"
        for s in family.samples:
            samples[s.name, tuple(sorted(s.labels.items()))] = s.value
    return samples, types, response.headers["content-type"]


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[name, tuple(sorted(labels.items()))]


def heartbeat(wire: Wire, who: Identity, token: str, **payload: Any) -> None:
    body = {
        "session_key": f"session-{who.peer_id[:8]}",
        "num_sequences": payload["num_tokens"] // 64,
        "step": 3,
        "device": "cpu",
        **payload,
    }
    envelope = envelope_to_pb(signed(who, pack(KIND_HEARTBEAT, body)))
    wire.ok("Heartbeat", pb.HeartbeatRequest(envelope=envelope), bearer(token))


def test_metrics_agree_with_the_api(swarm: Swarm) -> None:
    data = swarm.prepare()
    assert swarm.publish(write_spec(swarm.root / "tiny.toml"), data).returncode == 0
    assert swarm.publish(write_spec(swarm.root / "idle.toml", run_id="idle"), data).returncode == 0
    swarm.start_coordinator()
    wire = Wire(swarm.ports["grpc_target"])
    first, second = Identity.generate(), Identity.generate()
    first_token, _ = register(wire, first)
    second_token, _ = register(wire, second)
    wire.ok("LeaseShards", pb.LeaseRequest(max_shards=2), bearer(first_token))
    evaluation = {"step": 2, "num_tokens": 4096, "loss": 3.25, "bits_per_byte": 4.5}
    uplink = {"averaging": {"sent": 5_000_000, "received": 4_000_000}, "control": {"sent": 300}}
    heartbeat(
        wire, first, first_token, num_tokens=8192, tokens_per_s=1500.0, loss=3.5,
        evaluations=[evaluation], traffic=uplink,
    )  # fmt: skip
    # The same process reporting less later (a replay, a reordered heartbeat): counts only rise.
    heartbeat(
        wire, first, first_token, num_tokens=8192, tokens_per_s=1500.0, loss=3.5,
        traffic={"averaging": {"sent": 10, "received": 10}},
    )  # fmt: skip
    heartbeat(wire, second, second_token, num_tokens=2048, tokens_per_s=500.0, loss=4.5)

    samples, types, content_type = scrape(swarm)
    run = swarm.get("/api/runs/tiny")
    assert content_type.startswith("text/plain"), content_type

    assert types["crowdtrain_tokens"] == "counter"
    assert types["crowdtrain_refused_requests"] == "counter"
    for gauge in ("crowdtrain_peers", "crowdtrain_tokens_per_second", "crowdtrain_step"):
        assert types[gauge] == "gauge", gauge
    assert value(samples, "crowdtrain_tokens_total", run="tiny") == run["num_tokens"] == 10240
    assert value(samples, "crowdtrain_tokens_per_second", run="tiny") == run["tokens_per_s"]
    assert run["tokens_per_s"] == 2000.0
    assert value(samples, "crowdtrain_peers", run="tiny", state="active") == run["num_peers"] == 2
    assert value(samples, "crowdtrain_peers", run="tiny", state="left") == 0
    assert value(samples, "crowdtrain_step", run="tiny") == run["step"] == 3
    assert value(samples, "crowdtrain_epoch", run="tiny") == run["epoch"] == 0
    assert value(samples, "crowdtrain_validation_loss", run="tiny") == run["val_loss"] == 3.25
    assert value(samples, "crowdtrain_validation_bits_per_byte", run="tiny") == 4.5
    assert value(samples, "crowdtrain_training_loss", run="tiny") == pytest.approx(4.0)
    for state in ("pending", "leased", "done"):
        shards = value(samples, "crowdtrain_shards", run="tiny", state=state)
        assert shards == run["shards"][state], state
    assert value(samples, "crowdtrain_shards", run="tiny", state="leased") == 2
    assert value(samples, "crowdtrain_active_leases", run="tiny") == 2
    assert value(samples, "crowdtrain_verified_flops", run="tiny") == 0
    assert value(samples, "crowdtrain_checkpoints", run="tiny") == 0
    # Each peer's bytes by purpose and direction, as the API shows them.
    assert types["crowdtrain_peer_bytes"] == "counter"
    peers = {p["peer_id"]: p for p in swarm.get("/api/runs/tiny/peers")}
    assert peers[first.peer_id]["traffic"] == {
        "averaging": {"sent": 5_000_000, "received": 4_000_000},
        "state": {"sent": 0, "received": 0},
        "control": {"sent": 300, "received": 0},
        "data": {"sent": 0, "received": 0},
    }
    assert all(c == {"sent": 0, "received": 0} for c in peers[second.peer_id]["traffic"].values())
    for peer_id, peer in peers.items():
        for purpose, counts in peer["traffic"].items():
            for direction in ("sent", "received"):
                found = value(
                    samples, "crowdtrain_peer_bytes_total",
                    run="tiny", peer_id=peer_id, purpose=purpose, direction=direction,
                )  # fmt: skip
                assert found == counts[direction], (peer_id, purpose, direction)
    # A run with nothing yet: listed, with zeros and no loss.
    assert value(samples, "crowdtrain_peers", run="idle", state="active") == 0
    assert ("crowdtrain_validation_loss", (("run", "idle"),)) not in samples
    # Only published runs appear.
    assert {dict(labels).get("run") for _, labels in samples} <= {"tiny", "idle", None}

    # A refused request is counted: an admin call without the admin key.
    before = samples.get(
        ("crowdtrain_refused_requests_total", (("method", "http-admin"), ("reason", "UNAUTHENTICATED"))),
        0.0,
    )  # fmt: skip
    assert httpx.get(f"{swarm.url}/api/admin/runs/tiny/invites").status_code == 401
    after, _, _ = scrape(swarm)
    refused = value(
        after, "crowdtrain_refused_requests_total", method="http-admin", reason="UNAUTHENTICATED"
    )
    assert refused == before + 1

    # The sampler records the swarm's throughput every few seconds.
    sampled = swarm.wait_for(
        lambda: swarm.get("/api/runs/tiny/metrics"), timeout=30, what="a throughput sample"
    )
    assert sampled[-1]["tokens_per_s"] == 2000.0 and sampled[-1]["num_peers"] == 2
    assert sampled[-1]["num_tokens"] == 10240 and sampled[-1]["step"] == 3
    later = swarm.get(f"/api/runs/tiny/metrics?since={sampled[-1]['time']}")
    assert all(s["time"] > sampled[-1]["time"] for s in later)
    assert swarm.get("/api/runs/idle/metrics") == []
    missing = httpx.get(f"{swarm.url}/api/runs/nope/metrics")
    assert missing.status_code == 404 and "no run 'nope'" in missing.json()["detail"]
    assert httpx.get(f"{swarm.url}/api/runs/tiny/metrics?since=-1").status_code == 422
    assert time.time() >= sampled[-1]["time"]


def test_peer_time_in_api_and_metrics(swarm: Swarm) -> None:
    """Where each peer's training loop spent its time: kept per node process (only
    rising), summed over a peer's processes, clamped to what the peer's age allows, shown
    with its utilisation in /peers and exported per peer; older nodes send none."""
    data = swarm.prepare()
    assert swarm.publish(write_spec(swarm.root / "tiny.toml"), data).returncode == 0
    swarm.start_coordinator()
    wire = Wire(swarm.ports["grpc_target"])
    steady, boaster, old = Identity.generate(), Identity.generate(), Identity.generate()
    steady_token, _ = register(wire, steady)
    before_boaster = time.time()
    boaster_token, _ = register(wire, boaster)
    old_token, _ = register(wire, old)

    def split(training: float, computing: float, swarm_wait: float, data_wait: float) -> dict:
        return {
            "training_s": training,
            "computing_s": computing,
            "swarm_wait_s": swarm_wait,
            "data_wait_s": data_wait,
        }

    heartbeat(
        wire, steady, steady_token, session_key="steady-first", num_tokens=1024,
        tokens_per_s=100.0, time=split(100.0, 80.0, 15.0, 4.0),
    )  # fmt: skip
    # The same process reporting less later (a replay, a reordered heartbeat): seconds only rise.
    heartbeat(
        wire, steady, steady_token, session_key="steady-first", num_tokens=1024,
        tokens_per_s=100.0, time=split(50.0, 10.0, 5.0, 2.0),
    )  # fmt: skip
    # A second process of the same peer: its seconds add to the first's.
    heartbeat(
        wire, steady, steady_token, session_key="steady-second", num_tokens=512,
        tokens_per_s=100.0, time=split(20.0, 5.0, 10.0, 5.0),
    )  # fmt: skip
    # More seconds than the peer can have trained since it registered: clamped, not refused.
    heartbeat(
        wire, boaster, boaster_token, num_tokens=1024, tokens_per_s=100.0,
        time=split(1e9, 9e8, 5e7, 1e7),
    )  # fmt: skip
    # A node from before the time split.
    heartbeat(wire, old, old_token, num_tokens=1024, tokens_per_s=100.0)

    peers = {p["peer_id"]: p for p in swarm.get("/api/runs/tiny/peers")}
    assert peers[steady.peer_id]["loop_time"] == {
        "training_s": 120.0,
        "computing_s": 85.0,
        "swarm_wait_s": 25.0,
        "data_wait_s": 9.0,
        "utilisation": pytest.approx(85.0 / 120.0),
    }
    boasted = peers[boaster.peer_id]["loop_time"]
    most = time.time() - before_boaster + 3600.0  # its age, and the grace
    for part in ("training_s", "computing_s", "swarm_wait_s", "data_wait_s"):
        assert 3600.0 <= boasted[part] <= most, (part, boasted)
    assert boasted["utilisation"] == pytest.approx(1.0)
    assert peers[old.peer_id]["loop_time"] == {
        "training_s": 0.0,
        "computing_s": 0.0,
        "swarm_wait_s": 0.0,
        "data_wait_s": 0.0,
        "utilisation": None,
    }

    samples, types, _ = scrape(swarm)
    assert types["crowdtrain_peer_seconds"] == "counter"
    for peer_id, peer in peers.items():
        for what in ("training", "computing", "swarm_wait", "data_wait"):
            found = value(
                samples, "crowdtrain_peer_seconds_total", run="tiny", peer_id=peer_id, what=what
            )
            assert found == peer["loop_time"][f"{what}_s"], (peer_id, what)
