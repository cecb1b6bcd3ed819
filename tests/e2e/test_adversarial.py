"""Hostile and broken peers in a swarm of real processes.

Three nodes train one run: an attacker that sends NaN parts, parts scaled by
-1000 and weights claimed 100x (one per averaging round, through a test hook),
an honest node whose every 4th gradient is Inf (another hook) and a plain
honest node. The honest nodes drop and report the attacker's parts, skip
their own broken steps, and keep a finite, improving model.
"""

from __future__ import annotations

import json
import re
import signal

import pytest
import torch

from crowdtrain.model import load_checkpoint
from tests.specs import TINY_DILOCO, write_tiny_spec
from tests.swarm import Swarm, write_spec
from tests.swarm_keys import SwarmKeys, publish_fake_progress

pytestmark = [pytest.mark.slow, pytest.mark.swarm]

HONEST = ("honest-inf", "honest")
# far: a part kept (inside the norm bounds) but far from the robust result
REASONS = {"non-finite", "norm", "weight", "far"}


def reports(swarm: Swarm, name: str) -> list[dict]:
    path = swarm.root / name / "runs" / "tiny" / "guard" / "reports.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def dht_peer_id(swarm: Swarm, name: str) -> str:
    log = (swarm.root / f"{name}.log").read_text(errors="replace")
    found = re.search(r"joined the swarm as (\w+)", log)
    assert found, log[-3000:]
    return found.group(1)


def evals_of(swarm: Swarm, name: str) -> list[float]:
    peer_id = {p["name"]: p["peer_id"] for p in swarm.get("/api/runs/tiny/peers")}[name]
    return [e["val_loss"] for e in swarm.get("/api/runs/tiny/evals") if e["peer_id"] == peer_id]


def improved(losses: list[float]) -> bool:
    """A peer's validation loss fell since it began (a late joiner begins from the
    swarm's loaded state) and is well below an untrained model's (ln 256 = 5.5): the
    median of its last three evaluations (one may catch a round that a defence let
    through before it was refused; fresh-clone CI saw a last value above 4.5 after
    values near 3.5 in the DiLoCo flip test)."""
    if len(losses) < 3:
        return False
    recent = sorted(losses[-3:])[1]
    return recent < losses[0] - 0.05 and recent < 4.5


