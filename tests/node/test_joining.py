"""The order joining builds a node in, and the order it takes it down: a join that fails
part-way shuts down what it started (leaving the run first), a joined node's stack shuts
down the link, then the optimizer, the DHT and the client. The phases are stand-ins."""

from __future__ import annotations

import threading
from contextlib import ExitStack
from pathlib import Path
from types import SimpleNamespace

import pytest

from crowdtrain.node.config import NodeConfig
from crowdtrain.node.joining import phases
from crowdtrain.node.stats.accounting import NodeStats


class _Phases:
    """Stand-ins for joining's phases that write down what starts and stops."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail_at: str = ""):
        self.log: list[str] = []
        self.fail_at = fail_at
        log = self.log
        session = SimpleNamespace(leave=lambda: log.append("leave"))
        contact = SimpleNamespace(
            session=session,
            device_name="cpu:1",
            registration=SimpleNamespace(heartbeat_interval_s=1.0),
        )

        def contact_coordinator(config, stop, stack: ExitStack, traffic):
            stack.callback(log.append, "client.close")
            log.append("contact")
            return contact

        def phase(name: str, result: object):
            def run(*args, **kwargs):
                self._maybe_fail(name)
                log.append(name)
                return result

            return run

        def join_swarm(config, contact, replica, data, stack: ExitStack):
            stack.callback(log.append, "dht.shutdown")
            self._maybe_fail("dht")
            stack.callback(log.append, "optimizer.shutdown")
            self._maybe_fail("swarm")
            log.append("swarm")
            return SimpleNamespace(dht_peer_id="Qm", progress_key="", guard=None, proof=None)

        class Link:
            def __init__(self, *args):
                log.append("link")

            def start(self):
                log.append("link.start")

            def shutdown(self):
                log.append("link.shutdown")  # its last heartbeat, then leaving the run

        def prefetch_checkpoint(config, contact, stack: ExitStack):
            stack.callback(log.append, "prefetch.discard")
            log.append("prefetch")
            return SimpleNamespace()

        monkeypatch.setattr(phases, "contact_coordinator", contact_coordinator)
        monkeypatch.setattr(phases, "prefetch_checkpoint", prefetch_checkpoint)
        monkeypatch.setattr(phases, "fetch_data", phase("data", SimpleNamespace()))
        monkeypatch.setattr(phases, "build_replica", phase("replica", SimpleNamespace()))
        shards = SimpleNamespace(supply=None)
        monkeypatch.setattr(phases, "lease_first_shards", phase("lease", shards))
        monkeypatch.setattr(phases, "join_swarm", join_swarm)
        monkeypatch.setattr(phases, "Reporter", lambda *args: None)
        monkeypatch.setattr(phases, "CoordinatorLink", Link)

    def _maybe_fail(self, name: str) -> None:
        if name == self.fail_at:
            raise RuntimeError(f"{name} failed")

    def join(self) -> phases.Joined:
        config = NodeConfig(url="http://c", run_id="r", home=Path("/nonexistent"))
        return phases.join(config, NodeStats(session_key="k" * 16), threading.Event())


def test_a_joined_node_shuts_down_link_first_then_optimizer_dht_client(monkeypatch) -> None:
    phases = _Phases(monkeypatch)
    joined = phases.join()
    assert phases.log == [
        "contact", "prefetch", "data", "replica", "lease", "swarm", "link", "link.start",
    ]  # fmt: skip
    phases.log.clear()
    joined.stack.close()
    assert phases.log == [
        "link.shutdown", "optimizer.shutdown", "dht.shutdown", "prefetch.discard", "client.close",
    ]  # fmt: skip


@pytest.mark.parametrize(
    "fail_at, stopped",
    [
        # registered, but never leased: as before, no leave
        ("data", ["prefetch.discard", "client.close"]),
        ("replica", ["leave", "prefetch.discard", "client.close"]),
        ("lease", ["leave", "prefetch.discard", "client.close"]),
        ("dht", ["leave", "dht.shutdown", "prefetch.discard", "client.close"]),
        (
            "swarm",
            ["leave", "optimizer.shutdown", "dht.shutdown", "prefetch.discard", "client.close"],
        ),
    ],
)
def test_a_join_that_fails_shuts_down_what_it_started(monkeypatch, fail_at, stopped) -> None:
    phases = _Phases(monkeypatch, fail_at)
    with pytest.raises(RuntimeError, match=f"{fail_at} failed"):
        phases.join()
    started = phases.log[: phases.log.index(stopped[0])]
    assert phases.log[len(started) :] == stopped
    assert "link" not in phases.log


def test_ctrl_c_keeps_its_handler_once_hivemind_averagers_started(tmp_path: Path) -> None:
    """hivemind's averagers set SIGINT to be ignored as they start and never set it back:
    a Ctrl-C pressed while the node then loads state from peers would be lost, and the
    node would train on. Real DHT and optimizer; the first build shows hivemind still does
    it (so the guard is still needed), the second that joining gives the handler back."""
    import signal

    import hivemind

    from crowdtrain.model import GPT, GPTConfig
    from crowdtrain.node.swarm.guard import SwarmGuard
    from crowdtrain.node.swarm.optimizer import build_optimizer
    from crowdtrain.protocol.runspec import parse_spec
    from tests.specs import small_spec

    def ctrl_c(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    specs = [
        parse_spec(
            small_spec(
                run={"id": run_id, "seed": None},
                model={"seq_len": 16, "num_layers": 1},
                optimizer={"target_batch_size": 8, "micro_batch_size": 4},
            )
        )
        for run_id in ("sigint-a", "sigint-b")
    ]
    previous = signal.signal(signal.SIGINT, ctrl_c)
    dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    built = []
    try:
        model = GPT(GPTConfig.from_spec(specs[0].model))
        guard = SwarmGuard(tmp_path / "guard", target_batch_size=8)
        built.append(build_optimizer(specs[0], model, dht, guard, micro_batch_size=4))
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN

        signal.signal(signal.SIGINT, ctrl_c)
        model = GPT(GPTConfig.from_spec(specs[1].model))
        guard = SwarmGuard(tmp_path / "guard-2", target_batch_size=8)
        with phases._sigint_kept():
            built.append(build_optimizer(specs[1], model, dht, guard, micro_batch_size=4))
        assert signal.getsignal(signal.SIGINT) is ctrl_c
    finally:
        for optimizer in built:
            optimizer.shutdown()
        dht.shutdown()
        signal.signal(signal.SIGINT, previous)
