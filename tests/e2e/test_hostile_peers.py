"""Hostile peers against a real coordinator, with nothing but the signed wire protocol.

Each test is one attack a stranger can script with valid signatures and
fresh identities (issue 14): counts at the protocol's bounds, a claimed step,
sybils reporting an honest peer, another peer's swarm ids, a flood of
challenges, a receipt with nothing to check, and a fault between completing
a shard and checking its receipt. Each run of the one coordinator is its own
arena, so one attack's peers never count in another's.
"""

from __future__ import annotations

import select
import socket
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from crowdtrain.coordinator.api.http_limits import HEAD_TIMEOUT_S
from crowdtrain.node.link.errors import CoordinatorError
from crowdtrain.node.link.grpc import CoordinatorClient
from crowdtrain.protocol import coordinator_pb2 as pb
from crowdtrain.protocol import coordinator_pb2_grpc as pb_grpc
from crowdtrain.protocol.identity import Identity, seal
from crowdtrain.protocol.messages import (
    HeartbeatPayload,
    PeerReport,
    ReceiptPayload,
    ReceiptSample,
)
from crowdtrain.protocol.rpc import KIND_REGISTER, envelope_to_pb
from tests.swarm import COORDINATOR, Swarm, run_cli, write_spec
from tests.swarm_keys import SwarmKeys, publish_fake_progress

pytestmark = pytest.mark.slow

RUNS = ("counts", "step", "sybils", "squat", "free", "fault", "flood")
LIMIT = 2**62


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swarm]:
    """One coordinator (and its verifier) serving one run per attack; no nodes."""
    swarm = Swarm(root=tmp_path_factory.mktemp("hostile"))
    try:
        data = swarm.prepare(16_384)
        for run_id in RUNS:
            spec = write_spec(swarm.root / f"{run_id}.toml", run_id=run_id)
            spec.write_text(spec.read_text() + "\n[verify]\nspot_check_fraction = 1.0\n")
            assert swarm.publish(spec, data).returncode == 0
        swarm.start_coordinator()
        yield swarm
    finally:
        swarm.stop_all()


class Peer:
    """A scripted peer: its own key, a session in one run, and hand-made messages."""

    def __init__(self, swarm: Swarm, run_id: str, name: str, device: str = "cpu:1"):
        self.identity = Identity.generate()
        self.run_id = run_id
        self.client = CoordinatorClient(swarm.url, swarm.ports["grpc_target"], self.identity)
        self.token = self.client.register(run_id, name, device, "hostile").session_token
        self.session_key = f"session-{name}"

    def beat(self, **fields: object) -> pb.HeartbeatReply:
        payload = {
            "session_key": self.session_key,
            "num_tokens": 0,
            "num_sequences": 0,
            "tokens_per_s": 0.0,
            "step": 0,
            **fields,
        }
        return self.client.heartbeat(self.token, HeartbeatPayload.model_validate(payload))

    def report(self, receipt: ReceiptPayload) -> bool:
        return self.client.report(self.token, receipt)


def _peer_row(swarm: Swarm, run_id: str, peer_id: str) -> dict:
    peers = swarm.get(f"/api/runs/{run_id}/peers")
    return next(p for p in peers if p["peer_id"] == peer_id)


def test_counts_at_the_protocols_bound_stop_nobody(live: Swarm) -> None:
    """Two receipts and two heartbeats at 2**62 once made SQLite's SUM overflow inside
    every heartbeat, which stopped every peer, the run's page and its ledger."""
    attacker = Peer(live, "counts", "attacker")
    honest = Peer(live, "counts", "honest")
    leases = attacker.client.lease(attacker.token, 2)
    assert len(leases) == 2
    now = time.time()
    for lease in leases:
        attacker.report(
            ReceiptPayload(
                shard_id=lease.shard_id,
                epoch=lease.epoch,
                num_sequences=LIMIT,
                num_tokens=LIMIT,
                loss_sum=1.0,
                started=now - 1,
                finished=now,
                samples=[ReceiptSample(step=0, batch=0, losses=[1.0])],
            )
        )
    for key in ("session-one", "session-two"):
        attacker.session_key = key
        attacker.beat(
            num_tokens=LIMIT,
            num_sequences=LIMIT,
            num_skipped_steps=LIMIT,
            traffic={"averaging": {"sent": LIMIT, "received": LIMIT}},
        )

    reply = honest.beat(num_tokens=1000, num_sequences=10)  # the heartbeat still answers
    assert reply.verified_tokens == 0
    run = live.get("/api/runs/counts")
    assert 0 < run["num_tokens"] < 2**63, run
    ledger = live.get("/api/runs/counts/ledger")
    cheat = next(p for p in ledger["peers"] if p["name"] == "attacker")
    # What is stored is bounded by the shard's capacity; nothing of it is credited.
    assert cheat["num_tokens"] < 16_384 * 2 and cheat["verified_tokens"] == 0, cheat
    assert cheat["num_rejected"] == 2 and cheat["flagged"], cheat
    assert live.get("/api/runs/counts/leaderboard")
    assert httpx.get(f"{live.url}/metrics", timeout=10).status_code == 200


