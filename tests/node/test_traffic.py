"""The bytes a node counts, by purpose: across hivemind's forked averager processes, and
for state one real peer serves another (hivemind's download RPC, as our averagers serve it)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from crowdtrain.node.stats.traffic import Traffic
from crowdtrain.protocol.messages import TRAFFIC_PURPOSES, HeartbeatPayload


def test_counts_made_in_a_forked_child_reach_the_parent() -> None:
    traffic = Traffic()
    traffic.add("control", sent=10, received=20)
    pid = os.fork()
    if pid == 0:  # what hivemind's averager process does after the fork
        traffic.add("averaging", sent=1_000, received=2_000)
        os._exit(0)
    os.waitpid(pid, 0)
    counts = traffic.counts()
    assert list(counts) == list(TRAFFIC_PURPOSES)
    assert (counts["averaging"].sent, counts["averaging"].received) == (1_000, 2_000)
    assert (counts["control"].sent, counts["control"].received) == (10, 20)
    assert traffic.total_sent() == 1_010
    # The heartbeat carries them as they are.
    beat = HeartbeatPayload(
        session_key="k" * 16, num_tokens=0, num_sequences=0, tokens_per_s=0.0, step=0,
        traffic=counts,
    )  # fmt: skip
    assert beat.traffic["averaging"].sent == 1_000
    with pytest.raises(ValueError):
        traffic.add("gossip", sent=1)


def test_state_one_peer_serves_another_is_counted_on_both_sides(tmp_path: Path) -> None:
    import hivemind

    from crowdtrain.model import GPT, GPTConfig
    from crowdtrain.node.swarm.guard import SwarmGuard
    from crowdtrain.node.swarm.optimizer import build_optimizer
    from crowdtrain.protocol.runspec import parse_spec
    from tests.specs import small_spec

    spec = parse_spec(
        small_spec(
            run={"id": "traffic", "seed": None},
            model={"seq_len": 16, "num_layers": 1},
            optimizer={"target_batch_size": 8, "micro_batch_size": 4},
        )
    )
    handler = signal.getsignal(signal.SIGINT)
    first = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    second = hivemind.DHT(
        start=True,
        host_maddrs=["/ip4/127.0.0.1/tcp/0"],
        initial_peers=[str(a) for a in first.get_visible_maddrs()],
    )
    built, traffic = [], {"server": Traffic(), "joiner": Traffic()}
    try:
        for name, dht in (("server", first), ("joiner", second)):
            guard = SwarmGuard(tmp_path / name, target_batch_size=8, traffic=traffic[name])
            model = GPT(GPTConfig.from_spec(spec.model))
            built.append(build_optimizer(spec, model, dht, guard, micro_batch_size=4))
        server, joiner = built
        server.state_averager.local_epoch = 5
        server.state_averager.state_sharing_priority = 5
        loaded = None
        for _ in range(20):  # until the server's declaration is in the DHT
            loaded = joiner.state_averager.load_state_from_peers(timeout=10)
            if traffic["joiner"].received("state") > 0:
                break
        assert traffic["joiner"].received("state") > 0, loaded
        params = sum(p.numel() * p.element_size() for p in model.parameters())
        # Parameters and Adam's two statistics, as hivemind's state holds them.
        assert traffic["joiner"].received("state") >= params
        assert traffic["server"].sent("state") >= traffic["joiner"].received("state")
        assert traffic["joiner"].sent("state") == 0 and traffic["server"].received("state") == 0
    finally:
        for optimizer in built:
            optimizer.shutdown()
        second.shutdown()
        first.shutdown()
        signal.signal(signal.SIGINT, handler)