def test_hostile_parts_are_dropped_and_honest_models_stay_finite(swarm: Swarm) -> None:
    # Small shards: receipts (and so the honest nodes' verified credit, without which
    # their reports flag no one) come every few seconds.
    data = swarm.prepare(32_768)
    published = swarm.publish(write_spec(swarm.root / "tiny.toml"), data)
    assert published.returncode == 0, published.stderr
    swarm.start_coordinator()
    nodes = {
        "honest-inf": swarm.start_node("honest-inf", env={"CROWDTRAIN_TEST_INF_GRAD_EVERY": "4"}),
        "honest": swarm.start_node("honest"),
        "attacker": swarm.start_node("attacker", env={"CROWDTRAIN_TEST_ATTACK": "cycle"}),
    }

    def attacker_dropped_and_honest_improved() -> bool:
        # Flagging takes reports from two peers with verified work, three in all, each
        # carried by a heartbeat: stopping before the coordinator has them all would race it.
        flagged = any(
            p["name"] == "attacker" and p["flagged"] for p in swarm.get("/api/runs/tiny/peers")
        )
        return (
            flagged
            and all(reports(swarm, name) for name in HONEST)
            and all(improved(evals_of(swarm, name)) for name in HONEST)
        )

    swarm.wait_for(
        attacker_dropped_and_honest_improved,
        timeout=300,
        what="both honest nodes to drop the attacker's parts and improve, and its flag",
    )
    # Everyone leaves at once (a peer left alone would wait for a group).
    for process in nodes.values():
        process.popen.send_signal(signal.SIGINT)
    for name in HONEST:
        assert nodes[name].wait(timeout=90) == 0, nodes[name].output()[-5000:]

    attacker = dht_peer_id(swarm, "attacker")
    reasons: set[str] = set()
    for name in HONEST:
        seen = reports(swarm, name)
        assert attacker in {r["dht_peer_id"] for r in seen}, seen
        # An honest peer's part is refused by mistake only for its norm, and rarely: with
        # the attacker's part dropped, two parts are left and the smaller is the reference
        # (nobody can tell which of two is wrong), and honest-inf's gradient after skipped
        # micro-batches sometimes lay 200x from the other's (fresh-clone CI at f046c66 and
        # de87cfa, and 1 run in 3 here at de87cfa; issue 15's robust aggregation is where
        # this belongs). It never flags an honest peer (asserted below).
        mistaken = [r for r in seen if r["dht_peer_id"] != attacker]
        assert all(r["reason"] == "norm" for r in mistaken), seen
        assert sum(r["count"] for r in mistaken) <= 2, seen
        reasons |= {r["reason"] for r in seen if r["dht_peer_id"] == attacker}
        state, _ = load_checkpoint(swarm.root / name / "runs" / "tiny" / "checkpoint.safetensors")
        assert all(torch.isfinite(t).all() for t in state.values()), name
        assert improved(evals_of(swarm, name)), (name, evals_of(swarm, name))
    # The first round's attack is NaN; later rounds are refused for their norm or
    # weight (every part once the coordinator flags the attacker and bounds it to 0).
    assert "non-finite" in reasons and reasons <= REASONS, reasons

    output = nodes["honest-inf"].output()
    assert "non-finite gradients; skipped this micro-batch" in output, output[-3000:]
    assert "skipped this micro-batch" not in nodes["honest"].output()

    # The coordinator heard it all: who was reported (and flagged) and who skipped steps.
    peers = {p["name"]: p for p in swarm.get("/api/runs/tiny/peers")}
    assert peers["attacker"]["dht_peer_id"] == attacker
    assert peers["attacker"]["flagged"], peers["attacker"]
    assert not any(peers[name]["flagged"] for name in HONEST), peers
    assert peers["honest-inf"]["num_skipped_steps"] > 0, peers["honest-inf"]
    assert peers["honest"]["num_skipped_steps"] == 0, peers["honest"]


def test_a_node_whose_gradients_are_never_finite_stops_with_advice(swarm: Swarm) -> None:
    data = swarm.prepare()
    published = swarm.publish(write_spec(swarm.root / "tiny.toml"), data)
    assert published.returncode == 0, published.stderr
    swarm.start_coordinator()
    node = swarm.start_node("broken", env={"CROWDTRAIN_TEST_INF_GRAD_EVERY": "1"})
    assert node.wait(timeout=180) == 1, node.output()[-3000:]
    output = node.output()
    assert "25 micro-batches in a row had non-finite gradients" in output, output[-3000:]
    assert "mixed precision" in output
    state, _ = load_checkpoint(swarm.root / "broken" / "runs" / "tiny" / "checkpoint.safetensors")
    assert all(torch.isfinite(t).all() for t in state.values())


