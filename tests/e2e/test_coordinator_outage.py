"""Training never waits for the coordinator: a node outlives its coordinator and reconnects."""

import signal
import time

import pytest

from tests.swarm import Swarm, write_spec

pytestmark = pytest.mark.slow


def test_node_keeps_training_through_a_coordinator_restart(swarm: Swarm) -> None:
    data = swarm.prepare()
    assert swarm.publish(write_spec(swarm.root / "tiny.toml"), data).returncode == 0
    first = swarm.start_coordinator()
    ports = dict(swarm.ports)
    node = swarm.start_node("node-a")

    def tokens() -> int:
        peers = swarm.get("/api/runs/tiny/peers")
        return peers[0]["num_tokens"] if peers else 0

    swarm.wait_for(lambda: tokens() > 0, timeout=120, what="the node to train")
    swarm.stop(first, signal.SIGKILL)
    time.sleep(8)
    assert node.popen.poll() is None, node.output()
    assert "lost the coordinator" in node.output()

    swarm.start_coordinator(
        http_port=ports["http_port"], grpc_port=ports["grpc_port"], dht_port=ports["dht_port"]
    )
    before = tokens()
    swarm.wait_for(lambda: tokens() > before, timeout=60, what="heartbeats after the restart")
    assert swarm.stop(node, signal.SIGINT) == 0, node.output()
    assert "coordinator reachable again" in node.output()
    assert swarm.get("/api/runs/tiny/peers")[0]["state"] == "left"
