"""What a sync peer serves while its optimizer step is under way (a real averager)."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import hivemind
import torch

from crowdtrain.node.swarm.averagers import GuardedStateAverager
from crowdtrain.node.swarm.guard import SwarmGuard


def test_served_state_is_never_one_steps_parameters_labelled_with_the_next(
    tmp_path: Path,
) -> None:
    """hivemind counts the new step before its (background) optimizer step has updated
    the parameters: a peer downloading right then got one step's parameters labelled
    with the next (seen in CI as a joiner whose steps differed from the swarm's)."""
    handler = signal.getsignal(signal.SIGINT)
    dht = hivemind.DHT(start=True)
    params = [torch.nn.Parameter(torch.ones(4))]
    averager = GuardedStateAverager(
        swarm_guard=SwarmGuard(tmp_path / "guard", target_batch_size=8),
        dht=dht,
        prefix="serving_state_averager",
        optimizer=lambda p: torch.optim.SGD(p, lr=0.5),
        params=params,
        offload_optimizer=True,
        custom_gradients=True,
        start=True,
    )
    try:
        with torch.no_grad():
            for p in averager.optimizer.param_groups[0]["params"]:
                p.grad = torch.ones_like(p)
        # The step waits for its trigger (gradients still averaging) in the background.
        averager.step(
            increment_epoch=True,
            optimizer_step=True,
            delay_optimizer_step=True,
            wait_for_trigger=lambda: time.sleep(1.0),
        )
        metadata, tensors, _ = averager.get_current_state()
        assert metadata["epoch"] == 1
        # the step of epoch 1 applied: 1 - 0.5 * 1
        assert torch.equal(tensors[0], torch.full((4,), 0.5)), tensors[0]
    finally:
        averager.shutdown()
        dht.shutdown()
        signal.signal(signal.SIGINT, handler)
