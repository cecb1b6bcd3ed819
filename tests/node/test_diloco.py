"""DiLoCo over hivemind: exact averages, rounds between real peer processes, late joiners.

The all-reduce test runs hivemind's real protocol between in-process peers;
the swarm tests start each peer as its own process (tests/node/diloco_peer.py)
and kill every process group they started, pass or fail.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import hivemind
import pytest
import torch
from hivemind.compression import Uniform8BitQuantization
from hivemind.p2p import P2P

from crowdtrain.model import GPT, GPTConfig, param_groups, params_sha256
from crowdtrain.node.swarm.allreduce import GuardedAllReduceRunner
from crowdtrain.node.swarm.compression import install_decoders
from crowdtrain.node.swarm.diloco import DiLoCoConfig, DiLoCoOptimizer
from crowdtrain.node.swarm.guard import GuardConfig, SwarmGuard
from crowdtrain.node.swarm.rounds import canonical_sha256, round_bits, round_may_still_meet
from crowdtrain.protocol.runspec import SwarmSection, parse_spec
from tests.specs import small_spec
from tests.swarm import ScriptPeers

pytestmark = pytest.mark.swarm

PEER = Path(__file__).parent / "diloco_peer.py"


async def _exact_all_reduce(
    folder: Path,
    num_peers: int,
    client_index: int | None = None,
    weights: list[float] | None = None,
    exact: bool = True,
) -> list[list[torch.Tensor]]:
    """Peers average different vectors with 8-bit compression (peer i with weight i + 1
    unless ``weights`` says otherwise); returns every peer's result."""
    p2ps = [await P2P.create()]
    maddrs = await p2ps[0].get_visible_maddrs()
    p2ps += [await P2P.create(initial_peers=maddrs) for _ in range(num_peers - 1)]
    try:
        peer_ids = [p.peer_id for p in p2ps]
        fractions = tuple(0.0 if i == client_index else 1.0 for i in range(num_peers))
        runners = []
        for index, p2p in enumerate(p2ps):
            generator = torch.Generator().manual_seed(index)
            tensors = [torch.randn(3000, generator=generator), torch.randn(17, generator=generator)]
            guard = GuardConfig(folder / f"peer{index}", unknown_max_weight=100.0)
            guard.folder.mkdir(parents=True)
            runner = GuardedAllReduceRunner(
                guard=guard,
                max_weight=lambda peer_id: 100.0,
                exact_results=exact,
                p2p=p2p,
                servicer_type=GuardedAllReduceRunner,
                prefix=None,
                group_id=b"group",
                tensors=tensors,
                weight=float(index + 1) if weights is None else weights[index],
                ordered_peer_ids=peer_ids,
                peer_fractions=fractions,
                compression=Uniform8BitQuantization(),
                part_size_bytes=1024,
                sender_timeout=5.0,
                reducer_timeout=10.0,
            )
            await runner.add_p2p_handlers(p2p)
            runners.append(runner)

        async def run(runner: GuardedAllReduceRunner) -> list[torch.Tensor]:
            results = [average async for average in runner]
            assert runner.tensor_part_container.failed_size == 0
            return results

        return await asyncio.wait_for(asyncio.gather(*(run(r) for r in runners)), timeout=60)
    finally:
        for p2p in p2ps:
            await p2p.shutdown()


