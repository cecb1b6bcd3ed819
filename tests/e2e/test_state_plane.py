"""DiLoCo end to end, state from the coordinator's side: real coordinator, real nodes.

Two nodes advance outer rounds (8-bit pseudo-gradients); validation loss falls and
receipts are verified by spot checks of the losses each node samples at its rounds' global
parameters (which the keeper's checkpoints hold bit for bit).
The keeper's round follower takes part in every round (weight 0), so it holds each
round's global state bit for bit as the nodes do. A node killed with SIGKILL and
started again, and a node that joins late in client mode (as behind NAT), both start
from the keeper's checkpoint over HTTP and take part in the rounds; a volunteer's
uplink carries state only for a round the follower itself missed. With every node
behind NAT (client mode: nobody accepts connections), the follower is the reducer and
rounds still advance.
"""

from __future__ import annotations

import os
import re
import signal

import httpx
import pytest

from crowdtrain.coordinator.swarm.followers import FOLLOWERS_DIR
from crowdtrain.model import load_checkpoint, params_sha256
from tests.specs import TINY_DILOCO, write_tiny_spec
from tests.swarm import Process, Swarm

pytestmark = [pytest.mark.slow, pytest.mark.swarm]

DILOCO = {
    "optimizer": {**TINY_DILOCO, "pseudo_grad_compression": "8bit"},
    "verify": {"checkpoint_every_s": 3.0, "spot_check_fraction": 1.0},
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


# The late client-mode joiner runs in make soak only: the tiny run's rounds last a second
# or two, and on a loaded 2-core machine a third node coming late was a round behind at
# every try (fresh-clone CI at cdf3d62 and after: node-c missed 20 rounds in a row, each
# loaded and then without a group). Nodes behind NAT average in make test's
# test_nodes_all_behind_nat_average_through_the_follower.
@pytest.mark.parametrize("late_joiner", [False, pytest.param(True, marks=pytest.mark.soak)])
def test_rounds_a_restarted_node_and_a_late_joiner_all_from_the_keepers_side(
    swarm: Swarm, late_joiner: bool
) -> None:
    start_run(swarm)
    first = swarm.start_node("node-a")
    doomed = swarm.start_node("node-b")
    swarm.wait_for(lambda: len(averaged(doomed)) >= 2, 180, "two rounds of node-a and node-b")

    swarm.kill(doomed)  # SIGKILL, its hivemind helpers too
    restarted = swarm.start_node("node-b")
    swarm.wait_for(lambda: len(averaged(restarted)) >= 2, 240, "two rounds of node-b back")
    nodes = [first, restarted]
    if late_joiner:
        # Behind NAT (or in a notebook): a client-mode peer takes part in the rounds too.
        late = swarm.start_node("node-c", "--client-mode")
        swarm.wait_for(lambda: len(averaged(late)) >= 2, 240, "two rounds of node-c")
        nodes.append(late)
    for node in nodes:  # Ctrl-C: each leaves cleanly
        node.popen.send_signal(signal.SIGINT)
    for node in nodes:
        assert node.wait(timeout=60) == 0, node.output()

    # Both started from the coordinator's side: the keeper's checkpoint of the round with
    # its outer momentum, or, when the keeper's newest was more than a round behind (a
    # busy verifier), the round from the keeper's follower. Rounds a node missed come from
    # the follower too, unless the follower missed them as well (its group failed on 2
    # busy cores): then a peer that has them serves them.
    missed = follower_missed(swarm)
    for node in nodes[1:]:
        output = node.output()
        from_keeper = "started from the keeper's checkpoint" in output
        assert from_keeper or "from the coordinator's follower" in output, output
        assert not from_keeper or "with its outer momentum" in output, output
        for round_ in peer_loads(output):
            assert round_ in missed, (round_, missed, output)

    run = swarm.get("/api/runs/tiny")
    peers = {p["name"]: p for p in swarm.get("/api/runs/tiny/peers")}
    assert all(p["num_tokens"] > 0 for p in peers.values()), peers
    if late_joiner:
        assert peers["node-c"]["step"] >= 2, peers  # it reached later rounds with the others
    assert run["val_loss"] < run["first_val_loss"] - 0.5, run
    # Every byte by purpose, as each node counted it: all averaged and sent progress.
    for name, peer in peers.items():
        traffic = peer["traffic"]
        assert traffic["averaging"]["sent"] > 0 and traffic["averaging"]["received"] > 0, name
        assert traffic["control"]["sent"] > 0 and traffic["data"]["received"] > 0, name
        # and where its training loop's time went (waits on the rounds can all overlap)
        split = peer["loop_time"]
        assert split["computing_s"] > 0 and 0 < split["utilisation"] <= 1, (name, split)

    # Every byte of state a volunteer's uplink carried, by each node's own count: one
    # state per download from a peer (a round the follower missed, or the follower
    # catching up on it; loaded, or refused once downloaded), none otherwise: never for
    # joining.
    logs = "".join(n.output() for n in [doomed, *nodes])
    downloads = peer_downloads(logs) + peer_downloads(follower_log(swarm))
    sent = sum(state_sent(swarm).values())
    assert sent <= downloads * served_bytes(swarm) * 1.05, (state_sent(swarm), downloads)

    def settled() -> dict | None:
        view = swarm.get("/api/runs/tiny/ledger")
        return view if all(r["status"] != "pending" for r in view["receipts"]) else None

    # Every receipt is spot-checked (fraction 1.0) with the losses its node sampled at a
    # round's global parameters, recomputed from the keeper's checkpoint of the round:
    # none is rejected, and those the keeper can check pass. (A sample of a round the
    # node averaged without the follower carries no losses, and one whose checkpoint was
    # pruned before its check cannot be checked: neither is credited.)
    receipts = swarm.wait_for(settled, 60, "every receipt checked")["receipts"]
    print([(r["status"], r["checks"]["spot"], r["reason"][:100]) for r in receipts])
    assert receipts and all(r["status"] != "rejected" for r in receipts), receipts
    passed = [r for r in receipts if r["checks"]["spot"] == "passed"]
    assert len(passed) >= len(receipts) / 2, receipts
    assert all(r["status"] == "verified" for r in passed), receipts

    # The follower took part in the rounds, so it kept their global parameters bit for
    # bit as each node holds them (the newest rounds only: older files are pruned). A
    # round whose peers met in two groups (one without the follower) leaves some holding
    # other parameters; the next round's group finds out and they reload the most held.
    kept = {c["step"]: c for c in swarm.get("/api/runs/tiny/checkpoints")}
    # A round whose group the follower found holding other parameters than its own (it
    # had met a smaller group) it kept as it held it, and loaded the next from the nodes.
    split = {
        int(r)
        for r in re.findall(
            r"round (\d+): the group's most held global-parameter", follower_log(swarm)
        )
    }
    # A member that found its global parameters of round R other than its group's (and
    # reloaded them) shows that R's were split, the follower perhaps on the other side
    # (CI saw a round complete for a node while the follower's side of it failed, and the
    # follower then averaged it with another node alone), and that the member's own
    # result for R + 1 was not the group's.
    nodes_output = "".join(n.output() for n in [doomed, *nodes])
    for r in re.findall(r"round (\d+): our global parameters differed", nodes_output):
        split |= {int(r), int(r) + 1}
    # Rounds the follower did not vouch for (held-out loss more than VOUCH_MARGIN above the
    # last written round's) are neither written nor served. Honest rounds too, early on: CI
    # saw round 3 at 6.12 nats after round 2's 3.90 (the outer Nesterov momentum).
    unvouched = {
        int(r)
        for r in re.findall(r"round (\d+): held-out loss [0-9.]+, more than", follower_log(swarm))
    }
    for node in nodes:
        output = node.output()
        held = dict(re.findall(r"global parameters of round (\d+): ([0-9a-f]{64})", output))
        assert held, output
        for round_, sha256 in held.items():
            if int(round_) in split:
                continue  # found out and reloaded
            if int(round_) in kept:
                assert kept[int(round_)]["sha256"] == sha256, (node.name, round_)
        rounds = {int(r) for r in held} - missed - unvouched
        last = {max(rounds)} if rounds else set()  # on its way
        assert rounds - last <= set(kept), (rounds, sorted(kept))
    latest = max(kept.values(), key=lambda c: c["step"])
    assert latest["outer_sha256"], latest
    response = httpx.get(f"{swarm.url}/api/runs/tiny/checkpoints/{latest['step']}/file")
    response.raise_for_status()
    path = swarm.root / "latest.safetensors"
    path.write_bytes(response.content)
    state, _ = load_checkpoint(path)
    assert params_sha256(state) == latest["sha256"]


def peer_loads(log: str) -> list[int]:
    """The rounds whose global state ``log``'s process downloaded from a volunteer."""
    found = re.findall(
        r"loaded (?:round (\d+)'s global state|the global state of round (\d+)) from a peer", log
    )
    return [int(a or b) for a, b in found]


def peer_downloads(log: str) -> int:
    """How many global states ``log``'s process downloaded from a volunteer, loaded
    (:func:`peer_loads`) or refused once downloaded (by the state checks, or as worse on
    held-out data than the node's own round)."""
    refused = re.findall(
        r"refused (?:the global state a peer served|round \d+'s global state from a peer)", log
    )
    return len(peer_loads(log)) + len(refused)


def follower_log(swarm: Swarm) -> str:
    return (swarm.coord_dir / FOLLOWERS_DIR / "tiny" / "follower.log").read_text(errors="replace")


def follower_missed(swarm: Swarm) -> set[int]:
    """The rounds the coordinator's follower did not follow (it loaded or skipped them)."""
    followed = {int(r) + 1 for r in re.findall(r"followed round (\d+) with", follower_log(swarm))}
    return set(range(max(followed, default=0) + 2)) - followed


def served_bytes(swarm: Swarm) -> int:
    """The size of one served DiLoCo state: global parameters and outer momentum, fp32."""
    kept = max(swarm.get("/api/runs/tiny/checkpoints"), key=lambda c: c["step"])
    return 2 * int(kept["num_bytes"])


def test_nodes_all_behind_nat_average_through_the_follower(swarm: Swarm) -> None:
    """Every node in client mode (behind NAT): the coordinator's follower is the only peer
    that can reduce, and every round goes through it; no volunteer's uplink carries state.
    (On a loaded machine the follower comes to a round's matchmaking after the nodes:
    they go on looking for the round's group while it is about, ROUND_PATIENCE.)"""
    start_run(swarm)
    nodes = [swarm.start_node(name, "--client-mode") for name in ("node-a", "node-b")]
    for node in nodes:
        swarm.wait_for(lambda n=node: len(averaged(n)) >= 2, 240, f"two rounds of {node.name}")
    for node in nodes:
        assert "and the coordinator's follower" in node.output(), node.output()
        node.popen.send_signal(signal.SIGINT)
    for node in nodes:
        assert node.wait(timeout=60) == 0, node.output()
    # Client-mode nodes serve nothing: no volunteer's uplink carried state.
    assert set(state_sent(swarm).values()) == {0}, state_sent(swarm)


@pytest.mark.soak
def test_a_stalled_follower_goes_on_and_nodes_behind_nat_converge_again(swarm: Swarm) -> None:
    """Not in ``make test`` (``make soak`` runs it: over two minutes). Before rounds
    waited for a late peer (ROUND_PATIENCE), client-mode nodes often did not meet the
    follower again for minutes after the stall, each round failing for everyone."""
    start_run(swarm)
    nodes = [swarm.start_node(name, "--client-mode") for name in ("node-a", "node-b")]
    for node in nodes:
        swarm.wait_for(lambda n=node: len(averaged(n)) >= 2, 240, f"two rounds of {node.name}")

    # The follower stalls (its machine busy) longer than a round's timeout: rounds fail
    # for everyone, each node applies its own pseudo-gradient and moves on. Nobody can
    # serve those rounds (all are in client mode), so the follower must go on without
    # them, and the nodes, drifted apart, converge on its parameters: averaging resumes.
    coordinator = swarm.named("coordinator").output()
    follower = int(re.findall(r"started its round follower \(pid (\d+)\)", coordinator)[-1])
    stalled = {node.name: len(averaged(node)) for node in nodes}
    os.killpg(follower, signal.SIGSTOP)
    try:
        swarm.wait_for(
            lambda: all("applying our own pseudo-gradient" in n.output() for n in nodes),
            60,
            "a round that failed for everyone",
        )
    finally:
        os.killpg(follower, signal.SIGCONT)
    for node in nodes:
        swarm.wait_for(
            lambda n=node: len(averaged(n)) >= stalled[n.name] + 2,
            120,
            f"two more rounds of {node.name} after the stall",
        )
    assert "no peer serves round" in follower_log(swarm), follower_log(swarm)[-3000:]
    held = [dict(global_hashes(node)) for node in nodes]
    after = [r for r in set(held[0]) & set(held[1]) if r > max(failed_rounds(swarm, nodes))]
    assert after and all(held[0][r] == held[1][r] for r in after), (held, after)

    for node in nodes:
        assert "and the coordinator's follower" in node.output(), node.output()
        node.popen.send_signal(signal.SIGINT)
    for node in nodes:
        assert node.wait(timeout=60) == 0, node.output()
    kept = [c["step"] for c in swarm.get("/api/runs/tiny/checkpoints")]
    assert max(kept) >= 3, kept
    # Client-mode nodes serve nothing: no volunteer's uplink carried state.
    assert set(state_sent(swarm).values()) == {0}, state_sent(swarm)


def global_hashes(node: Process) -> list[tuple[int, str]]:
    """(round, global-parameter hash) after each round ``node`` averaged."""
    found = re.findall(r"global parameters of round (\d+): ([0-9a-f]{64})", node.output())
    return [(int(r), sha) for r, sha in found]


def failed_rounds(swarm: Swarm, nodes: list[Process]) -> list[int]:
    """Rounds a node ended on its own pseudo-gradient or reloaded (+1: the state after)."""
    text = "".join(n.output() for n in nodes)
    ends = re.findall(r"round (\d+): (?:averaging failed|our global parameters differed)", text)
    return [int(r) + 1 for r in ends] or [0]