# The DiLoCo case is in ``make soak``, not ``make test``: over five minutes, and under a
# starved CPU (fresh-clone CI's two workers, 2026-12-07, twice) the three peers rarely
# meet in one group, so the attacker is seen in rounds of two (harmful) or not at all, and
# its flag can take longer than the test waits. The rounds of two are
# test_a_diloco_round_met_by_one_honest_node_and_a_flipper_is_refused's.
@pytest.mark.parametrize("mode", ["sync", pytest.param("diloco", marks=pytest.mark.soak)])
def test_a_sign_flipping_peer_is_outvoted_reported_and_flagged(swarm: Swarm, mode: str) -> None:
    """The attacker runs our own node with every averaging part (gradients, or DiLoCo's
    pseudo-gradients) flipped and scaled by 9.9 (hook ``flip``: inside the guard's norm
    bounds, so no part is dropped). Under the weighted mean that is the swarm's step,
    against the gradient; under the default CenteredClip the honest nodes' models improve
    (in sync their validation loss never rises more than 0.5 nats above where it began), they report the
    attacker's parts as far from the result, and the coordinator flags it."""
    data = swarm.prepare(32_768)
    spec = (
        write_spec(swarm.root / "tiny.toml")
        if mode == "sync"
        else write_tiny_spec(swarm.root / "tiny.toml", optimizer=TINY_DILOCO)
    )
    published = swarm.publish(spec, data)
    assert published.returncode == 0, published.stderr
    swarm.start_coordinator()
    nodes = {
        "honest-a": swarm.start_node("honest-a"),
        "honest-b": swarm.start_node("honest-b"),
        "attacker": swarm.start_node("attacker", env={"CROWDTRAIN_TEST_ATTACK": "flip"}),
    }
    honest = ("honest-a", "honest-b")

    def flagged_and_improved() -> bool:
        flagged = any(
            p["name"] == "attacker" and p["flagged"] for p in swarm.get("/api/runs/tiny/peers")
        )
        return flagged and all(improved(evals_of(swarm, name)) for name in honest)

    swarm.wait_for(
        flagged_and_improved,
        timeout=300,
        what="the attacker's flag and both honest nodes' models to improve",
    )
    for process in nodes.values():
        process.popen.send_signal(signal.SIGINT)
    for name in honest:
        assert nodes[name].wait(timeout=90) == 0, nodes[name].output()[-5000:]

    attacker = dht_peer_id(swarm, "attacker")
    for name in honest:
        losses = evals_of(swarm, name)
        # (a DiLoCo node evaluates its local parameters, which jump at each round's end)
        # (under load a node's first evaluation can come after some steps: 3.44, then
        # 3.5-3.67 as the swarm went on; under the mean the loss passes 11 in 15 steps)
        assert mode == "diloco" or max(losses) <= losses[0] + 0.5, (name, losses)
        seen = reports(swarm, name)
        # far until the flag; then the roster bounds its weight to 0 and its parts are
        # refused for their weight
        reasons = {r["reason"] for r in seen if r["dht_peer_id"] == attacker}
        # (harmful: a DiLoCo round met by one honest node and the attacker alone; norm: a
        # part above 200 times the slice's lower median, as when an honest part is tiny;
        # never contrary: the mean of two parts, one flipped within the clip bound, is
        # refused but blames nobody)
        allowed = {"far", "weight", "harmful", "norm"}
        assert reasons & {"far", "harmful"} and reasons <= allowed, seen
        assert all(r["dht_peer_id"] == attacker for r in seen if r["reason"] == "far"), seen
    peers = {p["name"]: p for p in swarm.get("/api/runs/tiny/peers")}
    # flagged for the reports that came first: far, or norm or harmful as above
    assert any(r in peers["attacker"]["flagged"] for r in ("far", "norm", "harmful")), peers
    assert not any(peers[name]["flagged"] for name in honest), peers


