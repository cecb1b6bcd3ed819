"""Each direction of a host's link carries what its cap allows: a TCP stream between
a peer host and the coordinator host, plain sockets on both ends, measures within a
quarter of the cap, the uplink and the downlink each at its own rate."""

from __future__ import annotations

from pathlib import Path

import pytest

from lab.network import HostSpec, Lab, Link
from lab.speed import measure

pytestmark = [pytest.mark.slow]

UP_BPS, DOWN_BPS = 3e6, 10e6


def test_uplink_and_downlink_are_capped_each_at_its_rate(lab_ready: None, tmp_path: Path) -> None:
    hosts = [HostSpec("coordinator"), HostSpec("peer", Link(UP_BPS, DOWN_BPS))]
    with Lab(hosts, tmp_path) as lab:
        up = measure(lab, "peer", "coordinator", "up", seconds=3)
        down = measure(lab, "peer", "coordinator", "down", seconds=3)
    print(
        f"up {up.bps / 1e6:.2f} of {UP_BPS / 1e6:g}, down {down.bps / 1e6:.2f} of {DOWN_BPS / 1e6:g}"
    )
    assert up.bps == pytest.approx(UP_BPS, rel=0.25), up
    assert down.bps == pytest.approx(DOWN_BPS, rel=0.25), down
