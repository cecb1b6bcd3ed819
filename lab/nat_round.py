"""The lab's small scenario: a DiLoCo round across a home NAT, on capped links.

A coordinator on the coordinator host (its lab address, no TLS: ``--insecure``), a
public peer that accepts connections at its own address, and a peer behind a home
NAT router in hivemind's client mode (it dials out, nobody dials in); both peers on
capped links. The scenario waits until both have averaged the same round together
and counts what the NAT'd peer's uplink carried (the home router's WAN counter).

Coordinator and nodes are started through their command lines by
:class:`tests.swarm.Swarm`, each on its host (:class:`LabSwarm`).
"""

from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from lab.network import HostSpec, Lab, Link
from tests.specs import TINY_DILOCO, write_tiny_spec
from tests.swarm import Process, Swarm

COORDINATOR, PUBLIC, HOME = "coordinator", "public", "home"
PLACEMENT = {"coordinator": COORDINATOR, "node-public": PUBLIC, "node-home": HOME}
# Rounds of 20 inner steps (about 8 s here) instead of the tiny run's 5: the peer behind
# NAT joins a few seconds after the public one (its DHT start in client mode takes longer),
# and with 2-second rounds it spent a minute and more loading each round the public
# peer had already finished before the two met in one.
DILOCO = {"optimizer": {**TINY_DILOCO, "inner_steps": 20, "pseudo_grad_compression": "8bit"}}

_GET = (
    "import sys, urllib.request\n"
    "sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())"
)


class LabSwarm(Swarm):
    """A :class:`tests.swarm.Swarm` whose processes run on lab hosts: ``placement``
    maps each process name to its host. Its HTTP requests are made from the
    coordinator's host (the lab's addresses exist only in its namespaces)."""

    def __init__(self, root: Path, lab: Lab, placement: dict[str, str]):
        super().__init__(root=root)
        self.lab = lab
        self.placement = placement

    def spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> Process:
        started = self.lab.spawn(self.placement[name], name, args, env)
        process = Process(name, started.popen, started.log)
        self.processes.append(process)
        return process

    def get(self, path: str) -> Any:
        result = self.lab.run(COORDINATOR, [sys.executable, "-c", _GET, f"{self.url}{path}"])
        if result.returncode != 0:
            raise httpx.HTTPError(f"GET {path} from the coordinator's host: {result.stderr}")
        return json.loads(result.stdout)


@dataclass(frozen=True)
class NatRoundConfig:
    """The scenario's links (bits per second, each peer alike) and patience."""

    up_bps: float = 2e6
    down_bps: float = 8e6
    timeout_s: float = 150.0


@dataclass(frozen=True)
class NatRoundResult:
    """What the scenario saw: the first round both peers averaged together, how long the
    peers ran until then, and what the NAT'd peer's uplink carried meanwhile."""

    round: int
    peers_s: float
    home_uplink_bytes: int
    config: NatRoundConfig

    @property
    def home_uplink_cap_bytes(self) -> float:
        """What the NAT'd peer's capped uplink could carry at most in that time."""
        return self.config.up_bps / 8 * self.peers_s


def averaged(node: Process) -> set[int]:
    """The rounds ``node`` averaged with at least one other node."""
    found = re.findall(r"round (\d+) averaged with (\d+) peers", node.output())
    return {int(r) for r, n in found if int(n) >= 2}


def hosts(config: NatRoundConfig) -> list[HostSpec]:
    link = Link(config.up_bps, config.down_bps)
    return [
        HostSpec(COORDINATOR),
        HostSpec(PUBLIC, link),
        HostSpec(HOME, link, behind_nat=True),
    ]


def run(lab: Lab, root: Path, config: NatRoundConfig) -> NatRoundResult:
    """Run the scenario on ``lab`` (built from :func:`hosts`); files go under ``root``.
    Raises AssertionError, with the processes' logs, if the round does not come."""
    swarm = LabSwarm(root, lab, PLACEMENT)
    try:
        data = swarm.prepare(16_384)
        spec = write_tiny_spec(root / "tiny.toml", **DILOCO)
        published = swarm.publish(spec, data)
        assert published.returncode == 0, published.stderr
        coordinator = lab.host(COORDINATOR).address
        swarm.start_coordinator("--host", coordinator, "--insecure")
        # The follower is up once round 0 is kept (it writes the round it starts from).
        swarm.wait_for(lambda: swarm.get("/api/runs/tiny/checkpoints"), 90, "the follower")
        start, sent_before = time.monotonic(), lab.uplink_sent_bytes(HOME)
        public = swarm.start_node("node-public", "--dht-host", lab.host(PUBLIC).address)
        home = swarm.start_node("node-home", "--client-mode")
        both = swarm.wait_for(
            lambda: averaged(public) & averaged(home),
            config.timeout_s,
            "a round both peers averaged",
        )
        return NatRoundResult(
            round=min(both),
            peers_s=time.monotonic() - start,
            home_uplink_bytes=lab.uplink_sent_bytes(HOME) - sent_before,
            config=config,
        )
    finally:
        swarm.stop_all()
