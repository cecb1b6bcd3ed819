"""The optimizer modes end to end: a real coordinator and real nodes, through their
command lines.

sync: two nodes train one model (averaging one step stale, fp16 on the wire), the
second joining late from the swarm's state; both leave cleanly and SIGTERM stops the
whole coordinator.

diloco: Two nodes advance outer rounds together, a node that joins late (in client
mode, as behind NAT) starts from the keeper's checkpoint of the round and takes part,
the keeper's follower keeps every round's global parameters bit for bit without a
byte of state from a volunteer, receipts are verified (spot checks skipped: local parameters change every
inner step) and validation loss falls.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import httpx
import pytest

from crowdtrain.model import load_checkpoint, params_sha256
from tests.specs import TINY_DILOCO, write_tiny_spec
from tests.swarm import Swarm

pytestmark = pytest.mark.slow

DILOCO = {
    "optimizer": {**TINY_DILOCO, "pseudo_grad_compression": "8bit"},
    "verify": {"checkpoint_every_s": 3.0, "spot_check_fraction": 1.0},
}


# sync, averaging in the background one step stale, fp16 on the wire.
DELAYED = {
    "optimizer": {
        "target_batch_size": 32,
        "micro_batch_size": 8,
        "lr": 0.005,
        "warmup_steps": 2,
        "delay_optimizer_step": True,
        "delay_grad_averaging": True,
        "grad_compression": "fp16",
        "state_compression": "fp16",
    }
}


def spec_with(swarm: Swarm, sections: dict) -> Path:
    """The tiny test spec with ``sections`` (every key of its [optimizer] among them)."""
    return write_tiny_spec(swarm.root / "tiny.toml", **sections)


def group_alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_sync_nodes_train_together_with_delayed_averaging_and_fp16(swarm: Swarm) -> None:
    """Two real nodes train one model in sync mode (averaging one step stale, fp16 on the
    wire); the second joins late and loads the swarm's state first; both leave cleanly,
    and SIGTERM stops the whole coordinator."""
    data = swarm.prepare(16_384)
    published = swarm.publish(spec_with(swarm, DELAYED), data)
    assert published.returncode == 0, published.stderr
    coordinator = swarm.start_coordinator()
    first = swarm.start_node("node-a")
    swarm.wait_for(lambda: swarm.get("/api/runs/tiny")["step"] >= 2, 120, "node-a's first steps")
    # The run is under way: the second node loads the swarm's state before training.
    late = swarm.start_node("node-b")
    nodes = [first, late]
    swarm.wait_for(lambda: swarm.get("/api/runs/tiny")["step"] >= 8, 180, "eight steps")
    swarm.wait_trained(*nodes)
    # Ctrl-C to both at once (a peer left alone waits a whole averaging timeout for a
    # group): each leaves cleanly and the coordinator marks it as left.
    for node in nodes:
        node.popen.send_signal(signal.SIGINT)
    for node in nodes:
        assert node.wait(timeout=60) == 0, node.output()
    assert "loaded state of step" in late.output(), late.output()

    run = swarm.get("/api/runs/tiny")
    peers = {p["name"]: p for p in swarm.get("/api/runs/tiny/peers")}
    assert set(peers) == {"node-a", "node-b"}
    assert all(p["num_tokens"] > 0 for p in peers.values())
    assert all(p["state"] == "left" for p in peers.values()), peers
    assert run["first_val_loss"] > 5.0, run
    assert run["val_loss"] < run["first_val_loss"] - 0.5, run
    assert run["num_tokens"] == sum(p["num_tokens"] for p in peers.values())
    for name in ("node-a", "node-b"):
        assert (swarm.root / name / "runs" / "tiny" / "checkpoint.safetensors").exists()

    # SIGTERM stops the whole coordinator: servers, DHT and its p2p daemon.
    coordinator.popen.send_signal(signal.SIGTERM)
    assert coordinator.wait(timeout=60) == 0, coordinator.output()
    assert not group_alive(coordinator.popen.pid), "the coordinator left processes behind"
    assert not (swarm.coord_dir / "ports.json").exists()


def test_diloco_nodes_advance_rounds_and_a_late_joiner_loads_global_state(swarm: Swarm) -> None:
    data = swarm.prepare(16_384)
    published = swarm.publish(spec_with(swarm, DILOCO), data)
    assert published.returncode == 0, published.stderr
    swarm.start_coordinator()

    first = swarm.start_node("node-a")
    swarm.wait_for(lambda: swarm.get("/api/runs/tiny")["step"] >= 1, 120, "node-a's first round")
    # Behind NAT (or in a notebook): a client-mode peer takes part in the rounds too.
    late = swarm.start_node("node-b", "--client-mode")

    def late_rounds() -> int:
        return len(re.findall(r"round \d+ averaged with 2 peers", late.output()))

    swarm.wait_for(lambda: late_rounds() >= 3, 180, "three rounds averaged by both nodes")

    for node in (first, late):  # Ctrl-C: each leaves cleanly
        node.popen.send_signal(signal.SIGINT)
    for node in (first, late):
        assert node.wait(timeout=60) == 0, node.output()
    # Its global state came from the coordinator's side: the keeper's checkpoint of the
    # round with its outer momentum, or, when the keeper's newest was more than a round
    # behind (a busy verifier), the round from the keeper's follower.
    output = late.output()
    from_keeper = "started from the keeper's checkpoint" in output
    assert from_keeper or "from the coordinator's follower" in output, output
    assert not from_keeper or "with its outer momentum" in output, output
    assert "from a peer" not in output, output
    # The client-mode peer averaged with the other (it sends and receives, reduces nothing).
    assert "averaged with 2 peers" in late.output(), late.output()
    assert "averaged with 2 peers" in first.output(), first.output()

    run = swarm.get("/api/runs/tiny")
    peers = {p["name"]: p for p in swarm.get("/api/runs/tiny/peers")}
    assert all(p["num_tokens"] > 0 for p in peers.values()), peers
    assert peers["node-b"]["step"] >= 3, peers  # it reached later rounds with the others
    assert run["val_loss"] < run["first_val_loss"] - 0.5, run
    # Every byte by purpose, as each node counted it: both averaged; node-b downloaded
    # the state it joined with (from the keeper or node-a).
    a, b = peers["node-a"]["traffic"], peers["node-b"]["traffic"]
    for traffic in (a, b):
        assert traffic["averaging"]["sent"] > 0 and traffic["averaging"]["received"] > 0
        assert traffic["control"]["sent"] > 0 and traffic["data"]["received"] > 0
    assert b["state"]["received"] > 0, (a, b)

    def settled() -> dict | None:
        view = swarm.get("/api/runs/tiny/ledger")
        return view if all(r["status"] != "pending" for r in view["receipts"]) else None

    view = swarm.wait_for(settled, 60, "every receipt checked")
    receipts = view["receipts"]
    assert receipts and all(r["status"] != "rejected" for r in receipts), receipts
    assert {r["checks"]["spot"] for r in receipts} <= {"skipped", "not selected"}, receipts

    # The keeper's follower took part in every round, so it kept every round's global
    # parameters, bit for bit as each node holds them, without a byte of state from a node.
    kept = {c["step"]: c for c in swarm.get("/api/runs/tiny/checkpoints")}
    for node in (first, late):
        held = dict(re.findall(r"global parameters of round (\d+): ([0-9a-f]{64})", node.output()))
        assert held, node.output()
        for round_, sha256 in held.items():
            if int(round_) in kept:  # the newest rounds only: older files are pruned
                assert kept[int(round_)]["sha256"] == sha256, (round_, kept[int(round_)])
        rounds = sorted(int(r) for r in held)
        assert set(rounds[:-1]) <= set(kept), (rounds, sorted(kept))  # the last may be on its way
    assert all(p["traffic"]["state"]["sent"] == 0 for p in swarm.get("/api/runs/tiny/peers"))
    latest = max(kept.values(), key=lambda c: c["step"])
    assert latest["outer_sha256"], latest
    response = httpx.get(f"{swarm.url}/api/runs/tiny/checkpoints/{latest['step']}/file")
    response.raise_for_status()
    path = swarm.root / "latest.safetensors"
    path.write_bytes(response.content)
    state, _ = load_checkpoint(path)
    assert params_sha256(state) == latest["sha256"]
