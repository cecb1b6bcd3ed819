"""State comes from the coordinator's side in a DiLoCo run: real coordinator, real nodes.

The keeper's round follower takes part in every round (weight 0), so it holds each
round's global state. A node killed with SIGKILL and started again, and a node that
joins late, both start from the keeper's checkpoint over HTTP and take part in the
rounds, and no volunteer's uplink carries a byte of state. With every node behind NAT
(client mode: nobody accepts connections), the follower is the reducer and rounds
still advance.
"""

from __future__ import annotations

import re
import signal

import pytest

from tests.specs import TINY_DILOCO, write_tiny_spec
from tests.swarm import Process, Swarm

pytestmark = pytest.mark.slow

DILOCO = {
    "optimizer": TINY_DILOCO,
    "verify": {"spot_check_fraction": 0.0},
}


def averaged(node: Process) -> list[int]:
    """The rounds ``node`` averaged with at least one other node."""
    found = re.findall(r"round (\d+) averaged with (\d+) peers", node.output())
    return [int(r) for r, n in found if int(n) >= 2]


def state_sent(swarm: Swarm) -> dict[str, int]:
    return {p["name"]: p["traffic"]["state"]["sent"] for p in swarm.get("/api/runs/tiny/peers")}


def start_run(swarm: Swarm) -> None:
    data = swarm.prepare(16_384)
    spec = write_tiny_spec(swarm.root / "tiny.toml", **DILOCO)
    assert swarm.publish(spec, data).returncode == 0
    swarm.start_coordinator()
    # The follower is up once round 0 is kept (it writes the round it starts from).
    swarm.wait_for(lambda: swarm.get("/api/runs/tiny/checkpoints"), 60, "the follower")


def test_a_restarted_node_and_a_late_joiner_start_from_the_keeper(swarm: Swarm) -> None:
    start_run(swarm)
    first = swarm.start_node("node-a")
    doomed = swarm.start_node("node-b")
    swarm.wait_for(lambda: len(averaged(doomed)) >= 2, 180, "two rounds of node-a and node-b")

    swarm.kill(doomed)  # SIGKILL, its hivemind helpers too
    restarted = swarm.start_node("node-b")
    swarm.wait_for(lambda: len(averaged(restarted)) >= 1, 240, "node-b back in a round")
    late = swarm.start_node("node-c", "--client-mode")
    swarm.wait_for(lambda: len(averaged(late)) >= 1, 240, "node-c in a round")

    for node in (restarted, late):
        output = node.output()
        assert "started from the keeper's checkpoint" in output, output
        assert "with its outer momentum" in output, output
        assert "from a peer" not in output, output  # rounds it missed came from the follower
    for node in (first, restarted, late):
        node.popen.send_signal(signal.SIGINT)
    for node in (first, restarted, late):
        assert node.wait(timeout=60) == 0, node.output()
    # Every byte of state a volunteer's uplink carried, by each node's own count: none
    # for joining. Only a round that failed for everyone (a reducer timing out on 2 busy
    # cores) makes nodes apply their own pseudo-gradients and then reconcile, one state
    # download per reload, from a peer: the follower did not take part in that round.
    sent = sum(state_sent(swarm).values())
    logs = "".join(n.output() for n in (first, doomed, restarted, late))
    reloads = logs.count("differed from the group's; reloading them")
    if "applying our own pseudo-gradient" not in logs:
        assert sent == 0, state_sent(swarm)
    else:
        assert sent <= reloads * served_bytes(swarm) * 1.05, (state_sent(swarm), reloads)


def served_bytes(swarm: Swarm) -> int:
    """The size of one served DiLoCo state: global parameters and outer momentum, fp32."""
    kept = max(swarm.get("/api/runs/tiny/checkpoints"), key=lambda c: c["step"])
    return 2 * int(kept["num_bytes"])


def test_nodes_all_behind_nat_average_through_the_follower(swarm: Swarm) -> None:
    start_run(swarm)
    nodes = [swarm.start_node(name, "--client-mode") for name in ("node-a", "node-b")]
    for node in nodes:
        swarm.wait_for(lambda n=node: len(averaged(n)) >= 3, 240, f"three rounds of {node.name}")
    for node in nodes:
        assert "and the coordinator's follower" in node.output(), node.output()
        node.popen.send_signal(signal.SIGINT)
    for node in nodes:
        assert node.wait(timeout=60) == 0, node.output()
    kept = [c["step"] for c in swarm.get("/api/runs/tiny/checkpoints")]
    assert max(kept) >= 3, kept
    assert set(state_sent(swarm).values()) == {0}, state_sent(swarm)