def test_a_diloco_round_met_by_one_honest_node_and_a_flipper_is_refused(swarm: Swarm) -> None:
    """One honest node and the attacker (pseudo-gradients flipped x9.9) meet alone in every
    DiLoCo round, as when a third peer is late: every robust rule is the mean of two
    parts, which the flip wins (a loaded CI machine showed it: the honest model's loss went
    from 3.9 to 12,000 in 60 rounds). The honest node judges each round's average by the
    held-out loss of the global parameters it gives against those its own pseudo-gradient
    gives alone, refuses it, applies its own and reports the attacker as harmful. The
    honest model improves."""
    data = swarm.prepare(32_768)
    spec = write_tiny_spec(swarm.root / "tiny.toml", optimizer=TINY_DILOCO)
    published = swarm.publish(spec, data)
    assert published.returncode == 0, published.stderr
    swarm.start_coordinator()
    nodes = {
        "honest": swarm.start_node("honest"),
        "attacker": swarm.start_node("attacker", env={"CROWDTRAIN_TEST_ATTACK": "flip"}),
    }
    swarm.wait_for(
        lambda: "joined the swarm as" in nodes["attacker"].output(), 120, "the attacker to join"
    )
    attacker = dht_peer_id(swarm, "attacker")

    honest_id = {p["name"]: p["peer_id"] for p in swarm.get("/api/runs/tiny/peers")}["honest"]

    def rounds_evaluated() -> int:
        evals = swarm.get("/api/runs/tiny/evals")
        return max((e["step"] for e in evals if e["peer_id"] == honest_id), default=0)

    # Long enough for the flip to show: without the judge the loss is past 30 by round 10.
    # (The keeper's round follower applies such a group's mean, having no pseudo-gradient
    # of its own to judge it against, but neither writes nor serves a round whose held-out
    # loss rose more than 1.5 nats: a node that had fallen behind loaded those, 3.4 to 11.)
    swarm.wait_for(lambda: rounds_evaluated() >= 20, 240, "20 rounds of the honest node")
    losses = evals_of(swarm, "honest")
    # A node evaluates its local parameters between rounds: one evaluation may catch a
    # round the judge let through (fresh-clone CI saw one at 6.35 among values near 3.5);
    # without the judge most are past 8 and the last is the worst.
    later = sorted(losses[1:])
    assert improved(losses) and later[len(later) // 2] < 4.5, f"{losses}"
    swarm.wait_for(
        lambda: any(
            r["dht_peer_id"] == attacker and r["reason"] == "harmful"
            for r in reports(swarm, "honest")
        ),
        60,
        "the honest node's report of the attacker",
    )
    for process in nodes.values():
        process.popen.send_signal(signal.SIGINT)
    assert nodes["honest"].wait(timeout=90) == 0, nodes["honest"].output()[-5000:]
    assert "refused the group's average" in nodes["honest"].output()


def test_a_reducer_that_returns_its_slice_flipped_is_refused_and_reported(
    swarm: Swarm,
) -> None:
    """The attacker runs our own node: it trains and sends honest parts, but every slice it
    reduces goes back to the other senders times -100 (hook ``reducer``: inside the bound
    on a result's norm, 1000 times our own part). A sync step's gradient then pointed away
    from the honest ones in a third of the model. The honest nodes now judge each reducer's
    results for their slice together: pointing against their own parts, they are refused
    (both step on nothing in that slice, and so stay in step with each other) and the
    reducer is reported as ``contrary``. Once flagged, it is turned away from their groups
    (nothing more to report about it). The honest models improve (the median of their
    last three evaluations below 4 nats) and never rise more than 0.5 nats above their
    first evaluation. The keeper's follower, which trains nothing, judges the results by a
    gradient of held-out sequences it sends with weight 0 (and writes no checkpoint or
    snapshot whose held-out loss rose above its lowest by more than the spot checks'
    tolerance), so no honest receipt fails a spot check against parameters the attacker
    steered (fresh-clone CI saw both honest nodes flagged so when it sent zeros)."""
    data = swarm.prepare(32_768)
    published = swarm.publish(write_spec(swarm.root / "tiny.toml"), data)
    assert published.returncode == 0, published.stderr
    swarm.start_coordinator()
    nodes = {
        "honest-a": swarm.start_node("honest-a"),
        "honest-b": swarm.start_node("honest-b"),
        "attacker": swarm.start_node("attacker", env={"CROWDTRAIN_TEST_ATTACK": "reducer"}),
    }
    honest = ("honest-a", "honest-b")
    swarm.wait_for(
        lambda: "joined the swarm as" in nodes["attacker"].output(), 120, "the attacker to join"
    )
    attacker = dht_peer_id(swarm, "attacker")

    def reported_and_evaluated() -> bool:
        return all(
            any(r["dht_peer_id"] == attacker for r in reports(swarm, name))
            and len(evals_of(swarm, name)) >= 8
            for name in honest
        )

    swarm.wait_for(
        reported_and_evaluated, 300, "both honest nodes' reports and eight evaluations each"
    )

    def peers() -> dict[str, dict]:
        return {p["name"]: p for p in swarm.get("/api/runs/tiny/peers")}

    def steps() -> dict[str, int]:
        return {name: peers()[name]["step"] or 0 for name in honest}

    def about_attacker() -> int:
        return sum(
            r["count"]
            for name in honest
            for r in reports(swarm, name)
            if r["dht_peer_id"] == attacker
        )

    # Flagged (two honest reporters with verified work), the attacker is turned away from
    # the honest nodes' groups, and the keeper's follower's, once the roster reaches them.
    swarm.wait_for(lambda: peers()["attacker"]["flagged"], 300, "the attacker's flag")
    start = steps()
    swarm.wait_for(
        lambda: all(steps()[n] >= start[n] + 2 for n in honest), 120, "the roster to reach all"
    )
    reported, start = about_attacker(), steps()
    swarm.wait_for(
        lambda: all(steps()[n] >= start[n] + 4 for n in honest), 120, "four more steps of both"
    )
    assert about_attacker() == reported, "the flagged attacker was still in a group"
    for process in nodes.values():
        process.popen.send_signal(signal.SIGINT)
    for name in honest:
        assert nodes[name].wait(timeout=90) == 0, nodes[name].output()[-5000:]
    receipts = swarm.get("/api/runs/tiny/ledger")["receipts"]
    print([(r["peer_id"], r["status"], r["reason"][:160]) for r in receipts])
    ids = {peers()[name]["peer_id"] for name in honest}
    assert not [r for r in receipts if r["peer_id"] in ids and r["status"] == "rejected"]
    assert not any(peers()[name]["flagged"] for name in honest), peers()
    for name in honest:
        losses = evals_of(swarm, name)
        # Defended: 5.43 to 3.62 in five evaluations (8 steps), 3.39 at step 20. Without
        # the check: 5.43, 4.45, 4.38, 4.37, 4.51, 4.72, rising.
        recent = sorted(losses[-3:])[1]
        assert improved(losses) and recent < 4.0, (name, losses)
        # Never above the first evaluation by more than 0.5 nats, but for one evaluation
        # alone (fresh-clone CI at 57a13d0: a node that joined late evaluated 6.57 at its
        # first step, then 3.50 and below; not explained).
        medians = [sorted(losses[i : i + 3])[1] for i in range(len(losses) - 2)]
        assert max(medians) <= losses[0] + 0.5, (name, losses)
        seen = reports(swarm, name)
        # (norm: a result over 1000 times our part of that part, where ours was small)
        # (far: its honest parts, from a node that had fallen behind, far from the result)
        reasons = {r["reason"] for r in seen if r["dht_peer_id"] == attacker}
        assert "contrary" in reasons and reasons <= {"contrary", "norm", "weight", "far"}, seen
        # an honest reducer's results are never refused
        assert all(r["reason"] != "contrary" for r in seen if r["dht_peer_id"] != attacker), seen


def test_a_progress_record_ahead_of_the_swarm_moves_no_one(swarm: Swarm) -> None:
    """A DHT peer publishes a valid, signed progress record as a full peer five steps
    ahead of the swarm's (tests/fake_progress.py --ahead 5), renewed every second. hivemind
    took the highest record's epoch as the swarm's: its peers reloaded state and threw
    their gradients away at every step. The honest nodes now leave the record out (it is
    ahead of what the other peers back) and keep stepping."""
    data = swarm.prepare(32_768)
    published = swarm.publish(write_spec(swarm.root / "tiny.toml"), data)
    assert published.returncode == 0, published.stderr
    swarm.start_coordinator()
    nodes = {name: swarm.start_node(name) for name in ("honest-a", "honest-b")}

    def steps() -> dict[str, int]:
        return {
            p["name"]: p["step"] or 0
            for p in swarm.get("/api/runs/tiny/peers")
            if p["name"] in nodes
        }

    swarm.wait_for(
        lambda: len(steps()) == 2 and min(steps().values()) >= 2, 180, "two steps of both"
    )
    folder = swarm.root / "hijacker"
    folder.mkdir()
    hijacker = publish_fake_progress(swarm, "hijacker", "tiny", SwarmKeys(), folder, ahead=5)
    swarm.wait_for(lambda: "publishing as" in hijacker.output(), 60, "the hijacker's records")
    before = steps()
    swarm.wait_for(
        lambda: all(steps()[name] >= before[name] + 5 for name in nodes),
        120,
        "five more steps of both honest nodes",
    )
    for name, process in nodes.items():
        assert "ignored a progress record claiming epoch" in process.output(), name
    for process in nodes.values():
        process.popen.send_signal(signal.SIGINT)
    for process in nodes.values():
        assert process.wait(timeout=90) == 0, process.output()[-5000:]
