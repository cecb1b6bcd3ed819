"""A node joining a run that no peer is training any more starts from the keeper's checkpoint.

Real processes: a coordinator (its keeper pulls every 3 s) and a node train
until a checkpoint is kept; that node leaves; a new node, with the default
``--start-from auto``, finds no peer to load state from, downloads the keeper's
checkpoint over HTTP and trains on from its step instead of from step 0.
"""

from __future__ import annotations

import re

import pytest

from tests.swarm import Swarm, write_spec

pytestmark = pytest.mark.slow

VERIFY = """
[verify]
checkpoint_every_s = 3.0
spot_check_fraction = 0.0
"""


# A DiLoCo run: the keeper also keeps each round's outer momentum, which a node starting
# from its checkpoint takes too (without it the node's outer steps would differ).
DILOCO = """
[optimizer]
mode = "diloco"
target_batch_size = 16
inner_batch_size = 8
micro_batch_size = 8
inner_steps = 5
lr = 0.005
warmup_steps = 2
outer_lr = 0.7
outer_momentum = 0.9
"""


# DiLoCo's case (the round's outer momentum comes along) is test_state_plane's restarted
# node: the keeper's follower holds every round there.
@pytest.mark.parametrize("mode", ["sync"])
def test_a_node_alone_starts_from_the_keepers_checkpoint(swarm: Swarm, mode: str) -> None:
    data = swarm.prepare(16_384)
    spec = write_spec(swarm.root / "tiny.toml")
    text = spec.read_text()
    if mode == "diloco":
        text = re.sub(r"\[optimizer\][^\[]*", DILOCO.lstrip(), text, count=1)
    spec.write_text(text + VERIFY)
    assert swarm.publish(spec, data).returncode == 0
    swarm.start_coordinator()

    first = swarm.start_node("node-a")
    kept = swarm.wait_for(
        lambda: [
            c for c in swarm.get("/api/runs/tiny/checkpoints") if c["available"] and c["step"] >= 3
        ],
        150,
        "a kept checkpoint past step 3",
    )
    assert swarm.stop(first) == 0, first.output()[-2000:]
    latest = max(c["step"] for c in swarm.get("/api/runs/tiny/checkpoints") if c["available"])
    assert latest >= kept[-1]["step"]

    second = swarm.start_node("node-b")
    started = swarm.wait_for(
        lambda: re.search(r"started from the keeper's checkpoint of step (\d+)", second.output()),
        120,
        "node-b to start from the checkpoint",
    )
    step = int(started.group(1))
    assert step >= kept[-1]["step"]
    if mode == "diloco":  # the round's momentum came with it, from the keeper
        assert "with its outer momentum" in second.output(), second.output()[-3000:]
        assert kept[-1]["outer_sha256"] is not None
    # It trains on from there: the coordinator sees it at that step or later, never from 0.
    peer = swarm.wait_for(
        lambda: next(
            (
                p
                for p in swarm.get("/api/runs/tiny/peers")
                if p["name"] == "node-b" and p["num_tokens"] > 0
            ),
            None,
        ),
        90,
        "node-b to train",
    )
    assert peer["step"] >= step, peer
    assert swarm.stop(second) == 0, second.output()[-2000:]