@pytest.mark.parametrize("client_index", [None, 2], ids=["three-reducers", "with-a-client"])
def test_exact_averages_are_bit_identical_on_every_peer_with_8bit_compression(
    tmp_path: Path, client_index: int | None
) -> None:
    """Plain hivemind hands each peer its own rounding (and a reducer its uncompressed
    slice); the exact runner hands every peer the same bytes, a client-mode peer too."""
    install_decoders()
    results = asyncio.run(_exact_all_reduce(tmp_path, num_peers=3, client_index=client_index))
    expected = []
    for values in zip(*(_inputs(i) for i in range(3)), strict=True):
        expected.append(sum((i + 1) * v for i, v in enumerate(values)) / 6)
    for result in results:
        for ours, first in zip(result, results[0], strict=True):
            assert torch.equal(ours, first)  # bit for bit
        for ours, exact in zip(result, expected, strict=True):
            # 8-bit compression of the inputs and of the average: close, not equal
            assert float((ours - exact).norm() / exact.norm()) < 0.1


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "hivemind's"])
def test_a_group_whose_every_part_weighs_nothing_averages_to_zero_not_nan(
    tmp_path: Path, exact: bool
) -> None:
    """The keeper's step follower sends weight 0, and so does a node tagging along with
    nothing accumulated: hivemind's reducer divides by the total weight, 0/0, and hands
    every member NaN. Such a group contributes nothing: zero."""
    install_decoders()
    results = asyncio.run(_exact_all_reduce(tmp_path, num_peers=2, weights=[0.0, 0.0], exact=exact))
    for result in results:
        for tensor in result:
            assert bool(torch.isfinite(tensor).all()), "the weightless group averaged to NaN"
            if exact:
                assert not bool(tensor.any())


SPEC = parse_spec(
    small_spec(
        run={"id": "dilocounit", "seed": None},
        model={"seq_len": 16, "num_layers": 1},
        optimizer={
            "mode": "diloco",
            "target_batch_size": 8,
            "inner_steps": 5,
            "inner_batch_size": 4,
            "micro_batch_size": 4,
        },
    )
)


def _diloco(dht: hivemind.DHT, seed: int, guard: SwarmGuard | None = None) -> DiLoCoOptimizer:
    torch.manual_seed(seed)
    model = GPT(GPTConfig.from_spec(SPEC.model))
    config = DiLoCoConfig(
        run_id=SPEC.run.id,
        optimizer=SPEC.optimizer,
        swarm=SwarmSection(request_timeout_s=1.0, matchmaking_time_s=2.0),
        client_mode=False,
    )
    return DiLoCoOptimizer(
        config,
        dht=dht,
        model=model,
        params=param_groups(model, 0.1),
        inner_optimizer=torch.optim.AdamW,
        scheduler=None,
        swarm_guard=guard,
    )


def test_inner_steps_take_the_sequence_weighted_mean_gradient() -> None:
    """Micro-batches of 3 and 1 sequences make one inner step on their mean gradient, like
    one batch of 4; a micro-batch dropped with zero_grad() (non-finite, say) counts for nothing."""
    handler = signal.getsignal(signal.SIGINT)
    dht = hivemind.DHT(start=True)
    opt = None
    try:
        opt = _diloco(dht, seed=0)
        reference = GPT(opt.model.config)
        reference.load_state_dict(opt.model.state_dict())
        reference_opt = torch.optim.AdamW(param_groups(reference, 0.1))
        batch = torch.randint(0, 256, (4, 17), generator=torch.Generator().manual_seed(0))

        opt.model(batch[:3, :-1], batch[:3, 1:])[1].backward()
        opt.step(3)
        assert opt.inner_step == 0
        opt.model(batch[:, :-1].flip(0), batch[:, 1:])[1].backward()
        opt.zero_grad()
        opt.model(batch[3:, :-1], batch[3:, 1:])[1].backward()
        opt.step(1)
        assert opt.inner_step == 1 and opt.tracker.local_progress.samples_accumulated == 4

        reference(batch[:, :-1], batch[:, 1:])[1].backward()
        reference_opt.step()
        for ours, theirs in zip(opt.model.parameters(), reference.parameters(), strict=True):
            assert torch.allclose(ours, theirs, atol=1e-6)
            assert ours.grad is None
    finally:
        if opt is not None:
            opt.shutdown()
        dht.shutdown()
        signal.signal(signal.SIGINT, handler)


