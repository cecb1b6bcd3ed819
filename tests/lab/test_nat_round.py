"""The lab's small scenario in make test: a real coordinator, one public peer and one
peer behind a home NAT router (client mode), both on capped links, DiLoCo with 8-bit
pseudo-gradients. Both average the same round together (with the coordinator's
follower, the only reducer the NAT'd peer can reach besides the public peer), and the
NAT'd peer's uplink carries no more than its cap allows in the time it ran."""

from __future__ import annotations

from pathlib import Path

import pytest

from lab import nat_round
from lab.network import Lab

pytestmark = [pytest.mark.slow, pytest.mark.swarm]


def test_a_public_peer_and_a_peer_behind_nat_average_a_round(
    lab_ready: None, tmp_path: Path
) -> None:
    config = nat_round.NatRoundConfig(up_bps=2e6, down_bps=8e6, timeout_s=150)
    with Lab(nat_round.hosts(config), tmp_path) as lab:
        result = nat_round.run(lab, tmp_path, config)
    print(
        f"round {result.round} after {result.peers_s:.1f} s; the NAT'd peer's uplink "
        f"carried {result.home_uplink_bytes} bytes of {result.home_uplink_cap_bytes:.0f}"
    )
    assert result.home_uplink_bytes > 0
    assert result.home_uplink_bytes <= result.home_uplink_cap_bytes