def test_a_claimed_step_does_not_move_the_run(live: Swarm) -> None:
    honest = Peer(live, "step", "honest")
    honest.beat(step=3)
    attacker = Peer(live, "step", "attacker")
    reply = attacker.beat(step=LIMIT)
    assert reply.step == 3
    assert live.get("/api/runs/step")["step"] == 3
    assert honest.beat(step=4).step == 4  # the honest peer still moves it


def test_fresh_sybils_cannot_flag_an_honest_peer(live: Swarm) -> None:
    honest = Peer(live, "sybils", "honest")
    keys = SwarmKeys()
    honest.beat(**keys.fields("sybils", honest.identity.public_key))
    sybils = [Peer(live, "sybils", f"sybil-{i}") for i in range(3)]
    report = PeerReport(dht_peer_id=keys.dht_peer_id, reason="its part is too long", count=5)
    for _ in range(2):
        for sybil in sybils:
            sybil.beat(reports=[report.model_dump()])
    assert _peer_row(live, "sybils", honest.client.identity.peer_id)["flagged"] is None
    # ...and the honest peer keeps its averaging weight in everyone's roster.
    roster = {a.dht_peer_id: a.max_weight for a in honest.beat().roster}
    assert roster[keys.dht_peer_id] > 0


def test_another_peers_swarm_ids_cannot_be_taken(live: Swarm) -> None:
    victim, squatter = Peer(live, "squat", "victim"), Peer(live, "squat", "squatter")
    victim_keys, squatter_keys = SwarmKeys(), SwarmKeys()
    # The victim's ids are public (the DHT): claimed bare, or with the squatter's own
    # keys' signatures, they are refused, and the victim binds them afterwards.
    with pytest.raises(CoordinatorError, match="swarm_proof") as bare:
        squatter.beat(dht_peer_id=victim_keys.dht_peer_id, progress_key=victim_keys.progress_key)
    assert bare.value.code == grpc.StatusCode.PERMISSION_DENIED

    def claim_with(signer: SwarmKeys, owner: Peer) -> None:
        """The squatter claims the victim's ids with ``signer``'s proof made for ``owner``."""
        proof = signer.proof(
            "squat", owner.identity.public_key, victim_keys.dht_peer_id, victim_keys.progress_key
        )
        squatter.beat(
            dht_peer_id=victim_keys.dht_peer_id,
            progress_key=victim_keys.progress_key,
            swarm_proof=proof.model_dump(),
        )

    with pytest.raises(CoordinatorError, match="not the key of|does not verify"):
        claim_with(squatter_keys, squatter)
    victim.beat(**victim_keys.fields("squat", victim.identity.public_key))
    row = _peer_row(live, "squat", victim.client.identity.peer_id)
    assert row["dht_peer_id"] == victim_keys.dht_peer_id
    # A proof made for another peer (the victim's own, replayed) binds nothing either.
    with pytest.raises(CoordinatorError, match="another peer"):
        claim_with(victim_keys, victim)
    victim.beat(dht_peer_id=victim_keys.dht_peer_id, progress_key=victim_keys.progress_key)


def test_a_free_rider_with_its_own_progress_records_is_not_credited(
    live: Swarm, tmp_path: Path
) -> None:
    """The free rider of issue 14: a fast device claimed, its own valid progress records
    in the DHT claiming a high rate (bound to it with proof), and each shard reported the
    moment it is leased, times stretched to the clock slack, with samples that carry no
    losses. Once its spot check was skipped and the receipt verified; now nothing is
    credited, and its shard goes back to be trained by someone."""
    rider = Peer(live, "free", "rider", device="cuda:NVIDIA GB200")
    keys = SwarmKeys()
    publisher = publish_fake_progress(live, "rider-progress", "free", keys, tmp_path)
    rider.beat(**keys.fields("free", rider.identity.public_key))
    live.wait_for(lambda: "publishing as" in publisher.output(), 60, "the rider's records")
    time.sleep(7.0)  # the coordinator reads the DHT every 3 s: it has seen them twice
    (lease,) = rider.client.lease(rider.token, 1)
    now = time.time()
    rider.report(
        ReceiptPayload(
            shard_id=lease.shard_id,
            epoch=lease.epoch,
            num_sequences=16,
            num_tokens=16 * 64,
            loss_sum=16 * 5.5,
            started=now - 5.0,
            finished=now + 4.9,
            micro_batch_size=8,
            samples=[ReceiptSample(step=0, batch=0, losses=[])],
        )
    )

    def decided() -> list[dict] | None:
        rows = live.get("/api/runs/free/ledger")["receipts"]
        return rows if rows and all(r["status"] != "pending" for r in rows) else None

    (receipt,) = live.wait_for(decided, 90, "the receipt decided")
    assert receipt["status"] == "unverified", receipt
    coverage = live.get("/api/runs/free/coverage")
    state = next(s["state"] for s in coverage["shards"] if s["shard"] == lease.shard_id)
    assert state != "done", coverage
    row = next(p for p in live.get("/api/runs/free/ledger")["peers"] if p["name"] == "rider")
    assert row["verified_tokens"] == 0, row
    assert receipt["checks"]["dht"] in ("ok", "not checked"), receipt  # its records passed
    live.kill(publisher)