def test_rounds_meet_only_their_own_round_and_the_most_held_hash_wins() -> None:
    assert round_bits(3) == "00000011" and round_bits(3 + 256) == round_bits(3)
    assert round_bits(4) != round_bits(3)
    group = [{"sha256": "b", "weight": 5.0}, {"sha256": "a", "weight": 2.0}, {"sha256": "a"}]
    assert canonical_sha256(group) == "a"
    # a member's gathered weight is its own claim: 1e300 buys nothing (it did, issue 15)
    group = [{"sha256": "x", "weight": 1e300}, {"sha256": "a"}, {"sha256": "a"}]
    assert canonical_sha256(group) == "a"
    assert canonical_sha256([{"sha256": "b", "weight": 1}, {"sha256": "a", "weight": 9}]) == "a"
    assert canonical_sha256([None, {}]) is None
    # a client-mode peer cannot serve its parameters: the serving peers' hash wins
    group = [{"sha256": "c", "weight": 9.0}, {"sha256": "f", "weight": 1.0, "serves": True}]
    assert canonical_sha256(group) == "f"
    # the coordinator's follower (weight 0) counts only when no volunteer serves: then
    # its state is the one every client-mode peer can download and converge on
    follower = {"sha256": "k", "weight": 0.0, "follower": True}
    assert canonical_sha256([*group, follower]) == "f"
    assert canonical_sha256([{"sha256": "c", "weight": 9.0}, follower]) == "k"
    assert canonical_sha256([follower]) == "k"
    # a tie among serving volunteers goes to the hash the follower holds
    tie = [{"sha256": "a", "serves": True}, {"sha256": "k", "serves": True}, follower]
    assert canonical_sha256(tie) == "k"


def test_a_round_waits_only_for_peers_that_may_still_come_to_it() -> None:
    # another peer still training round 5, or averaging it: wait
    assert round_may_still_meet(5, announced=[], peer_rounds=[5])
    assert round_may_still_meet(5, announced=[5.0], peer_rounds=[6])
    # the coordinator's follower holds round 5 (announces 5.5): it comes to round 5
    assert round_may_still_meet(5, announced=[5.5], peer_rounds=[])
    # nobody else, or everyone moved past the round
    assert not round_may_still_meet(5, announced=[], peer_rounds=[])
    assert not round_may_still_meet(5, announced=[], peer_rounds=[7, 8])
    # someone serves round 6 already: take its state rather than wait
    assert not round_may_still_meet(5, announced=[6.0], peer_rounds=[5])
    assert not round_may_still_meet(5, announced=[6.5], peer_rounds=[5])


def test_a_late_joiner_loads_the_global_state_of_a_round(tmp_path: Path) -> None:
    handler = signal.getsignal(signal.SIGINT)
    dhts: list[hivemind.DHT] = []
    optimizers: list[DiLoCoOptimizer] = []
    try:
        dhts.append(hivemind.DHT(start=True))
        dhts.append(hivemind.DHT(initial_peers=dhts[0].get_visible_maddrs(), start=True))
        server = _diloco(dhts[0], seed=0)
        optimizers.append(server)
        for _ in range(3):  # three outer steps of a made-up average
            server._outer_step([torch.full_like(g, 0.01) for g in server.global_params])
        served = server.global_params_sha256()
        momentum = [server.outer.state[g]["momentum_buffer"] for g in server.global_params]

        guard = SwarmGuard(tmp_path / "guard", target_batch_size=8)
        guard.coordinator_step = lambda: 100  # the coordinator is far ahead: refuse
        guard.coordinator_lag_s = 0.0
        joiner = _diloco(dhts[1], seed=1, guard=guard)
        optimizers.append(joiner)
        guard.named_parameters = list(joiner.model.named_parameters(remove_duplicate=False))
        assert not joiner.load_state_from_peers(timeout=10)
        assert "behind the coordinator's step 100" in joiner.last_refusal
        assert joiner.global_round == 0 and joiner.global_params_sha256() != served

        guard.coordinator_step = lambda: 3
        assert joiner.load_state_from_peers(timeout=10)
        assert joiner.last_refusal is None
        assert (joiner.global_round, joiner.local_epoch) == (3, 3)
        assert set(joiner.global_state_dict()) == set(joiner.model.state_dict())
        assert joiner.tracker.local_progress.epoch == 3
        assert joiner.global_params_sha256() == served
        # Receipts sample losses at the global parameters, with their hash.
        round_, sampled, sha256 = joiner.global_sample_state()
        assert round_ == 3 and params_sha256(sampled) == served == sha256
        for param, global_ in zip(joiner.model.parameters(), joiner.global_params, strict=True):
            assert torch.equal(param.detach(), global_)
        for ours, theirs in zip(joiner.global_params, momentum, strict=True):
            assert torch.equal(joiner.outer.state[ours]["momentum_buffer"], theirs)
    finally:
        for optimizer in optimizers:
            optimizer.shutdown()
        for dht in dhts:
            dht.shutdown()
        signal.signal(signal.SIGINT, handler)


