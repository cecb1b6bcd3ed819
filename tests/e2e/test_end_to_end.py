"""Two real nodes train one model through a real coordinator, on loopback."""

import os
import signal

import pytest

from tests.swarm import Swarm, write_spec

pytestmark = pytest.mark.slow


def group_alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_two_nodes_train_together(swarm: Swarm) -> None:
    data = swarm.prepare()
    published = swarm.publish(write_spec(swarm.root / "tiny.toml"), data)
    assert published.returncode == 0, published.stderr
    coordinator = swarm.start_coordinator()

    first = swarm.start_node("node-a")
    swarm.wait_for(lambda: swarm.get("/api/runs/tiny")["step"] >= 2, 120, "node-a's first steps")
    # The run is under way: the second node loads the swarm's state before training.
    late = swarm.start_node("node-b")

    def two_active_peers_with_tokens():
        peers = swarm.get("/api/runs/tiny/peers")
        active = [p for p in peers if p["state"] == "active" and p["num_tokens"] > 0]
        return len(active) == 2

    swarm.wait_for(two_active_peers_with_tokens, timeout=120, what="two peers training")
    # Ctrl-C to both at once (a peer left alone waits a whole averaging timeout for a
    # group): each leaves cleanly and the coordinator marks it as left.
    first.popen.send_signal(signal.SIGINT)
    assert swarm.stop(late, signal.SIGINT, timeout=60) == 0, late.output()
    assert first.wait(timeout=60) == 0, first.output()
    assert "loaded state of step" in late.output(), late.output()

    run = swarm.get("/api/runs/tiny")
    peers = {p["name"]: p for p in swarm.get("/api/runs/tiny/peers")}
    assert set(peers) == {"node-a", "node-b"}
    assert all(p["num_tokens"] > 0 for p in peers.values())
    assert all(p["state"] == "left" for p in peers.values()), peers
    assert run["step"] >= 2, run
    assert run["first_val_loss"] > 5.0, run
    assert run["val_loss"] < run["first_val_loss"] - 1.0, run
    assert run["num_tokens"] == sum(p["num_tokens"] for p in peers.values())
    for name in ("node-a", "node-b"):
        assert (swarm.root / name / "runs" / "tiny" / "checkpoint.safetensors").exists()

    # SIGTERM stops the whole coordinator: servers, DHT and its p2p daemon.
    coordinator.popen.send_signal(signal.SIGTERM)
    assert coordinator.wait(timeout=60) == 0, coordinator.output()
    assert not group_alive(coordinator.popen.pid), "the coordinator left processes behind"
    assert not (swarm.coord_dir / "ports.json").exists()