def test_a_fault_between_shard_and_check_loses_no_receipt(live: Swarm) -> None:
    """A receipt is stored with its check or not at all: once, a failure between them
    left the shard done and the retry refused as already receipted, never checked."""
    peer = Peer(live, "fault", "peer")
    (lease,) = peer.client.lease(peer.token, 1)
    now = time.time()
    receipt = ReceiptPayload(
        shard_id=lease.shard_id,
        epoch=lease.epoch,
        num_sequences=8,
        num_tokens=8 * 64,
        loss_sum=8 * 5.5,
        started=now - 1,
        finished=now,
        micro_batch_size=8,
        samples=[ReceiptSample(step=0, batch=0, losses=[5.5] * 8)],
    )
    db = sqlite3.connect(live.coord_dir / "coordinator.db", timeout=30)
    try:
        db.execute(
            "CREATE TRIGGER injected_fault BEFORE INSERT ON receipt_checks"
            " BEGIN SELECT RAISE(ABORT, 'injected fault'); END"
        )
        db.commit()
        with pytest.raises(CoordinatorError):
            peer.report(receipt)
    finally:
        db.execute("DROP TRIGGER IF EXISTS injected_fault")
        db.commit()
        db.close()
    assert peer.report(receipt)  # the retry is taken, and checked
    row = next(r for r in live.get("/api/runs/fault/ledger")["receipts"])
    assert row["shard_id"] == lease.shard_id and row["status"], row


def test_a_flood_of_challenges_does_not_lock_registration(live: Swarm) -> None:
    """Challenges are stateless: however many are asked for, a node still registers.
    (The bench floods 100,000; a test stays short.)"""
    channel = grpc.insecure_channel(live.ports["grpc_target"])
    stub = pb_grpc.CoordinatorStub(channel)
    try:
        challenges = set()
        for _ in range(30):  # 100 in flight at a time: HTTP/2's stream limit
            calls = [stub.Challenge.future(pb.ChallengeRequest(run_id="flood")) for _ in range(100)]
            challenges |= {c.result(timeout=60).challenge for c in calls}
    finally:
        channel.close()
    assert len(challenges) == 3000
    Peer(live, "flood", "late-comer").beat()


def test_a_challenge_is_bound_to_its_run_and_coordinator(live: Swarm) -> None:
    channel = grpc.insecure_channel(live.ports["grpc_target"])
    try:
        stub = pb_grpc.CoordinatorStub(channel)
        issued = stub.Challenge(pb.ChallengeRequest(run_id="flood")).challenge
        forged = issued[:-1] + bytes([issued[-1] ^ 1])
        identity = Identity.generate()
        for challenge, run_id in ((forged, "flood"), (issued, "fault")):
            payload = {"challenge": challenge, "name": "probe", "device": "cpu"}
            envelope = envelope_to_pb(seal(identity, KIND_REGISTER, payload))
            with pytest.raises(grpc.RpcError) as refused:
                stub.Register(pb.RegisterRequest(run_id=run_id, envelope=envelope))
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "did not issue" in (refused.value.details() or "")
    finally:
        channel.close()


def test_serving_beyond_loopback_in_clear_text_needs_insecure(tmp_path: Path) -> None:
    refused = run_cli(COORDINATOR, "serve", "--data-dir", str(tmp_path / "c"), "--host", "0.0.0.0")
    assert refused.returncode != 0
    assert "--insecure" in refused.stderr and "in clear" in refused.stderr, refused.stderr
    assert not (tmp_path / "c" / "ports.json").exists()


def test_half_sent_requests_are_closed_and_others_still_served(live: Swarm) -> None:
    """1,000 connections that each send half a request head (slowloris): requests are
    still answered meanwhile, and the coordinator closes those connections once their
    head is late (uvicorn alone kept them open for good)."""
    host, port = live.url.removeprefix("http://").split(":")
    sockets = []
    try:
        for _ in range(1000):
            sock = socket.create_connection((host, int(port)), timeout=10)
            sock.sendall(b"GET /api/runs HTTP/1.1\r\nHost: coordinator\r\nX-Slow: ")
            sockets.append(sock)
        assert live.get("/api/runs")  # served while they hang
        poller = select.poll()  # select.select stops at descriptor 1024
        for sock in sockets:
            poller.register(sock, select.POLLIN)
        open_ones = {sock.fileno() for sock in sockets}
        deadline = time.monotonic() + HEAD_TIMEOUT_S + 5.0
        while open_ones and time.monotonic() < deadline:
            for fd, _ in poller.poll(500):  # readable here: closed (or reset) by the server
                open_ones.discard(fd)
                poller.unregister(fd)
        assert not open_ones, f"{len(open_ones)} half-sent requests still open"
        assert live.get("/api/runs")
    finally:
        for sock in sockets:
            sock.close()