def _inputs(index: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(index)
    return [torch.randn(3000, generator=generator), torch.randn(17, generator=generator)]


# Real peers, each its own process group.


class Peers(ScriptPeers):
    """diloco_peer.py processes; a peer that exits before a test says so fails it at once."""

    def __init__(self, folder: Path):
        super().__init__(folder, PEER, allowed_exits=(-signal.SIGKILL,))

    def on_swarm(self, name: str) -> dict[int, str]:
        """Rounds after which the peer held the swarm's global parameters: averaged with an
        agreeing group, reloaded the group's, or loaded a peer's. A round that failed on
        a loaded machine ("own": our own pseudo-gradient applied) is left out."""
        outcomes = self.read(name).get("outcomes", {})
        good = {"averaged", "reloaded", "loaded"}
        return {r: sha for r, sha in self.rounds(name).items() if outcomes.get(str(r)) in good}

    def start_full_and_client(self, *args: str) -> None:
        """Start a full peer and a client-mode peer (both with ``args``) and let them train."""
        self.start("full", *args)
        self.start("client", "--client-mode", *args, initial="full")
        self.wait_for(
            "the peers to start",
            lambda: all("maddrs" in self.read(name) for name in ("full", "client")),
            60,
        )
        self.go.touch()

    def agree(self, *names: str) -> list[int]:
        """The rounds all named peers held the swarm's parameters after; asserts they match."""
        held = [self.on_swarm(name) for name in names]
        common = sorted(set.intersection(*(set(h) for h in held)))
        for round_ in common:
            assert len({h[round_] for h in held}) == 1, (round_, self.logs())
        return common

    def log(self, name: str, tail_chars: int = 3000) -> str:
        lines = self.named(name).output().splitlines()
        return "\n".join(line for line in lines if "quantize" not in line)[-tail_chars:]


@pytest.fixture
def peers(tmp_path: Path) -> Iterator[Peers]:
    p = Peers(tmp_path)
    try:
        yield p
    finally:
        p.stop_all()


def test_two_peers_hold_identical_global_params_and_a_killed_peer_stops_nobody(
    peers: Peers,
) -> None:
    """A full peer and a client-mode peer (8-bit pseudo-gradients) agree bit for bit after
    every round; a late joiner loads the global state and round from them; once the
    client is SIGKILLed mid-round, the others still finish the next rounds."""
    late_go = peers.root / "late-go"
    peers.start("full")
    peers.start("client", "--client-mode", initial="full")
    peers.start("late", "--join-late", "--no-overlap", "--go", str(late_go), initial="full")
    peers.wait_for(
        "the peers to start",
        lambda: all("maddrs" in peers.read(name) for name in ("full", "client", "late")),
        60,
    )
    peers.go.touch()

    peers.wait_for(
        "two rounds both peers averaged", lambda: len(peers.agree("full", "client")) >= 2, 90
    )

    peers.kill_peer("client")
    killed_at = max(peers.rounds("full"))
    late_go.touch()
    peers.wait_for(
        "the late joiner's download", lambda: peers.read("late").get("loaded") is not None, 60
    )
    late = peers.read("late")
    assert late["loaded"] is True, peers.log("late")
    ((loaded_round, loaded_sha256),) = ((int(k), v) for k, v in late["rounds"].items())
    assert loaded_round >= killed_at
    assert peers.rounds("full")[loaded_round] == loaded_sha256

    # Two more rounds without the killed peer, after which both held the swarm's
    # parameters, the same (agree asserts it for every such round; a round the killed
    # peer broke, where one applied its own pseudo-gradient, is left out).
    peers.wait_for(
        "two more rounds without the killed peer",
        lambda: sum(r > killed_at for r in peers.agree("full", "late")) >= 2,
        90,
    )


def test_top_k_pseudo_gradients_keep_peers_bit_identical(peers: Peers) -> None:
    """With 2-bit top-k pseudo-gradients and error feedback (a reducer's average is
    re-coded lossily), a full peer and a client-mode peer still hold the same global
    parameters after every round: every peer decodes the same bytes."""
    peers.start_full_and_client("--compression", "topk-2bit")
    peers.wait_for(
        "three rounds both peers averaged", lambda: len(peers.agree("full", "client")) >= 3, 90
    )


def test_peers_whose_global_params_differ_converge_and_leave_cleanly(peers: Peers) -> None:
    """Two peers that start from different parameters (as after a failed round both
    recovered alone) see it in the round's gathered hashes; with one member each, the one
    holding the larger hash reloads the other's, and from then on they agree. Both leave
    on their own after three rounds, through shutdown()."""
    peers.start("a", "--rounds", "3")
    peers.start("b", "--rounds", "3", "--seed", "1", initial="a")
    peers.wait_for("the peers to start", lambda: "maddrs" in peers.read("b"), 60)
    peers.go.touch()
    for name in ("a", "b"):
        assert peers.procs[name].wait(timeout=90) == 0, peers.log(name)
    assert set(peers.rounds("a")) == set(peers.rounds("b")) == {1, 2, 3}, peers.logs()
    assert peers.agree("a", "b"), peers.logs()
    outcomes = [*peers.read("a")["outcomes"].values(), *peers.read("b")["outcomes"].values()]
    # A round whose averaging broke halfway (one peer got its parts, the other not) ends
    # with a peer loading the other's state instead, which converges them too.
    assert {"reloaded", "loaded"} & set(outcomes), peers.logs()


@pytest.mark.soak
def test_a_peer_that_stalls_past_a_rounds_timeout_averages_with_the_others_again(
    peers: Peers,
) -> None:
    """The full peer's training process stops for 12 s (a laptop that slept, a machine
    under load: 1.5 round timeouts) while its averager and DHT run on. It comes to the
    next round's matchmaking long after the client-mode peer, which keeps looking for
    the round's group while a peer that trained it may still come, so the two average
    together again rather than each applying its own pseudo-gradient from then on.

    In ``make soak``, not ``make test``: it passes on an idle machine, but failed once
    under CI's load (at a3e9600), each peer deciding at every round that the other would
    not come (its progress record a round ahead, or lapsed): not solved yet."""
    peers.start_full_and_client()
    peers.wait_for(
        "two rounds both peers averaged", lambda: len(peers.agree("full", "client")) >= 2, 90
    )
    pid = peers.procs["full"].pid
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(12.0)
    finally:
        os.kill(pid, signal.SIGCONT)
    stalled_at = max(peers.rounds("full"))
    peers.wait_for(
        "three rounds both peers averaged after the stall",
        lambda: sum(r > stalled_at for r in peers.agree("full", "client")) >= 3,
        120,
    )
